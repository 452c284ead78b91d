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
