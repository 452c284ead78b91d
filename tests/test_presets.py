"""Every preset resolves to a valid configuration whose model builds and scores."""

import dataclasses

import pytest
import torch

from vaekit.cli import PRESETS as CLI_PRESETS
from vaekit.cli import build_config
from vaekit.config import GROUPS
from vaekit.models import VAE
from vaekit.presets import DEFAULT_PRESET, PRESETS


def test_the_default_is_a_preset_and_the_command_line_offers_them_all():
    assert DEFAULT_PRESET in PRESETS and CLI_PRESETS is PRESETS
    assert all(set(p) <= set(GROUPS) for p in PRESETS.values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_to_a_model_that_builds(name):
    cfg = build_config(name)
    for group, fields in PRESETS[name].items():
        for field, value in fields.items():
            got = getattr(getattr(cfg, group), field)
            assert (list(got) if isinstance(got, tuple) else got) == value, (group, field)
    model_cfg = dataclasses.replace(cfg.model, input_shape=(1, 28, 28) if name != "digits" else (1, 8, 8))
    model = VAE(model_cfg)
    x = torch.zeros(2, *model_cfg.input_shape)
    out = model(x)
    assert model.nll(out.decoder_out, x).shape == (2,)


# docs/benchmarks.md: "The MNIST presets train on dynamically binarized data"
_MNIST = {"data.dataset": "mnist", "data.binarize": "dynamic"}
_PIXELCNN = {  # docs/benchmarks.md, "mnist-pixelcnn on the CPU"; README: "that MLP" (mnist-large's)
    **_MNIST, "model.hidden": (512, 512), "model.latent_dim": 50, "model.activation": "elu",
    "model.likelihood": "bernoulli", "model.pixelcnn_layers": 4, "model.pixelcnn_width": 32,
    "train.batch_size": 100, "train.lr": 1e-3, "train.lr_schedule": "cosine",
    "objective.beta": 1.0, "objective.beta_schedule": "linear", "objective.warmup_steps": 5000,
    "data.val_size": 10000,  # 5,000 steps are 10 epochs of 50,000 images
}
# What README.md, docs/benchmarks.md, docs/disentanglement.md, benchmarks/README.md and the
# presets' comments say of each preset, written out: a change here is a change to those texts.
DOCUMENTED = {
    "digits": {"data.dataset": "digits", "data.binarize": "dynamic", "train.epochs": 150,  # README's preset list
               "train.batch_size": 64, "train.lr": 2e-3, "train.lr_schedule": "cosine",
               "model.arch": "mlp", "model.hidden": (256, 128), "model.latent_dim": 8, "model.activation": "elu"},
    "mnist-burda": {**_MNIST, "model.arch": "mlp", "model.hidden": (200, 200), "model.latent_dim": 50,
                    "model.activation": "tanh", "model.likelihood": "bernoulli", "train.batch_size": 100,
                    "train.lr": 1e-3, "train.lr_schedule": "cosine", "train.epochs": 200, "objective.name": "elbo",
                    "data.val_size": 10000, "data.split": "tail"},  # 50,000 training images, the last 10,000 held out
    "mnist-large": {**_MNIST, "model.arch": "mlp", "model.hidden": (512, 512), "model.latent_dim": 50,
                    "model.activation": "elu", "objective.name": "iwae", "objective.iw_samples": 5},
    "mnist-pixelcnn": _PIXELCNN,
    "mnist-pixelcnn-late": {**_PIXELCNN, "model.pixelcnn_fusion": "late"},
}


def test_the_presets_are_what_the_docs_say():
    assert sorted(DOCUMENTED) == sorted(PRESETS)
    for name, fields in DOCUMENTED.items():
        cfg = build_config(name)
        got = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in fields}
        assert got == fields, name
