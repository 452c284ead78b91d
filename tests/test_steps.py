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


def _diverges(config, run_dir, bad_calls, monkeypatch):
    """fit(config) with the training-mode decodes numbered ``bad_calls`` (1-based: one a
    step) made NaN; the TrainingDiverged message, or None when the run trains on."""
    import vaekit.models
    import vaekit.wiring
    from vaekit.train import TrainingDiverged, fit

    class VAE(vaekit.models.VAE):
        calls = 0

        def decode(self, z, x=None):
            out = super().decode(z)
            if self.training:
                type(self).calls += 1
                if type(self).calls in bad_calls:
                    out = out * float("nan")
            return out

    monkeypatch.setattr(vaekit.wiring, "VAE", VAE)
    try:
        fit(config, run_dir)
    except TrainingDiverged as e:
        return str(e).split(";")[0]
    return None


@pytest.mark.parametrize("case", ["apart", "across_the_short_batch", "from_the_start"])
def test_static_step_counts_non_finite_steps_in_a_row_as_the_eager_step(case, tmp_path, monkeypatch):
    """max_bad_steps counts non-finite steps in a row across the static steps and the eager
    step of a short last batch, and stops at once on a CPU: the same verdict, at the same
    step, with fast='static' as with fast='off'."""
    from vaekit.cli import build_config
    from vaekit.data import load_dataset

    overrides = {"train.epochs": 3, "train.progress": False, "model.hidden": (16,), "model.latent_dim": 2,
                 "train.batch_size": 64, "train.max_bad_steps": 4}
    n = load_dataset(build_config(overrides=overrides).data).train.shape[0]
    spe = math.ceil(n / 64)
    assert n % 64, "the test needs a short last batch"
    # Call spe is the first epoch's short batch (an eager step), call 2 spe the second's.
    bad = {"apart": {spe - 3, spe - 2, spe - 1, 2 * spe},              # 3 in a row, later one: trains on
           "across_the_short_batch": {spe, spe + 1, spe + 2, spe + 3},  # 4 in a row: stops
           "from_the_start": set(range(3, 1000))}[case]
    verdicts = [_diverges(build_config(overrides={**overrides, "train.fast": fast}), tmp_path / fast, bad,
                          monkeypatch) for fast in ("off", "static")]
    assert verdicts[0] == verdicts[1]
    assert (verdicts[0] is None) == (case == "apart")
    if case == "from_the_start":
        assert verdicts[0] == "4 non-finite steps in a row (at step 5)"


def test_stratified_tcvae_skips_a_last_batch_of_one(tmp_path):
    """The stratified estimator needs two examples: a last batch of one is left out of the
    epoch (it used to stop the run at the end of its first epoch, and again on resume)."""
    from vaekit.cli import build_config
    from vaekit.data import load_dataset
    from vaekit.train import fit

    overrides = {"train.epochs": 1, "train.progress": False, "model.hidden": (16,), "model.latent_dim": 2,
                 "objective.name": "beta_tcvae", "objective.tc_estimator": "stratified"}
    n = load_dataset(build_config(overrides=overrides).data).train.shape[0]
    batch = next(b for b in range(40, 200) if n % b == 1)
    result = fit(build_config(overrides={**overrides, "train.batch_size": batch}), tmp_path / "run")
    assert result.history[-1]["step"] == n // batch
    with pytest.raises(ValueError, match=r"train.batch_size must be at least 2 .* got 1"):
        fit(build_config(overrides={**overrides, "train.batch_size": 1}), tmp_path / "one")
    assert not (tmp_path / "one").exists()


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "cuda:", "gpu"])
def test_a_device_torch_cannot_parse_is_refused_when_the_config_is_made(device):
    """'cuda:x' was accepted and refused only when the run started."""
    with pytest.raises(ValueError, match=rf"TrainConfig\.device must be auto, cpu, cuda or cuda:N, got '{device}'"):
        TrainConfig(device=device)
    assert TrainConfig(device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("name, taken, refused, pattern", [
    ("graph_steps", 1024, 1025, r"an integer in \[1, 1024\], got 1025"),
    ("num_threads", 1024, 1025, r"an integer in \[0, 1024\], got 1025"),
    ("batch_size", 1, 0, r"an integer in \[1, 2147483647\], got 0"),
])
def test_the_step_settings_edges_are_taken_and_one_past_refused(name, taken, refused, pattern):
    assert getattr(TrainConfig(**{name: taken}), name) == taken
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name} must be {pattern}$"):
        TrainConfig(**{name: refused})


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_weight_decay_is_adams_l2_penalty_written_out_in_float64(weight_decay):
    """TrainConfig.weight_decay is Adam's (torch.optim.Adam's weight_decay: the L2 penalty
    added to the gradient, g + wd w, before the moments; not AdamW's decoupled decay): the
    optimiser fit builds (steps._adam) moves a float64 model's weights as Adam written out
    here, over three steps of given gradients."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(5,), latent_dim=2, hidden=(4,))).double()
    lr, (b1, b2), eps = 0.05, (0.9, 0.999), 1e-8
    opt = steps._adam(model, TrainConfig(lr=lr, weight_decay=weight_decay))
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    g = torch.Generator().manual_seed(1)
    for t in range(1, 4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for j, gr in enumerate(grads):
            gr = gr + weight_decay * w[j]
            m[j] = b1 * m[j] + (1 - b1) * gr
            v[j] = b2 * v[j] + (1 - b2) * gr * gr
            m_hat, v_hat = m[j] / (1 - b1**t), v[j] / (1 - b2**t)
            w[j] = w[j] - lr * m_hat / (v_hat.sqrt() + eps)
    for p, want in zip(params, w):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    assert all(group["weight_decay"] == weight_decay for group in opt.param_groups)
