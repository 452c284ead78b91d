import copy
import itertools
import math

import numpy as np
import pytest
import torch

import vaekit.disentangle as dis

from vaekit.disentangle import (
    FactorSampler,
    SpritesFactors,
    _disentanglement_completeness,
    beta_vae_score,
    dci,
    factor_vae_score,
    iter_all,
    make_sprites,
    mig,
    render_sprites,
    sample_codes,
    sample_factors,
    sprite_factor_sizes,
)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are small; on a loaded machine idle OpenMP workers spinning for them
    # made the file several times slower. Restored for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- sprites


def _sprite(shape=2, scale=5, angle=0, x=16, y=16):
    return torch.tensor([[shape, scale, angle, x, y]])


def test_make_sprites_deterministic_and_binary():
    images, factors = make_sprites(64, seed=3)
    assert images.shape == (64, 1, 64, 64) and images.dtype == torch.float32
    assert factors.shape == (64, 5) and factors.dtype == torch.long
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert (factors < torch.tensor(sprite_factor_sizes)).all() and (factors >= 0).all()
    again, factors_again = make_sprites(64, seed=3)
    assert torch.equal(images, again) and torch.equal(factors, factors_again)
    assert torch.equal(render_sprites(factors), images)
    assert not torch.equal(make_sprites(64, seed=4)[1], factors)
    # every sprite is drawn and stays off the border
    assert (images.sum((1, 2, 3)) > 0).all()
    assert images[..., [0, -1], :].sum() == 0 and images[..., :, [0, -1]].sum() == 0


def test_shapes_differ_and_unrotated_square_is_exact():
    images = render_sprites(torch.cat([_sprite(shape=s) for s in range(3)]))
    for a, b in itertools.combinations(range(3), 2):
        assert (images[a] != images[b]).sum() > 20
    # square of half-size 10 px centred on the pixel corner (32, 32): rows/cols 22..41
    expected = torch.zeros(64, 64)
    expected[22:42, 22:42] = 1
    assert torch.equal(images[0, 0], expected)
    # the heart's tip points down (rows grow downwards): its lowest row is its narrowest
    rows = images[2, 0].sum(1)
    rows = rows[rows > 0]
    assert rows[-1] < rows[0] and rows[-1] == rows.min()
    # ellipse area close to pi * 10 * 5 pixels, heart between the two
    area = images.sum((1, 2, 3))
    assert abs(area[1] - math.pi * 50) < 8 and area[1] < area[2] < area[0]


@pytest.mark.parametrize("shape", [0, 1, 2])
def test_pixel_count_rises_with_scale(shape):
    images = render_sprites(torch.cat([_sprite(shape=shape, scale=s, angle=3) for s in range(6)]))
    counts = images.sum((1, 2, 3))
    assert (counts[1:] > counts[:-1]).all()
    # area grows like scale^2: (1 / 0.5)^2 = 4 up to rasterisation
    assert 3.3 < counts[-1] / counts[0] < 4.8


def test_position_moves_the_centroid():
    factors = torch.cat([_sprite(shape=1, angle=7, x=x, y=y) for x, y in [(0, 0), (31, 0), (0, 31), (10, 20)]])
    images = render_sprites(factors)[:, 0]
    grid = torch.arange(64.0) + 0.5
    cx = (images.sum(1) * grid).sum(1) / images.sum((1, 2))
    cy = (images.sum(2) * grid).sum(1) / images.sum((1, 2))
    # an ellipse is symmetric about its centre, so the centroid is the centre 16 + index
    torch.testing.assert_close(cx, factors[:, 3].float() + 16, atol=0.3, rtol=0)
    torch.testing.assert_close(cy, factors[:, 4].float() + 16, atol=0.3, rtol=0)
    # translation by whole pixels moves the image and nothing else
    assert torch.equal(images[0, :30, :30], images[3, 20:50, 10:40])


def test_rotation_and_symmetries():
    angles = torch.arange(40)
    hearts = render_sprites(torch.cat([_sprite(shape=2, angle=int(a)) for a in angles]))
    assert len({h.numpy().tobytes() for h in hearts}) == 40  # every orientation of a heart differs
    assert not torch.equal(hearts[0], hearts[1])
    assert torch.equal(hearts[20], hearts[0].flip(-1, -2))  # a half turn about a pixel corner
    square = render_sprites(torch.cat([_sprite(shape=0, angle=a) for a in (0, 10, 3)]))
    assert torch.equal(square[0], square[1]) and not torch.equal(square[0], square[2])
    ellipse = render_sprites(torch.cat([_sprite(shape=1, angle=a) for a in (0, 20, 10)]))
    assert torch.equal(ellipse[0], ellipse[1])
    assert torch.equal(ellipse[2, 0], ellipse[0, 0].T)  # a quarter turn swaps the axes


def test_make_sprites_draws_uniform_independent_factors():
    """Chi-square tests on 20,000 draws: each factor uniform over its values, each pair of
    factors independent. The seed is fixed, so the loose threshold cannot flake."""
    from scipy.stats import chi2_contingency, chisquare

    factors = make_sprites(20000, seed=0)[1].numpy()
    for k, size in enumerate(sprite_factor_sizes):
        counts = np.bincount(factors[:, k], minlength=size)
        assert len(counts) == size and chisquare(counts).pvalue > 1e-3, (k, counts)
    for a, b in itertools.combinations(range(5), 2):
        table = np.zeros((sprite_factor_sizes[a], sprite_factor_sizes[b]))
        np.add.at(table, (factors[:, a], factors[:, b]), 1)
        assert chi2_contingency(table).pvalue > 1e-3, (a, b)


def test_orientation_turns_the_ellipse_axis_and_scale_quadruples_the_square_area():
    # principal axis from second moments of the pixel centres (x right, y down); the
    # ellipse is symmetric under a half turn, so angles compare mod 180 degrees
    ellipses = render_sprites(torch.cat([_sprite(shape=1, angle=i, x=7, y=9) for i in range(40)]))
    for i, img in enumerate(ellipses):
        ys, xs = img[0].nonzero(as_tuple=True)
        x, y = xs.double() - xs.double().mean(), ys.double() - ys.double().mean()
        axis = 0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())
        error = (axis - 2 * math.pi * i / 40 + math.pi / 2) % math.pi - math.pi / 2
        assert abs(math.degrees(error)) < 2.0, (i, math.degrees(error))
    # half-size 10 * scale: (1 / 0.5)^2 = 4 times the area, averaged over the orientations
    # (one rotated square's pixel count is off by up to 6 %)
    squares = render_sprites(torch.cat([_sprite(shape=0, scale=s, angle=i) for s in (0, 5) for i in range(40)]))
    small, large = squares.sum((1, 2, 3)).view(2, 40).mean(1)
    assert large / small == pytest.approx(4.0, rel=0.03)


def test_render_validates_factors():
    with pytest.raises(ValueError, match=r"factors\[:, 2\] must lie in \[0, 40\)"):
        render_sprites(torch.tensor([[0, 0, 40, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        render_sprites(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="long"):
        render_sprites(torch.zeros(2, 5))


def test_iter_all_order_and_sampler():
    images, factors = next(iter_all(batch_size=40))
    assert images.dtype == torch.uint8 and images.shape == (40, 1, 64, 64)
    assert (factors[:32, :3] == 0).all() and torch.equal(factors[:32, 4], torch.arange(32))
    assert torch.equal(factors[32], torch.tensor([0, 0, 0, 1, 0]))
    assert torch.equal(images, render_sprites(factors, dtype=torch.uint8))
    sampler = SpritesFactors()
    gen = torch.Generator().manual_seed(0)
    obs, f = sampler.sample_with_fixed(16, 0, 2, gen)
    assert (f[:, 0] == 2).all() and torch.equal(obs, render_sprites(f))
    f1 = sample_factors(10, torch.Generator().manual_seed(1))
    _, f2 = sampler.sample_with_fixed(10, 3, f1[:, 3], gen)
    assert torch.equal(f2[:, 3], f1[:, 3])


# ---------------------------------------------------------------- metrics on a small factor world

SIZES = (4, 5, 6, 8)
_SIZES = torch.tensor(SIZES, dtype=torch.float32)


def _standardise(factors):
    return (factors - (_SIZES - 1) / 2) / ((_SIZES**2 - 1) / 12).sqrt()  # zero mean, unit variance


def perfect(noise=0.05, seed=1):
    """One code per factor plus one collapsed (constant) code."""
    gen = torch.Generator().manual_seed(seed)

    def representation(obs):
        z = _standardise(obs) + noise * torch.randn(obs.shape, generator=gen)
        return torch.cat([z, torch.zeros(len(z), 1)], 1)

    return representation


ROTATION = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))[0]


def rotated(obs):
    z = perfect()(obs)
    return torch.cat([z[:, :4] @ ROTATION, z[:, 4:]], 1)


def shuffled(seed=2):
    gen = torch.Generator().manual_seed(seed)
    rep = perfect()
    return lambda obs: (z := rep(obs))[torch.randperm(len(z), generator=gen)]


@pytest.fixture(scope="module")
def codes():
    sampler = FactorSampler(SIZES)
    out = {}
    for name, rep in [("perfect", perfect()), ("rotated", rotated), ("shuffled", shuffled())]:
        out[name] = sample_codes(rep, sampler, 2000, seed=0) + sample_codes(rep, sampler, 1000, seed=1)
    return out


def test_mig_hand_computed():
    grid = np.array(list(itertools.product(range(4), range(3))))  # full product: factors exactly independent
    f0, f1 = grid.T
    assert mig(np.stack([f0, f1], 1), grid) == pytest.approx(1.0)
    assert mig(np.stack([f0, f0], 1), grid) == pytest.approx(0.0, abs=1e-12)
    # factor 0: I = [log 2, 0, log 4] / log 4 -> gap 1/2; factor 1: I = [0, 1, 0] -> gap 1
    assert mig(np.stack([f0 // 2, f1, f0], 1), grid) == pytest.approx(0.75)
    assert mig(np.stack([f0, np.zeros(12)], 1), grid[:, :1]) == pytest.approx(1.0)
    # a monotone transform of the code keeps the bins, so the score
    assert mig(np.stack([np.exp(f0), f1**3], 1), grid) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rows"):
        mig(np.zeros((5, 2)), grid)


def test_mig_matches_plug_in_entropy_formula(codes):
    # second computation: MI from the joint histogram, I = sum p(a,b) log p(a,b) / (p(a) p(b))
    c, f = codes["perfect"][:2]
    binned = np.digitize(c[:, 0], np.linspace(c[:, 0].min(), c[:, 0].max(), 21)[1:-1])
    joint = np.zeros((binned.max() + 1, SIZES[0]))
    np.add.at(joint, (binned, f[:, 0]), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    info = (p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum()
    entropy = -(pb[pb > 0] * np.log(pb[pb > 0])).sum()
    # the other codes carry no information on factor 0, so its gap is I / H up to sampling noise
    per_factor_gap = mig(c, f[:, :1])
    assert per_factor_gap == pytest.approx(info / entropy, abs=0.02)


def test_mig_orders_representations(codes):
    scores = {name: mig(c, f) for name, (c, f, _, _) in codes.items()}
    assert scores["perfect"] > 0.9
    assert scores["rotated"] < scores["perfect"] - 0.4
    assert scores["shuffled"] < 0.05


def test_dci_formula_on_hand_matrices():
    assert _disentanglement_completeness(np.eye(3)) == pytest.approx((1.0, 1.0))
    assert _disentanglement_completeness(np.ones((3, 3))) == pytest.approx((0.0, 0.0))
    # one code explains both factors equally: not disentangled, complete; a dead code weighs nothing
    assert _disentanglement_completeness(np.array([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx((0.0, 1.0))
    # two codes share one factor equally: code-wise disentangled, factor 0 half complete (H_2 = 1)
    r = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]) / 4
    d, c = _disentanglement_completeness(r)
    assert d == pytest.approx(1.0)
    assert c == pytest.approx((1 - math.log(2) / math.log(3) + 1.0) / 2)
    # a factor no code predicts (a constant one: the forest's importances are all 0) is
    # left out of the completeness, as a code with no importance is out of D
    assert _disentanglement_completeness(np.diag([1.0, 1.0, 0.0])) == pytest.approx((1.0, 1.0))
    # factors weigh by their share: factor 0 (weight 3/4) complete, factor 1 (1/4) spread
    d, c = _disentanglement_completeness(np.array([[3.0, 0.5], [0.0, 0.5]]))
    assert c == pytest.approx(3 / 4 * 1.0 + 1 / 4 * 0.0)


def test_dci_of_a_perfect_code_ignores_a_constant_factor():
    """Through the forests: a constant factor column gets no importance and does not pull
    the completeness of a perfect code below 1."""
    rng = np.random.default_rng(0)
    factors = np.column_stack([rng.integers(0, 4, 400), rng.integers(0, 3, 400), np.zeros(400, dtype=int)])
    codes = factors[:, :2] + 0.01 * rng.standard_normal((400, 2))
    scores = dci(codes[:300], factors[:300], codes[300:], factors[300:])
    assert scores["disentanglement"] == pytest.approx(1.0, abs=1e-6)
    assert scores["completeness"] == pytest.approx(1.0, abs=1e-6)


def test_dci_orders_representations(codes):
    scores = {name: dci(*v, n_estimators=10) for name, v in codes.items()}
    perfect_, rotated_, shuffled_ = scores["perfect"], scores["rotated"], scores["shuffled"]
    assert perfect_["disentanglement"] > 0.9 and perfect_["completeness"] > 0.9
    assert perfect_["informativeness"] > 0.95
    assert rotated_["disentanglement"] < perfect_["disentanglement"] - 0.4
    assert rotated_["informativeness"] > 0.8  # a rotation keeps the information
    assert shuffled_["disentanglement"] < 0.1
    chance = np.mean([1 / s for s in SIZES])
    assert shuffled_["informativeness"] < chance + 0.1


@pytest.mark.parametrize("score", [factor_vae_score, beta_vae_score])
def test_intervention_scores(score):
    sampler = FactorSampler(SIZES)
    kwargs = dict(n_train=200, n_eval=200, batch_size=32, seed=0)
    if score is factor_vae_score:
        kwargs["n_reference"] = 1000
    top = score(perfect(), sampler, **kwargs)
    assert top > 0.95
    assert score(perfect(), sampler, **kwargs) == top  # seeded
    chance = score(shuffled(), sampler, **kwargs)
    assert chance < 1 / len(SIZES) + 0.15


def test_sample_codes_draws_many_observations_in_bounded_sampler_calls(monkeypatch):
    """Past _SAMPLE_CHUNK observations the sampler is called chunk by chunk with one
    generator (bounded memory: 10**7 sprites at once would be 164 GB); up to it, one call
    as before."""
    import vaekit.disentangle as dis

    sampler, calls = FactorSampler(SIZES), []

    def counting(n, gen):
        calls.append(n)
        return sampler(n, gen)

    counting.factor_sizes = sampler.factor_sizes
    rep = perfect()
    one_codes, one_factors = sample_codes(rep, counting, 700, seed=3)
    assert calls == [700]
    monkeypatch.setattr(dis, "_SAMPLE_CHUNK", 300)
    calls.clear()
    codes, factors = sample_codes(rep, counting, 700, seed=3)
    assert calls == [300, 300, 100] and codes.shape == one_codes.shape and factors.shape == one_factors.shape
    assert ((factors >= 0) & (factors < np.array(SIZES))).all()
    assert not np.array_equal(factors[:300], factors[300:600])  # each chunk a fresh draw of the one generator


def test_factor_vae_prunes_collapsed_codes():
    sampler = FactorSampler(SIZES)
    rep = perfect()
    gen = torch.Generator().manual_seed(5)

    def dead_unit(obs):
        # a nearly dead unit that rarely fires: about half the batches of 32 see it constant,
        # so its variance there is 0 and it would win their argmin vote whatever the factor
        fires = 1e-3 * (torch.rand(len(obs), 1, generator=gen) < 0.02)
        return torch.cat([rep(obs)[:, :4], fires], 1)

    kwargs = dict(n_reference=2000, n_train=200, n_eval=200, batch_size=32)
    assert factor_vae_score(dead_unit, sampler, **kwargs) > 0.95
    assert factor_vae_score(dead_unit, sampler, prune_fraction=0.0, **kwargs) < 0.8
    # an exactly constant code (the one in perfect()) is dropped even with prune_fraction=0
    assert factor_vae_score(rep, sampler, prune_fraction=0.0, **kwargs) > 0.95


def test_factor_vae_pruning_depends_on_the_codes_relative_scales_as_documented():
    """An informative dimension 25 times narrower than the widest falls under the default
    prune_fraction (0.05) and the score of a perfectly disentangled code drops; with
    prune_fraction=0 (only constant codes dropped) the score is scale-free again."""
    sampler, rep = FactorSampler(SIZES), perfect()
    scale = torch.ones(rep(sampler(1, torch.Generator().manual_seed(0))[0]).shape[1])
    scale[0] = 25.0
    wide = lambda obs: rep(obs) * scale  # noqa: E731
    kwargs = dict(n_reference=2000, n_train=200, n_eval=200, batch_size=32)
    assert factor_vae_score(wide, sampler, **kwargs) < 0.8
    assert factor_vae_score(wide, sampler, prune_fraction=0.0, **kwargs) > 0.95


def test_metrics_on_sprites_with_image_moments():
    # a hand-made representation of images: the centroid and the area of the sprite
    def moments(images):
        mass = images.sum((1, 2, 3))
        grid = torch.arange(64.0)
        cx = (images.sum((1, 2)) * grid).sum(1) / mass
        cy = (images.sum((1, 3)) * grid).sum(1) / mass
        return torch.stack([cx, cy, mass.sqrt()], 1)

    codes, factors = sample_codes(moments, SpritesFactors(), 600, seed=0, chunk_size=300)
    # the centroids carry the positions (20 bins for 32 positions and 600 samples keep the
    # score well below 1); none of the codes sees the orientation
    assert mig(codes, factors[:, 3:]) > 0.45
    assert mig(codes, factors[:, 2:3]) < 0.1
    assert factor_vae_score(moments, SpritesFactors(), n_reference=300, n_train=40, n_eval=40, batch_size=16) > 0.25


def test_evaluate_disentanglement_runs_on_a_vae_and_rewards_a_factor_encoder(tmp_path):
    """End to end on the sprites: a model whose code is (a noisy copy of) the position
    factors scores above an untrained VAE on MIG; all scores lie in [0, 1]."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(arch="mlp", input_shape=(1, 64, 64), latent_dim=3, hidden=(8,)))
    scores = dis.evaluate_disentanglement(model, seed=0, n_codes=2000, quick=True)
    assert set(scores) >= {"mig", "dci_disentanglement", "dci_completeness", "dci_informativeness",
                           "factor_vae", "beta_vae"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    # a float64 (or bfloat16) model is fed sprites of its own dtype (they were float32)
    for dtype in (torch.float64, torch.bfloat16):
        other = dis.evaluate_disentanglement(copy.deepcopy(model).to(dtype), seed=0, n_codes=400, quick=True)
        assert set(other) == set(scores) and all(0.0 <= v <= 1.0 for v in other.values())

    class Centroid(VAE):
        """Posterior mean = the sprite's pixel centroid (x, y) and its area: a near-oracle code."""

        def encode_params(self, x):
            img = x.reshape(len(x), 64, 64)
            ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
            mass = img.sum((1, 2)).clamp_min(1.0)
            cx = (img * xs).sum((1, 2)) / mass
            cy = (img * ys).sum((1, 2)) / mass
            mu = torch.stack([cx, cy, mass / 100.0], 1)
            return mu, torch.zeros_like(mu)

    oracle = Centroid(ModelConfig(arch="mlp", input_shape=(1, 64, 64), latent_dim=3, hidden=(8,)))
    good = dis.evaluate_disentanglement(oracle, seed=0, n_codes=2000, quick=True)
    assert good["mig"] > scores["mig"] + 0.1


def test_evaluate_disentanglement_quick_ceiling_and_chance_on_the_sprites(monkeypatch):
    """A code equal to the true factors of each sprite scores 1 on DCI, FactorVAE and beta-VAE,
    and MIG 0.828, its ceiling with quick=True (docs/disentanglement.md); pure noise scores chance."""
    from vaekit.models import VAE, ModelConfig

    gen = torch.Generator().manual_seed(123)

    class Noise(VAE):
        def encode_params(self, x):
            mu = torch.randn(len(x), 10, generator=gen)
            return mu, torch.zeros_like(mu)

    config = ModelConfig(arch="mlp", input_shape=(1, 64, 64), latent_dim=10, hidden=())
    chance = dis.evaluate_disentanglement(Noise(config), seed=0, quick=True)
    assert chance["mig"] < 0.05 and chance["dci_disentanglement"] < 0.05
    assert chance["factor_vae"] == pytest.approx(0.2, abs=0.15)  # 1 / 5 factors
    assert chance["beta_vae"] == pytest.approx(0.2, abs=0.15)
    assert chance["dci_informativeness"] == pytest.approx(np.mean([1 / s for s in sprite_factor_sizes]), abs=0.04)

    drawn = []  # (sprites, factors) in the order the sampler renders them

    class Recording(SpritesFactors):
        def __init__(self):
            super().__init__()
            render = self.render

            def recording(factors):
                drawn.append((render(factors), factors))
                return drawn[-1][0]

            self.render = recording

    class Oracle(VAE):
        def encode_params(self, x):
            obs, factors = (torch.cat(t) for t in zip(*drawn))
            assert torch.equal(x, obs[: len(x)])  # the sprites come back in the order drawn
            drawn[:] = [(obs[len(x):], factors[len(x):])]
            mu = factors[: len(x)].float()
            return mu, torch.zeros_like(mu)

    monkeypatch.setattr(dis, "SpritesFactors", Recording)
    top = dis.evaluate_disentanglement(Oracle(config), seed=0, quick=True)
    assert sum(len(f) for _, f in drawn) == 0  # every sprite drawn was encoded
    # 20 equal-width bins hold 2 orientations each and 1 or 2 positions (12 bins of 2, 8 of
    # 1): without sampling bias the gaps are 1, 1, log 20 / log 40 and, in bits,
    # (0.75 * 4 + 0.25 * 5) / 5 = 0.85 twice; on 1,000 codes the runner-up's plug-in
    # information is biased up, which lowers MIG further
    ceiling = np.mean([1, 1, math.log(20) / math.log(40), 0.85, 0.85])
    assert top["mig"] < ceiling and top.pop("mig") == pytest.approx(0.828, abs=0.02)
    assert top == pytest.approx(dict.fromkeys(top, 1.0))


def test_dci_takes_any_seed_the_command_line_takes(codes):
    # scikit-learn's random_state stops at 2**32 - 1; vaekit evaluate --seed goes further
    perfect = codes["perfect"]
    assert dci(*perfect, n_estimators=2, seed=2**32 - 1) == dci(*perfect, n_estimators=2, seed=2**32 - 1)


# ---------------------------------------------------------------- bad arguments

_FS = FactorSampler((3, 4))


@pytest.mark.parametrize("call, error, match", [
    (lambda: make_sprites(10**8), ValueError, r"n must be an int in \[0, 737280\], got 100000000"),
    (lambda: make_sprites(2, seed="a"), TypeError, "seed must be an int, got str"),
    (lambda: make_sprites(2, seed=1.5), TypeError, "seed must be an int, got float"),
    (lambda: make_sprites(2, seed=2**70), ValueError, r"seed must be an int in \[0, 18446744073709551615\]"),
    (lambda: sample_factors(10**9), ValueError, r"n must be an int in \[0, 10000000\], got 1000000000"),
    (lambda: sample_factors(3, factor_sizes=(3, 0)), ValueError, r"factor_sizes\[1\] must be an int >= 1, got 0"),
    (lambda: sample_factors(3, factor_sizes=(-2,)), ValueError, r"factor_sizes\[0\] must be an int >= 1, got -2"),
    (lambda: sample_factors(3, factor_sizes=5), TypeError, "factor_sizes must be a sequence of ints >= 1, got int"),
    (lambda: render_sprites(torch.zeros(2, 5, dtype=torch.long), dtype="float32"), TypeError,
     "dtype must be a torch.dtype, got str"),
    (lambda: iter_all(2, dtype="uint8"), TypeError, "dtype must be a torch.dtype, got str"),  # at the call
    (lambda: iter_all(0), ValueError, "batch_size must be a positive int, got 0"),
    (lambda: FactorSampler(5), TypeError, "factor_sizes must be a sequence"),
    (lambda: FactorSampler(()), ValueError, "factor_sizes must hold at least one"),
    (lambda: FactorSampler((3, True)), TypeError, r"factor_sizes\[1\] must be an int, got bool"),
    (lambda: FactorSampler((3,), render=5), TypeError, "render must be callable"),
    (lambda: _FS.sample_with_fixed(3, 1.5, 0), TypeError, "factor_index must be an int, got float"),
    (lambda: _FS.sample_with_fixed(3, "0", 0), TypeError, "factor_index must be an int, got str"),
    (lambda: _FS.sample_with_fixed(3, 2, 0), ValueError, r"factor_index must be an int in \[0, 1\], got 2"),
    (lambda: _FS.sample_with_fixed(3, 0, [0, 1]), TypeError, "value must be an int or an integer tensor"),
    (lambda: _FS.sample_with_fixed(3, 0, 1.7), TypeError, "value must be an int or an integer tensor"),
    (lambda: _FS.sample_with_fixed(3, 0, 3), ValueError, r"value must be an int in \[0, 2\], got 3"),
    (lambda: _FS.sample_with_fixed(3, 0, torch.zeros(3)), TypeError, "value must be .* integer tensor, got dtype"),
    (lambda: _FS.sample_with_fixed(3, 0, torch.zeros(2, dtype=torch.long)), ValueError,
     r"value must be .* shape \[3\], got shape \(2,\)"),
])
def test_sprites_refuse_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _sprite_model():
    from vaekit.models import VAE, ModelConfig

    return VAE(ModelConfig(arch="mlp", input_shape=(1, 64, 64), latent_dim=2, hidden=(4,)))


_ID = lambda obs: obs  # noqa: E731
_F = np.tile(np.arange(5), 10)[:, None]
_C = np.random.default_rng(0).normal(size=(50, 3))


@pytest.mark.parametrize("call, error, match", [
    *[(lambda kw=kw: factor_vae_score(_ID, _FS, **{**dict(n_reference=50, n_train=5, n_eval=5), **kw}), error, match)
      for kw, error, match in [
          (dict(n_train=-5), ValueError, r"n_train must be an int in \[1, "),
          (dict(n_eval=0), ValueError, r"n_eval must be an int in \[1, "),
          (dict(n_reference=1), ValueError, r"n_reference must be an int in \[2, "),
          (dict(batch_size=0), ValueError, r"batch_size must be an int in \[2, "),
          (dict(batch_size=1), ValueError, r"batch_size must be an int in \[2, "),
          (dict(prune_fraction=float("nan")), ValueError, "prune_fraction must be a finite number"),
          (dict(prune_fraction=2.0), ValueError, r"prune_fraction must be a number in \[0, 1\), got 2.0"),
          (dict(prune_fraction=1), ValueError, r"prune_fraction must be a number in \[0, 1\), got 1"),
          (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1, got 0"),
          (dict(seed="a"), TypeError, "seed must be an int, got str"),
      ]],
    (lambda: factor_vae_score(5, _FS), TypeError, "representation must be callable"),
    (lambda: factor_vae_score(_ID, None), TypeError, "sampler must be a FactorSampler"),
    (lambda: factor_vae_score(_ID, lambda n, g: None), TypeError, "sampler must be a FactorSampler"),
    (lambda: beta_vae_score(_ID, _FS, n_train=20, n_eval=0), ValueError, r"n_eval must be an int in \[1, "),
    (lambda: beta_vae_score(_ID, _FS, n_train=2.5, n_eval=2), TypeError, "n_train must be an int, got float"),
    (lambda: beta_vae_score(_ID, _FS, batch_size=0), ValueError, r"batch_size must be an int in \[1, "),
    (lambda: sample_codes(_ID, _FS, 0), ValueError, r"n must be an int in \[1, "),
    (lambda: sample_codes(_ID, _FS, 3, chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    (lambda: sample_codes(5, _FS, 3), TypeError, "representation must be callable"),
    (lambda: sample_codes(_ID, None, 3), TypeError, "sampler must be a FactorSampler"),
    (lambda: sample_codes(_ID, _FS, 3, seed=2**70), ValueError, r"seed must be an int in \[0, "),
    (lambda: mig(np.full((50, 3), np.nan), _F), ValueError, "codes must be finite"),
    (lambda: mig(np.full((50, 3), np.inf), _F), ValueError, "codes must be finite"),
    (lambda: mig(_C, np.full((50, 1), np.nan)), ValueError, "factors must be finite"),
    (lambda: mig(np.zeros((0, 3)), np.zeros((0, 2), int)), ValueError, r"codes must be .* n, d >= 1, got shape \(0, 3\)"),
    (lambda: mig(np.zeros((50, 0)), _F), ValueError, r"codes must be .* n, d >= 1, got shape \(50, 0\)"),
    (lambda: mig(_C, np.zeros((50, 0), int)), ValueError, r"factors must be .* got shape \(50, 0\)"),
    (lambda: mig([["a", "b"]], [[1]]), TypeError, "codes must be a numeric array, got dtype <U1"),
    (lambda: mig(_C, _F, n_bins=10**9), ValueError, r"n_bins must be an int in \[2, 10000\], got 1000000000"),
    (lambda: mig(_C, _F, n_bins=1), ValueError, r"n_bins must be an int in \[2, "),
    (lambda: dci(np.full((50, 3), np.nan), _F, _C, _F), ValueError, "codes_train must be finite"),
    (lambda: dci(_C, _F, _C, np.full((50, 1), np.inf)), ValueError, "factors_test must be finite"),
    (lambda: dci(_C, _F, _C[:, 0], _F), ValueError, r"codes_test must be a 2-d array .* got shape \(50,\)"),
    (lambda: dci(_C, _F, _C, _F, seed="a"), TypeError, "seed must be an int, got str"),
    (lambda: dci(_C, _F, _C, _F, n_estimators=0), ValueError, "n_estimators must be an int >= 1, got 0"),
    (lambda: dis.evaluate_disentanglement(None), TypeError, "model must be a vaekit VAE, got NoneType"),
    (lambda: dis.evaluate_disentanglement(_sprite_model(), n_codes="a"), TypeError, "n_codes must be an int, got str"),
    (lambda: dis.evaluate_disentanglement(_sprite_model(), seed=-1), ValueError, r"seed must be an int in \[0, "),
])
def test_metrics_refuse_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_seeds_reach_the_command_line_range():
    # vaekit evaluate --seed takes up to 2**64 - 3, beyond checks.MAX_SEED: a generator takes them
    codes, factors = sample_codes(lambda obs: obs, FactorSampler(SIZES), 5, seed=2**64 - 3)
    assert codes.shape == (5, 4) and factors.shape == (5, 4)
    assert make_sprites(1, seed=2**64 - 1)[0].shape == (1, 1, 64, 64)
    assert make_sprites(0)[0].shape == (0, 1, 64, 64)


# -- scores against from-scratch computations (the second mutation audit) ---------------


def _plug_in_mi(a, b) -> float:
    """I(a; b) in nats from the joint counts of two discrete arrays."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((len(ua), len(ub)))
    np.add.at(joint, (ia, ib), 1)
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def _mig_from_scratch(codes, factors, n_bins) -> float:
    """Each code cut into n_bins equal widths as numpy.histogram cuts them (the last bin
    closed), the MI of each with each factor and the factor's entropy H = I(f; f)."""
    gaps = []
    for k in range(factors.shape[1]):
        h = _plug_in_mi(factors[:, k], factors[:, k])
        if h <= 0:
            continue
        info = []
        for c in codes.T:
            lo, hi = c.min(), c.max()
            binned = np.minimum(((c - lo) / (hi - lo) * n_bins).astype(int), n_bins - 1) if hi > lo else 0 * c
            info.append(_plug_in_mi(binned, factors[:, k]))
        info = sorted(info, reverse=True) + [0.0]
        gaps.append((info[0] - info[1]) / h)
    return float(np.mean(gaps))


def test_mig_equals_a_from_scratch_computation_on_random_codes():
    """Skewed factors (H < log 2) and few distinct code values pin the entropy used, the
    bin count and the bin of each code's maximum (the near-uniform tests above allow 0.02)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, d, k, n_bins = rng.integers(5, 300), rng.integers(1, 5), rng.integers(1, 4), int(rng.integers(2, 25))
        factors = rng.integers(0, rng.integers(2, 6), (n, k))
        factors[:, 0] = rng.random(n) < 0.15
        if factors[:, 0].min() == factors[:, 0].max():
            continue
        codes = rng.normal(size=(n, d)) + factors[:, rng.integers(0, k, d)] * rng.normal(size=d)
        assert mig(codes, factors, n_bins=n_bins) == pytest.approx(_mig_from_scratch(codes, factors, n_bins), abs=1e-12)


def test_mig_hand_cases_for_bins_and_entropy():
    skewed = np.array([0] * 9 + [1])[:, None]
    assert mig(np.stack([skewed[:, 0], np.zeros(10)], 1), skewed) == pytest.approx(1.0)  # I = H, not log 2
    assert mig(np.arange(20.0)[:, None], np.arange(20)[:, None], n_bins=20) == pytest.approx(1.0)  # a bin each
    # two bins over [0, 2]: the maximum shares the last bin with 1
    expected = _plug_in_mi([0, 1, 1], [0, 0, 1]) / _plug_in_mi([0, 0, 1], [0, 0, 1])
    assert mig(np.array([[0.0], [1.0], [2.0]]), np.array([[0], [0], [1]]), n_bins=2) == pytest.approx(expected)


VOTE_SIZES = (3, 4, 5, 6)
_MIX = torch.tensor([[1.3, 0.7, 2.1, 0.4], [0.9, 1.7, 0.2, 1.1], [0.5, 0.3, 1.9, 2.3], [1.2, 2.2, 0.6, 0.8]],
                    dtype=torch.float64)


def _noisy_code(obs):
    """A deterministic function of each observation, noisy enough that the votes disagree."""
    o = obs.double()
    z = o + 2.0 * torch.sin(1000.0 * (o @ _MIX) + torch.arange(4.0, dtype=torch.float64))
    return torch.cat([z * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64), z[:, :1] * 0.2], 1)


def _factor_vae_from_scratch(rep, sampler, seed, n_reference, n_train, n_eval, batch_size, prune_fraction=0.05):
    """Kim and Mnih's vote, on the same random stream: the code scaled by its std over the
    reference set (collapsed dimensions pruned), each batch's vote the dimension of least
    variance, each vote's class the majority of its training batches' fixed factors."""
    gen = torch.Generator().manual_seed(seed)
    obs, _ = sampler(n_reference, gen)
    z = rep(obs).numpy()
    std = z.std(0)
    kept = std > prune_fraction * std.max()
    fixed = torch.randint(len(VOTE_SIZES), (n_train + n_eval,), generator=gen).tolist()
    votes = []
    for k in fixed:
        value = int(torch.randint(VOTE_SIZES[k], (), generator=gen))
        batch = rep(sampler.sample_with_fixed(batch_size, k, value, gen)[0]).numpy()[:, kept] / std[kept]
        votes.append(int(np.argmin(batch.var(0, ddof=1))))
    table = {}
    for vote, k in zip(votes[:n_train], fixed[:n_train]):
        table.setdefault(vote, []).append(k)
    majority = {vote: max(set(ks), key=lambda q: (ks.count(q), -q)) for vote, ks in table.items()}
    return float(np.mean([majority.get(vote, -1) == k for vote, k in zip(votes[n_train:], fixed[n_train:])]))


@pytest.mark.parametrize("seed", [0, 8, 10])
def test_factor_vae_score_equals_a_from_scratch_majority_vote(seed):
    """A code between the ceiling and chance, few training votes (ties, skews): how the
    majority is counted matters, and the score is the from-scratch one exactly."""
    kw = dict(n_reference=300, n_train=30, n_eval=100, batch_size=8)
    got = factor_vae_score(_noisy_code, FactorSampler(VOTE_SIZES), seed=seed, **kw)
    assert 0.3 < got < 0.95
    assert got == _factor_vae_from_scratch(_noisy_code, FactorSampler(VOTE_SIZES), seed, **kw)


def _beta_vae_from_scratch(rep, sampler, seed, n_train, n_eval, batch_size) -> float:
    """Higgins et al.'s score on the same random stream: each point's feature the mean
    |z(x1) - z(x2)| over pairs that share factor k, standardised by the training points'
    mean and std, a logistic regression's held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(sampler.factor_sizes), (n_train + n_eval,), generator=gen)
    features = []
    for k in labels.tolist():
        x1, f1 = sampler(batch_size, gen)
        x2, _ = sampler.sample_with_fixed(batch_size, k, f1[:, k], gen)
        features.append(np.abs(rep(x1).numpy() - rep(x2).numpy()).mean(0))
    features, y = np.stack(features), labels.numpy()
    mean, std = features[:n_train].mean(0), features[:n_train].std(0)
    features = (features - mean) / np.where(std == 0, 1.0, std)
    classifier = LogisticRegression(max_iter=2000).fit(features[:n_train], y[:n_train])
    return float(classifier.score(features[n_train:], y[n_train:]))


@pytest.mark.parametrize("seed", [0, 2])
def test_beta_vae_score_equals_a_from_scratch_computation(seed):
    """On a code between the ceiling and chance (unstandardised features score 1-3 points
    lower here)."""
    kw = dict(n_train=200, n_eval=200, batch_size=8)
    got = beta_vae_score(_noisy_code, FactorSampler(VOTE_SIZES), seed=seed, **kw)
    assert 0.4 < got < 0.9
    assert got == _beta_vae_from_scratch(_noisy_code, FactorSampler(VOTE_SIZES), seed, **kw)


@pytest.mark.parametrize("n, documented", [(10000, 0.896), (1000, 0.828)], ids=["default", "quick"])
def test_mig_of_the_true_factors_is_the_ceiling_the_docs_give(n, documented):
    """docs/disentanglement.md: a representation equal to the sprites' factors scores 0.896
    with the default 10,000 codes and 0.828 with --quick's 1,000 (20 bins cannot resolve 40
    orientations or 32 positions); measured over three seeds within 0.004 of those."""
    from vaekit.sprites import sample_factors

    scores = [mig(f.double(), f) for f in (sample_factors(n, torch.Generator().manual_seed(s)) for s in range(3))]
    assert all(abs(s - documented) < 0.005 for s in scores), scores
