"""vaekit.steps: the learning-rate schedule, the training noise's blocks, when a block of
static steps may run. The steps themselves are compared with each other and with the eager
loop in test_fast.py (static, compiled, blocks) and test_distributed.py (data-parallel)."""

import math

import pytest
import torch

import vaekit.steps as steps
from vaekit.batching import BatchIterator
from vaekit.config import TrainConfig


def test_cosine_learning_rate_is_the_closed_form():
    cfg = TrainConfig(lr=0.01, lr_schedule="cosine")
    total = 40
    for step in (0, 1, 13, 20, 39, 40, 55):
        expected = 0.5 * 0.01 * (1 + math.cos(math.pi * min(step, total) / total))
        assert steps.lr_at(step, total, cfg) == pytest.approx(expected, abs=1e-15)
    assert steps.lr_at(7, total, TrainConfig(lr=0.01)) == 0.01


@pytest.mark.parametrize("iw_shape", [(), (3,)])
def test_training_noise_comes_in_blocks_and_shards_like_one_process(iw_shape):
    """Step s's noise is part s % K of one draw for K steps, seeded by (seed, s // K); the
    ranks' slices of it concatenate to the noise of one process with the combined batch."""
    from vaekit.batching import block_steps, mix_seed

    x = torch.rand(70, 4)
    world, b, d, seed = 3, 4, 2, 5
    k = block_steps(math.prod(iw_shape) * world * b * d)
    assert k == 32

    def noises(batch_size, rank=0, world_size=1):
        it = BatchIterator(x, batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=False)
        obj = steps._Objective(None, None, len(x), it, seed, torch.device("cpu"))
        out = []
        for epoch in range(7):  # 6 steps an epoch (the last of 10 examples): 42 steps, two blocks
            it.set_epoch(epoch)
            for xb in it:
                out.append(obj.noise(len(out), (*iw_shape, xb.shape[0], d)).clone())
        return out

    single = noises(world * b)
    ranks = [noises(b, r, world) for r in range(world)]
    assert len(single) == 42
    for s, ref in enumerate(single):
        assert torch.equal(torch.cat([r[s] for r in ranks], dim=-2), ref)
        g = torch.Generator().manual_seed(mix_seed(seed, steps._NOISE_STREAM, s // k))
        block = torch.randn(k, *iw_shape, world * b, d, generator=g)
        assert torch.equal(ref, block[s % k][..., : ref.shape[-2], :])


@pytest.mark.parametrize("position, step, total, every, k, fits", [
    (1, 0, 100, 0, 4, True),      # the first 4 of 10 full batches
    (7, 6, 100, 0, 4, True),      # batches 6-9: the last full ones
    (8, 7, 100, 0, 4, False),     # batches 7-10: the 11th is the short last batch
    (1, 0, 3, 0, 4, False),       # the run ends after 3 steps
    (1, 0, 100, 4, 4, True),      # a checkpoint after 4 steps: at the block's end
    (2, 1, 100, 4, 4, False),     # steps 2-5: the checkpoint after step 4 falls inside
])
def test_a_block_runs_only_where_k_full_steps_fit(position, step, total, every, k, fits):
    """_block_fits: all k batches full, within the run, no step-count checkpoint inside."""
    batches = BatchIterator(torch.rand(105, 2), 10)  # 10 full batches and one of 5
    batches.position = position
    run = type("Run", (), {"batches": batches, "step": step, "total_steps": total,
                           "tc": TrainConfig(checkpoint_every=every)})()
    assert steps._block_fits(run, k) == fits
