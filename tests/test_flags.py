"""The config dataclasses as flags and files (vaekit.flags): what build_config resolves.
The flags as the command line shows and parses them are tested in test_cli.py."""

import json
import re

import pytest

from vaekit.config import RunConfig
from vaekit.flags import UsageError, _read_config_file, build_config
from vaekit.presets import PRESETS


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"latent_dim": 3, "hidden": [16]}, "train": {"epochs": 2}}))
    config = build_config("mnist-burda", str(path), {"model.latent_dim": 4, "train.lr": 0.01})
    assert isinstance(config, RunConfig)
    assert config.model.latent_dim == 4 and config.train.lr == 0.01  # the flags win
    assert config.model.hidden == (16,) and config.train.epochs == 2  # then the file
    assert config.model.activation == PRESETS["mnist-burda"]["model"]["activation"]  # then the preset
    with pytest.raises(UsageError, match="--preset must be one of"):
        build_config("no-such-preset")


def test_a_json_config_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "run.json"
    content = {"train": {"epochs": 2}}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(content).encode())  # as some editors save it
    assert _read_config_file(str(path)) == content


def test_an_error_over_a_preset_value_names_the_preset_and_the_flag():
    with pytest.raises(ValueError, match=r"the preset 'mnist-pixelcnn' sets pixelcnn_layers=4 "
                                         r"\(--pixelcnn-layers\): override it$"):
        build_config("mnist-pixelcnn", overrides={"model.likelihood": "gaussian", "data.binarize": "none"})
    assert build_config("mnist-pixelcnn", overrides={"model.likelihood": "gaussian", "data.binarize": "none",
                                                     "model.pixelcnn_layers": 0})
    with pytest.raises(ValueError) as info:  # the user's own value: nothing to blame on the preset
        build_config("digits", overrides={"objective.name": "elbo", "objective.iw_samples": 5})
    assert "preset" not in str(info.value)


@pytest.mark.parametrize("preset, overrides, dropped", [
    ("mnist-large", {"objective.name": "elbo"}, ("objective", "iw_samples", 1)),
    ("mnist-pixelcnn", {"model.pixelcnn_layers": 0}, ("model", "pixelcnn_width", 64)),
    ("mnist-pixelcnn-late", {"model.pixelcnn_layers": 0}, ("model", "pixelcnn_fusion", "early")),
    ("mnist-pixelcnn", {"objective.beta_schedule": "constant"}, ("objective", "warmup_steps", 0)),
    # no KL weight under the IWAE bound or the capacity penalty: the preset's schedule goes
    ("mnist-pixelcnn", {"objective.name": "iwae", "objective.iw_samples": 5}, ("objective", "beta_schedule", "constant")),
    ("mnist-pixelcnn", {"objective.capacity_max": 25.0}, ("objective", "beta_schedule", "constant")),
])
def test_a_preset_setting_that_the_users_choice_leaves_inert_is_dropped(preset, overrides, dropped):
    """The user turned off what the preset's setting served (the head, the IWAE bound, the
    schedule): the setting goes back to its default, where before it was refused, and the
    rest of the preset stays."""
    section, field, default = dropped
    config = build_config(preset, overrides=overrides)
    assert getattr(getattr(config, section), field) == default
    assert config.model.hidden == tuple(PRESETS[preset]["model"]["hidden"])
    own = {**overrides, f"{section}.{field}": PRESETS[preset][section][field]}  # given by the user: refused
    with pytest.raises(ValueError, match=rf"{field}.* (has no effect|applies only to|are unused)") as info:
        build_config(preset, overrides=own)
    assert "the preset" not in str(info.value)


def test_field_docs_are_plain_text_for_help():
    """--help shows the 'Attributes:' docs: no Sphinx roles, no double backticks."""
    from vaekit.config import GROUPS
    from vaekit.flags import _field_docs

    docs = {f"{g}.{k}": v for g, klass in GROUPS.items() for k, v in _field_docs(klass).items()}
    assert docs["data.download"] == "fetch missing MNIST-like files (see download_mnist); for \"mnist\" and \"fashion-mnist\" only."
    assert "(drawn by vaekit.batching.BatchIterator)" in docs["data.binarize"]
    assert "the directory (not a file in it)" in docs["data.data_dir"]  # the name the .npz must have
    assert "an .npz named <dataset>.npz (mnist.npz, fashion-mnist.npz;" in docs["data.data_dir"]
    for name, doc in docs.items():
        assert not re.search(r":\w+:`|``", doc), f"{name}: {doc}"


def test_the_iwae_objective_asked_for_with_one_sample_is_refused_on_the_command_line():
    """--objective iwae without --iw-samples trained the ELBO (k = 1): a forgotten flag."""
    from vaekit.flags import UsageError, build_config

    for preset in (None, "mnist-burda", "mnist-pixelcnn"):
        with pytest.raises(UsageError, match=r"^--objective iwae: with iw_samples=1 .* is the ELBO; give --iw-samples"):
            build_config(preset, overrides={"objective.name": "iwae"})
    assert build_config(overrides={"objective.name": "iwae", "objective.iw_samples": 2}).objective.iw_samples == 2
    assert build_config("mnist-large", overrides={"objective.name": "iwae"}).objective.iw_samples == 5  # the preset's k
    assert build_config("mnist-large").objective.name == "iwae"  # the preset's own choice


@pytest.mark.parametrize("in_file, overrides, pattern", [
    ({"name": "iwae"}, {}, r"^--config \S+run\.json: objective\.name is 'iwae' with iw_samples=1 \(the default\), "
                            r"and that IWAE bound is the ELBO; set objective\.iw_samples to K >= 2 .*, or "
                            r"objective\.name to 'elbo'$"),
    ({"name": "iwae", "iw_samples": 1}, {}, r"^--config \S+: objective\.name is 'iwae' with iw_samples=1 \(set in the file\)"),
    ({"iw_samples": 1}, {"objective.name": "iwae"},
     r"^--objective iwae: with iw_samples=1 \(objective\.iw_samples in \S+run\.json\) the IWAE bound is the ELBO"),
])
def test_an_iwae_of_one_sample_from_a_config_file_is_named_by_the_file(tmp_path, in_file, overrides, pattern):
    """The refusal named --objective and --iw-samples when the file set them."""
    import json

    from vaekit.flags import UsageError, build_config

    (tmp_path / "run.json").write_text(json.dumps({"objective": in_file}))
    with pytest.raises(UsageError, match=pattern):
        build_config(config_file=str(tmp_path / "run.json"), overrides=overrides)


@pytest.mark.parametrize("in_file, overrides, pattern", [
    # a value from the --config file is named by the file and its key, not by a flag not given
    ({"model": {"latent_dim": "x"}}, {}, r"^--config \S+run\.json: model\.latent_dim must be an integer in "
                                         r"\[1, 2147483647\], got 'x'$"),
    ({"data": {"val_size": -1}}, {}, r"^--config \S+run\.json: data\.val_size must be >= 0, got -1$"),
    # the flag overrides the file: it is the flag's value that is refused
    ({"model": {"latent_dim": "x"}}, {"model.latent_dim": 0}, r"^--latent-dim: ModelConfig\.latent_dim must be an "
                                                              r"integer in \[1, 2147483647\], got 0$"),
    # CUDA asked for where there is none: the flag (or the file's key), what it takes, what it got
    ({}, {"train.device": "cuda"}, r"^--device: TrainConfig\.device must be auto or cpu on this machine \(no CUDA "
                                   r"device is available\), got 'cuda'$"),
    ({"train": {"device": "cuda:1"}}, {}, r"^--config \S+run\.json: train\.device must be auto or cpu on this "
                                          r"machine \(no CUDA device is available\), got 'cuda:1'$"),
])
def test_a_bad_value_is_named_by_where_the_user_gave_it(in_file, overrides, pattern, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(in_file))
    with pytest.raises(ValueError, match=pattern):
        build_config(None, str(path), overrides)


@pytest.mark.parametrize("in_file, overrides, error, pattern", [
    ({"train": {"epoch": 3}}, {}, ValueError, r"^--config \S+run\.json: unknown key\(s\) in config section 'train': "
                                              r"epoch; known: adam_kernel, "),
    ({"trian": {"epochs": 3}}, {}, ValueError, r"^--config \S+run\.json: unknown config section\(s\): trian; "
                                               r"known: model, "),
    ({"train": 3}, {}, TypeError, r"^--config \S+run\.json: config section 'train' must be a mapping, got int$"),
    ({"train": 3}, {"train.lr": 0.01}, ValueError, r"^--config \S+run\.json: config section 'train' must be a "
                                                   r"table of settings, got int$"),
])
def test_a_name_or_section_of_the_file_that_no_config_takes_is_named_by_the_file(in_file, overrides, error, pattern,
                                                                                 tmp_path):
    """Only the file can hold these (the flags and presets give known names only), and the
    error did not name it, where a bad value from it did."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(in_file))
    with pytest.raises(error, match=pattern):
        build_config(None, str(path), overrides)


@pytest.mark.parametrize("overrides, error, pattern", [
    # these failed inside with "not enough values to unpack" and "'str' object has no attribute 'items'"
    ({"epochs": 3}, ValueError, r'^overrides must be a dict of "group\.field": value, got key \'epochs\'$'),
    ("train.epochs=3", TypeError, r'^overrides must be a dict of "group\.field": value, got str$'),
    ([("train.epochs", 3)], TypeError, r"^overrides must be a dict of .*, got list$"),
    ({3: 1}, TypeError, r"^overrides must be a dict of .*, got key 3 \(int\)$"),
    ({"train.": 3}, ValueError, r"^overrides must be a dict of .*, got key 'train\.'$"),
    # an unknown name is the overrides', not the --config file's
    ({"trian.epochs": 3}, ValueError, r"^overrides: unknown config section 'trian' in 'trian\.epochs'; known: model, "),
    ({"train.epoch": 3}, ValueError, r"^overrides: unknown key 'epoch' in config section 'train' \('train\.epoch'\); "
                                     r"known: adam_kernel, "),
])
def test_build_config_names_overrides_that_are_not_group_field_settings(overrides, error, pattern, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"epochs": 2}}))
    for config_file in (None, str(path)):
        with pytest.raises(error, match=pattern):
            build_config("digits", config_file, overrides=overrides)
    assert build_config("digits", overrides={"train.epochs": 3}).train.epochs == 3


@pytest.mark.parametrize("text, key", [
    ('{"train": {"epochs": 1}, "train": {"batch_size": 7}}', "train"),  # the first section was dropped
    ('{"train": {"epochs": 1, "epochs": 2}}', "epochs"),
])
def test_a_json_config_with_a_key_given_twice_is_refused(tmp_path, text, key):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=rf"^--config {re.escape(str(path))}: key '{key}' is given twice"):
        build_config("digits", str(path))


def test_the_old_default_tc_estimator_is_taken_from_a_file_and_refused_as_a_flag(tmp_path):
    """Earlier versions' default tc_estimator "mws" fills every run's config.json: given
    back with --config under another objective than beta_tcvae, it is read as off; asked
    for by a flag (an override), it is the user's own inert setting, refused as any other."""
    path = tmp_path / "old.json"
    path.write_text('{"objective": {"name": "elbo", "tc_estimator": "mws"}}')
    assert build_config(config_file=str(path)).objective.tc_estimator == "stratified"
    with pytest.raises(ValueError, match=r"tc_estimator='mws' applies only to name='beta_tcvae', got name='elbo'"):
        build_config(overrides={"objective.tc_estimator": "mws"})
    with pytest.raises(ValueError, match=r"tc_estimator='mws' applies only to name='beta_tcvae'"):
        build_config(config_file=str(path), overrides={"objective.tc_estimator": "mws"})
    assert build_config(overrides={"objective.name": "beta_tcvae", "objective.tc_estimator": "mws"}
                        ).objective.tc_estimator == "mws"
