"""Tests of vaekit.model_config: the checks of ModelConfig's fields, and that vaekit.models
still gives the config and its choices."""

import math
import pickle

import pytest

import vaekit.model_config
import vaekit.models
from vaekit.models import ModelConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"arch": "rnn"}, "arch"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": 2.5}, "latent_dim"),
        ({"hidden": (32, -1)}, "hidden"),
        ({"activation": "swish2"}, "activation"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"decoder_variance": "learned"}, "decoder_variance"),
        ({"arch": "conv", "input_shape": (784,)}, "input_shape"),
        ({"logvar_limit": math.inf}, "logvar_limit"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


def test_the_config_and_its_choices_are_still_importable_from_models():
    """vaekit.models re-exports the config module's names: the same objects, not copies."""
    for name in vaekit.model_config.__all__:
        assert name in vaekit.models.__all__
        assert getattr(vaekit.models, name) is getattr(vaekit.model_config, name), name


def test_a_config_pickled_under_its_old_home_still_loads():
    """A config pickled before the split names vaekit.models.ModelConfig; the re-export
    resolves it. (Protocol 0 writes the class as text, so the old name can be put back.)"""
    cfg = ModelConfig(input_shape=(1, 8, 8), latent_dim=3, hidden=(16,))
    blob = pickle.dumps(cfg, protocol=0)
    old = blob.replace(b"cvaekit.model_config\nModelConfig\n", b"cvaekit.models\nModelConfig\n")
    assert old != blob
    assert pickle.loads(old) == cfg


@pytest.mark.parametrize("kwargs, pattern", [
    ({"pixelcnn_width": 32}, r"ModelConfig\.pixelcnn_width=32 has no effect with pixelcnn_layers=0; use pixelcnn_layers > 0$"),
    ({"pixelcnn_fusion": "late"}, r"pixelcnn_fusion='late' has no effect with pixelcnn_layers=0"),
    ({"fixed_logvar": -1.0}, r"fixed_logvar=-1\.0 has no effect with likelihood='bernoulli', decoder_variance='fixed'"),
    ({"fixed_logvar": 0.5, "likelihood": "mse"}, r"fixed_logvar=0\.5 has no effect with likelihood='mse'"),
    ({"fixed_logvar": 0.5, "likelihood": "gaussian", "decoder_variance": "optimal"},
     r"with likelihood='gaussian', decoder_variance='optimal'; use likelihood='gaussian' with decoder_variance "
     r"'fixed' or 'learned'$"),
])
def test_a_setting_that_would_change_nothing_is_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"pixelcnn_layers": 2, "pixelcnn_width": 32, "pixelcnn_fusion": "late"},
    {"likelihood": "gaussian", "fixed_logvar": -1.0},
    {"likelihood": "gaussian", "decoder_variance": "learned", "fixed_logvar": -1.0},  # the learned one's start
    {"pixelcnn_width": 64, "pixelcnn_fusion": "early", "fixed_logvar": 0.0},  # the defaults, as a saved config has them
])
def test_the_same_settings_where_they_act_are_taken(kwargs):
    config = ModelConfig(**kwargs)
    assert all(getattr(config, k) == v for k, v in kwargs.items())


def test_a_model_saved_with_a_setting_that_had_no_effect_still_loads(tmp_path):
    """Earlier versions accepted a pixelcnn_width without a head (and wrote it into the
    model's config.json); the model loads with the fields at their defaults and the
    weights as saved."""
    import json

    import torch

    from vaekit.io import load_model, save_model

    torch.manual_seed(0)
    model = vaekit.models.VAE(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(8,)))
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"].update(pixelcnn_width=32, pixelcnn_fusion="late", fixed_logvar=3.0)
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="pixelcnn_width=32 has no effect"):
        ModelConfig(**{k: v for k, v in meta["model"].items() if k not in ("input_shape", "hidden")})
    loaded = load_model(tmp_path)
    assert (loaded.config.pixelcnn_width, loaded.config.pixelcnn_fusion, loaded.config.fixed_logvar) == (64, "early", 0.0)
    saved = model.state_dict()  # the same model: every weight as saved
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("taken, refused, pattern", [
    ({"logvar_limit": math.ulp(0.0)}, {"logvar_limit": 0.0},
     r"logvar_limit must be a number in \(0, 80\] .*, got 0\.0$"),
    ({"logvar_limit": 80.0}, {"logvar_limit": 80.001}, r"logvar_limit must be a number in \(0, 80\] .*, got 80\.001$"),
    ({"likelihood": "gaussian", "fixed_logvar": -80.0}, {"likelihood": "gaussian", "fixed_logvar": -80.001},
     r"fixed_logvar must be a number in \[-80, 80\] .*, got -80\.001$"),
    ({"likelihood": "gaussian", "fixed_logvar": 80.0}, {"likelihood": "gaussian", "fixed_logvar": 80.001},
     r"fixed_logvar must be a number in \[-80, 80\] .*, got 80\.001$"),
    ({"pixelcnn_layers": 1000}, {"pixelcnn_layers": 1001},
     r"pixelcnn_layers must be an integer in \[0, 1000\], got 1001$"),
])
def test_the_ranges_edges_are_taken_and_one_past_refused(taken, refused, pattern):
    config = ModelConfig(**taken)
    assert all(getattr(config, k) == v for k, v in taken.items())
    with pytest.raises(ValueError, match=r"ModelConfig\." + pattern):
        ModelConfig(**refused)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"arch": "conv", "hidden": ()}, r"ModelConfig\.hidden must be at least one channel count for arch 'conv', got \(\)$"),
    ({"arch": "conv", "hidden": []}, r"ModelConfig\.hidden must be at least one channel count for arch 'conv', got \(\)$"),
    ({"arch": "conv", "input_shape": (784,)},
     r"ModelConfig\.input_shape must be \(C, H, W\) for arch 'conv', got \(784,\)$"),
    ({"arch": "conv", "input_shape": (1, 28, 28, 1)},
     r"ModelConfig\.input_shape must be \(C, H, W\) for arch 'conv', got \(1, 28, 28, 1\)$"),
], ids=["hidden-empty", "hidden-empty-list", "input-flat", "input-4d"])
def test_the_conv_architecture_refuses_no_channels_or_an_input_that_is_not_an_image(kwargs, pattern):
    """arch='conv' needs a channel count for each stride-2 convolution (an empty hidden would
    build a model of no convolution at all) and (C, H, W) inputs: the error names the field,
    what conv expects and the value given. The same values are taken by the MLP."""
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kwargs)
    mlp = ModelConfig(**{**kwargs, "arch": "mlp"})
    assert mlp.hidden == tuple(kwargs.get("hidden", mlp.hidden))
    assert ModelConfig(arch="conv", hidden=(1,), input_shape=(1, 1, 1)).hidden == (1,)  # the least it takes
