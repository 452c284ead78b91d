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
