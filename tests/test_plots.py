import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit.plots import decoder_mean, image_grid, plot_curves, save_image_grid, save_traversals


def test_image_grid_shape_padding_and_placement():
    torch.manual_seed(0)
    images = torch.rand(5, 1, 3, 4)
    grid = image_grid(images, nrow=2, padding=1, pad_value=1.0)
    # 3 rows of 2 columns: H = 3*(3+1)+1, W = 2*(4+1)+1
    assert grid.shape == (13, 11) and grid.dtype == np.uint8
    expected = np.rint(images.numpy() * 255).astype(np.uint8)
    for i in range(5):
        top, left = 1 + (i // 2) * 4, 1 + (i % 2) * 5
        np.testing.assert_array_equal(grid[top : top + 3, left : left + 4], expected[i, 0])
    # borders and the empty sixth cell are pad_value
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()
    assert (grid[9:12, 6:10] == 255).all()
    assert (image_grid(images, nrow=2, padding=1, pad_value=0.0)[0] == 0).all()


def test_image_grid_draws_nan_black():
    x = torch.full((1, 1, 2, 2), 0.5)
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 1, 0] = float("inf")
    x[0, 0, 1, 1] = -float("inf")
    np.testing.assert_array_equal(image_grid(x, padding=0), [[128, 0], [255, 0]])


def test_image_grid_rgb_clip_and_flat_input():
    x = torch.full((3, 3, 2, 2), 2.0)
    x[1] = -1.0
    grid = image_grid(x, nrow=3, padding=0)
    assert grid.shape == (2, 6, 3)
    assert (grid[:, :2] == 255).all() and (grid[:, 2:4] == 0).all()
    flat = torch.arange(8.0).reshape(2, 4) / 7
    a = image_grid(flat, image_shape=(2, 2), padding=0)
    b = image_grid(flat.reshape(2, 1, 2, 2), padding=0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="image_shape"):
        image_grid(flat, image_shape=(3, 3))
    with pytest.raises(ValueError, match="C in"):
        image_grid(torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_png_size(tmp_path, channels, mode):
    torch.manual_seed(0)
    x = torch.rand(10, channels, 8, 8)
    path = save_image_grid(x, tmp_path / "sub" / "grid.png", nrow=4, scale=4)
    with Image.open(path) as im:
        assert im.mode == mode
        assert im.size == (4 * (4 * 10 + 2), 4 * (3 * 10 + 2))  # (W, H)
        arr = np.asarray(im)
    grid = image_grid(x, nrow=4)
    # nearest-neighbour enlargement: every 4x4 block is one grid pixel
    np.testing.assert_array_equal(arr[::4, ::4], grid)
    np.testing.assert_array_equal(arr[3::4, 3::4], grid)


def test_save_image_grid_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = save_image_grid(torch.rand(4, 1, 8, 8), tmp_path / "grid.jpg", nrow=2)
    before = path.read_bytes()
    # a JPEG beyond the format's 65,500 pixels a side: refused before anything is written
    with pytest.raises(ValueError, match=r"grid\.jpg: a JPEG image is at most 65500 pixels a side, and this grid is "
                                         r"65602x12; write a \.png"):
        save_image_grid(torch.rand(6560, 1, 8, 8), path, nrow=1)
    # an encoder that fails midway: the image there stays as it was, and no temporary file is left
    def broken(self, fp, *args, **kwargs):
        fp.write(b"half an image")
        raise OSError("encoder error -2")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="encoder error"):
        save_image_grid(torch.rand(4, 1, 8, 8), path, nrow=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.jpg"]


def test_plot_curves_draws_each_split(tmp_path):
    rows = []
    for epoch in range(1, 6):
        for split, off in (("train", 0.0), ("val", 5.0)):
            rows.append({"epoch": str(epoch), "split": split, "loss": str(100 / epoch + off),
                         "reconstruction": str(90 / epoch + off), "kl": str(10 + off)})
    rows.append({"epoch": "6", "split": "train", "loss": "", "reconstruction": "x", "kl": "9"})
    path = plot_curves(rows, tmp_path / "plots" / "curves.png")
    with Image.open(path) as im:
        assert im.size == (1200, 320)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)

    def has(colour):
        return (np.abs(pixels - np.array(colour)).sum(1) < 30).sum() > 50

    assert has((0x1F, 0x77, 0xB4)) and has((0xFF, 0x7F, 0x0E))  # matplotlib's C0 and C1: both splits
    one_split = plot_curves([r for r in rows if r["split"] == "train"], tmp_path / "one.png", keys=["kl"])
    with Image.open(one_split) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    assert has((0x1F, 0x77, 0xB4)) and not has((0xFF, 0x7F, 0x0E))
    with pytest.raises(ValueError, match="elbo"):
        plot_curves(rows, tmp_path / "bad.png", keys=["elbo"])


class FakeVAE(torch.nn.Module):
    """Posterior N(mu, diag(std^2)), mu 0 unless given; pixel j of the decoded 1 x d image shows z_j."""

    def __init__(self, std, likelihood="bernoulli", mu=None):
        super().__init__()
        self.std = torch.tensor(std)
        self.mu = torch.zeros(len(std)) if mu is None else torch.tensor(mu)
        d = len(std)
        self.config = SimpleNamespace(input_shape=(1, 1, d), latent_dim=d, likelihood=likelihood)

    def encode(self, x):
        mu = self.mu.expand(x.shape[0], -1)
        return torch.distributions.Independent(torch.distributions.Normal(mu, self.std.expand_as(mu)), 1)

    def decode(self, z):
        out = (4.0 * z).reshape(z.shape[0], 1, 1, -1)
        if self.config.likelihood == "gaussian":
            return (torch.sigmoid(out), torch.zeros_like(out))
        return out


def _row_dims(path, n_rows, n_steps, d):
    """Which latent pixel varies along each traversal row of a scale-1, padding-2 grid."""
    with Image.open(path) as im:
        arr = np.asarray(im).astype(int)
    assert arr.shape == (n_rows * 3 + 2, n_steps * (d + 2) + 2)
    found = []
    for r in range(n_rows):
        row = arr[2 + 3 * r]
        cells = np.stack([row[2 + c * (d + 2) : 2 + c * (d + 2) + d] for c in range(n_steps)])
        spread = cells.max(0) - cells.min(0)
        assert (np.sort(spread)[:-1] == 0).all()  # the other dims stay at the posterior mean
        assert cells[0, spread.argmax()] < cells[-1, spread.argmax()]  # -span ... +span
        found.append(int(spread.argmax()))
    return found


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_traversals_rows_ordered_by_kl(tmp_path, likelihood):
    std = [1.0, 0.1, 0.5, 0.99]  # KL(N(0,s^2)||N(0,1)) = (s^2 - 1 - log s^2)/2 decreases as s -> 1
    model = FakeVAE(std, likelihood).train()
    x = torch.zeros(1, 1, 1, 4)
    path = save_traversals(model, x, tmp_path / "t.png", n_steps=5, scale=1)
    assert _row_dims(path, 4, 5, 4) == [1, 2, 3, 0]
    assert model.training  # mode restored
    path = save_traversals(model, x[0], tmp_path / "k.png", n_steps=5, scale=1, kl_per_dim=[0.3, 0.0, 0.1, 0.2], dims=2)
    assert _row_dims(path, 2, 5, 4) == [0, 3]
    path = save_traversals(model, x, tmp_path / "d.png", n_steps=5, scale=1, dims=[2, 0])
    assert _row_dims(path, 2, 5, 4) == [2, 0]
    with pytest.raises(ValueError, match="dims"):
        save_traversals(model, x, tmp_path / "e.png", dims=[4])


def test_traversals_rows_ordered_by_the_kl_with_the_mean_term(tmp_path, monkeypatch):
    """This example's KL(N(mu_j, s_j^2) || N(0, 1)) counts mu_j^2: with equal s, the rows go by |mu_j|;
    and on a real model the order is that of the closed form, where the mean term changes it."""
    import vaekit.plots
    from vaekit.models import VAE, ModelConfig

    model = FakeVAE([0.5] * 4, mu=[0.0, 0.5, -2.0, 1.0])
    path = save_traversals(model, torch.zeros(1, 1, 1, 4), tmp_path / "t.png", n_steps=5, scale=1)
    assert _row_dims(path, 4, 5, 4) == [2, 3, 1, 0]

    torch.manual_seed(0)
    vae = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=5, hidden=(8,))).eval()
    x = torch.rand(1, 1, 4, 4)
    with torch.no_grad():
        mu, logvar = (t[0].double() for t in vae.encode_params(x))
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)  # the closed form, in float64
    order, without_mean = (torch.argsort(v, descending=True).tolist() for v in (kl, kl - 0.5 * mu ** 2))
    assert order != without_mean  # the test tells the two apart
    seen = []
    real = vaekit.plots._images_of
    monkeypatch.setattr(vaekit.plots, "_images_of", lambda m, z: seen.append(z.clone()) or real(m, z))
    save_traversals(vae, x, tmp_path / "r.png", n_steps=3, span=2.0)
    rows = [int((block != block[0]).any(0).nonzero()) for block in seen[0].split(3)]
    assert rows == order


def test_decoder_mean_matches_distributions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5) * 3
    logits[0, 0] = 1e-4  # the numerically delicate point of the continuous Bernoulli mean
    m = lambda kind: SimpleNamespace(config=SimpleNamespace(likelihood=kind))  # noqa: E731
    torch.testing.assert_close(decoder_mean(m("bernoulli"), logits), torch.distributions.Bernoulli(logits=logits).mean)
    # continuous Bernoulli: E[x] = int_0^1 x p(x) dx by the trapezoid rule in float64
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    lam = torch.sigmoid(logits.double())[..., None]
    dens = lam**grid * (1 - lam) ** (1 - grid)
    numeric = torch.trapezoid(grid * dens, grid) / torch.trapezoid(dens, grid)
    torch.testing.assert_close(decoder_mean(m("continuous_bernoulli"), logits), numeric.float(), atol=1e-5, rtol=0)
    assert not torch.allclose(decoder_mean(m("continuous_bernoulli"), logits), torch.sigmoid(logits), atol=1e-2)
    mean = torch.randn(3, 5)
    torch.testing.assert_close(decoder_mean(m("gaussian"), (mean, torch.zeros(3, 5))), mean.clamp(0, 1))
    torch.testing.assert_close(decoder_mean(m("mse"), mean), mean.clamp(0, 1))
    with pytest.raises(ValueError, match="likelihood"):
        decoder_mean(m("poisson"), mean)


@pytest.mark.parametrize("input_shape, pictures", [((20,), {"curves.png"}),
                                                    ((16,), {"curves.png", "reconstructions.png", "samples.png",
                                                             "traversals.png"})])
def test_run_pictures_of_data_that_are_not_images_are_the_curves_only(tmp_path, input_shape, pictures):
    """A run on vectors that cannot be shown as a square image (20 values) ends with its
    curves, not with an error after training; 16 values are a 4 x 4 image."""
    from vaekit.models import VAE, ModelConfig
    from vaekit.plots import save_run_pictures

    model = VAE(ModelConfig(input_shape=input_shape, hidden=(8,), latent_dim=2, likelihood="gaussian"))
    history = [{"epoch": 1, "split": "train", "loss": 3.0, "reconstruction": 2.0, "kl": 1.0}]
    save_run_pictures(model, torch.rand(4, *input_shape), tmp_path, history)
    assert {p.name for p in tmp_path.iterdir()} == pictures


def test_plot_arguments_are_taken_or_refused_by_what_they_mean(tmp_path):
    images = torch.rand(5, 1, 4, 4)
    assert image_grid(images, nrow=np.int64(2)).shape == image_grid(images, nrow=2).shape  # an integer is one
    with pytest.raises(ValueError, match="nrow must be an int >= 1, got 0"):
        image_grid(images, nrow=0)
    with pytest.raises(ValueError, match="pad_value must be a finite number"):
        image_grid(images, pad_value=float("nan"))
    rows = [{"epoch": 1, "split": "train", "loss": 3.0}, {"epoch": 2, "split": "train", "loss": 2.0}]
    with Image.open(plot_curves(rows, tmp_path / "one.png", keys="loss")) as im:  # one metric, not 4 letters
        assert im.size == (400, 320)
    model = FakeVAE([1.0, 0.1, 0.5, 0.99], "bernoulli")
    with pytest.raises(ValueError, match="dims must be an int >= 1, got -1"):
        save_traversals(model, torch.zeros(1, 1, 1, 4), tmp_path / "t.png", n_steps=3, dims=-1)


def _vae(input_shape=(1, 4, 4)):
    from vaekit.models import VAE, ModelConfig

    return VAE(ModelConfig(input_shape=input_shape, latent_dim=2, hidden=(8,)))


_ROWS = [{"epoch": 1, "split": "train", "loss": 3.0, "reconstruction": 2.0, "kl": 1.0}]
_X = torch.rand(3, 1, 4, 4)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda p: image_grid(_X, padding=10**5), ValueError,
                 r"3 images of 4x4 with nrow=8 and padding=100000 make a grid of 200004x400012 pixels, more than the "
                 r"178956970 that Pillow opens", id="grid-padding"),
    pytest.param(lambda p: image_grid("abc"), TypeError, "images must be a tensor or an array of numbers, got str",
                 id="grid-str"),
    pytest.param(lambda p: image_grid([[1, 2], [3]]), ValueError, "images must be .* rectangular", id="grid-ragged"),
    pytest.param(lambda p: image_grid(torch.rand(2, 1, 0, 4)), ValueError, r"images must be at least 1x1 pixels",
                 id="grid-empty-image"),
    pytest.param(lambda p: image_grid(_X.to(torch.complex64)), TypeError, "images must be real, got dtype .*complex",
                 id="grid-complex"),
    pytest.param(lambda p: image_grid(_X.reshape(3, 16), image_shape=(1, -4, -4)), ValueError,
                 r"image_shape must be \(C, H, W\) or \(H, W\), ints >= 1, got \(1, -4, -4\)", id="shape-negative"),
    pytest.param(lambda p: image_grid(_X.reshape(3, 16), image_shape="1x4x4"), ValueError, "image_shape must be",
                 id="shape-str"),
    pytest.param(lambda p: image_grid(_X.reshape(3, 16), image_shape=16), ValueError, "image_shape must be",
                 id="shape-int"),
    pytest.param(lambda p: image_grid(torch.rand(3, 0), image_shape=(1, 0, 4)), ValueError, "image_shape must be",
                 id="shape-zero"),
    pytest.param(lambda p: save_image_grid(_X[:2], p / "big.png", scale=10**4), ValueError,
                 r"big\.png: the grid of 8x14 pixels \(nrow=8, padding=2\) enlarged scale=10000 times is 80000x140000",
                 id="save-scale-huge"),
    pytest.param(lambda p: save_image_grid(_X, p / "a.png", scale=True), ValueError, "scale must be a positive int",
                 id="save-scale-bool"),
    pytest.param(lambda p: save_image_grid(_X, p / "a.gif"), ValueError,
                 r"a\.gif: the suffix '\.gif' names no format written here; use \.png, \.jpg, \.jpeg", id="save-gif"),
    pytest.param(lambda p: save_image_grid(_X, p / "folder"), ValueError, r"path .*folder is a folder",
                 id="save-folder"),
    pytest.param(lambda p: save_image_grid(_X, p / "pipe"), ValueError, r"path .*pipe is not a regular file",
                 id="save-pipe"),
    pytest.param(lambda p: plot_curves(_ROWS, p / "c.pdf"), ValueError, r"c\.pdf: the suffix '\.pdf' .*; use \.png",
                 id="curves-pdf"),
    pytest.param(lambda p: plot_curves(_ROWS, p / "folder"), ValueError, r"path .*folder is a folder",
                 id="curves-folder"),
    pytest.param(lambda p: plot_curves(_ROWS, p / "pipe"), ValueError, r"path .*pipe is not a regular file",
                 id="curves-pipe"),
    pytest.param(lambda p: plot_curves(None, p / "c.png"), TypeError, "rows must be a sequence of dicts .* NoneType",
                 id="curves-rows-none"),
    pytest.param(lambda p: plot_curves([1, 2], p / "c.png"), TypeError, "rows must be .* a row of type int",
                 id="curves-rows-ints"),
    pytest.param(lambda p: plot_curves({"epoch": 1}, p / "c.png"), TypeError, "rows must be .* got dict",
                 id="curves-rows-dict"),
    pytest.param(lambda p: plot_curves(_ROWS, p / "c.png", keys=None), TypeError, "keys must be .* got NoneType",
                 id="curves-keys-none"),
    pytest.param(lambda p: save_traversals(_vae((10,)), torch.rand(1, 10), p / "t.png", image_shape=(1, 3, 3)),
                 ValueError, r"image_shape \(1, 3, 3\) must hold the 10 values of the model's input_shape \(10,\)",
                 id="traversals-image-shape"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", span=float("nan")), ValueError,
                 "span must be a finite number > 0, got nan", id="traversals-span-nan"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", span="3"), TypeError,
                 "span must be a number, got str", id="traversals-span-str"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", dims=[0.7]), ValueError,
                 r"dims must select latent dimensions \(ints in \[0, 2\)\), got \[0.7\]", id="traversals-dims-float"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", dims="ab"), TypeError,
                 "dims must be an int or a sequence of latent dimensions, got str", id="traversals-dims-str"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", dims=1.5), TypeError,
                 "dims must be an int or a sequence of latent dimensions, got float", id="traversals-dims-number"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", kl_per_dim="ab"), TypeError,
                 "kl_per_dim must be latent_dim=2 numbers, got str", id="traversals-kl-str"),
    pytest.param(lambda p: save_traversals(_vae(), _X[:1], p / "t.png", kl_per_dim=[0.5, float("nan")]), ValueError,
                 r"kl_per_dim must hold finite numbers, got \[0.5, nan\]", id="traversals-kl-nan"),
    pytest.param(lambda p: save_image_grid(_X[:2].reshape(2, 1, 2, -1), p / "g.png", pad_value=float("inf")),
                 ValueError, "pad_value must be a finite number, got inf$", id="grid-pad-inf"),
    pytest.param(lambda p: save_traversals(_vae(), [1.0], p / "t.png"), TypeError, "x must be a torch.Tensor, got list",
                 id="traversals-x-list"),
    pytest.param(lambda p: save_traversals(None, _X[:1], p / "t.png"), TypeError, "model must be a VAE .* NoneType",
                 id="traversals-model-none"),
    pytest.param(lambda p: decoder_mean(None, torch.zeros(2)), TypeError, "model must be a VAE .* NoneType",
                 id="decoder-mean-model-none"),
])
def test_bad_plot_arguments_are_refused_by_name_before_anything_is_written(tmp_path, call, error, match):
    import os

    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]


def test_the_grid_bound_is_what_pillow_opens_and_valid_input_is_taken_as_before(tmp_path):
    from vaekit.plots import MAX_GRID_PIXELS

    assert MAX_GRID_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # beyond it Image.open raises DecompressionBombError
    # valid input is taken as before: a path without a suffix is a PNG, a list of lists an image
    path = save_image_grid([[[0.0, 1.0]]], tmp_path / "grid", padding=0)
    with Image.open(path) as im:
        assert im.format == "PNG" and np.asarray(im).tolist() == [[0, 255]]
    model = _vae()
    a = save_traversals(model, _X[:1], tmp_path / "a.png", dims=torch.tensor([1, 0]), n_steps=3)
    b = save_traversals(model, _X[:1], tmp_path / "b.png", dims=[1, 0], n_steps=3)
    assert a.read_bytes() == b.read_bytes()


def test_a_run_on_large_images_keeps_pictures_that_pillow_opens(tmp_path, monkeypatch):
    """The end of a run draws 64 images a grid; where that grid would pass the bound (large
    images), fewer are drawn rather than fail the run after its training."""
    import vaekit.plots
    from vaekit.models import VAE, ModelConfig
    from vaekit.plots import _pictures_that_fit, save_run_pictures

    assert _pictures_that_fit((1, 28, 28), 4) == 64
    one_row = (8 * 30 + 2) * (28 + 4) * 16  # 8 images of 28 x 28 in a row, enlarged 4 times
    monkeypatch.setattr(vaekit.plots, "MAX_GRID_PIXELS", one_row)
    assert _pictures_that_fit((1, 28, 28), 4) == 8
    assert _pictures_that_fit((1, 2000, 2000), 1) == 0
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 28, 28), latent_dim=2, hidden=(8,)))
    save_run_pictures(model, torch.rand(40, 1, 28, 28), tmp_path, [])
    from PIL import Image

    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == ((8 * 30 + 2) * 4, (30 + 2) * 4)  # one row of 8
    assert (tmp_path / "reconstructions.png").is_file()
    assert not (tmp_path / "traversals.png").exists()  # a row of 9 does not fit under this bound
    monkeypatch.setattr(vaekit.plots, "MAX_GRID_PIXELS", 2 * (9 * 30 + 2) * (2 * 30 + 2) * 16)
    save_run_pictures(model, torch.rand(40, 1, 28, 28), tmp_path, [])
    with Image.open(tmp_path / "traversals.png") as im:  # both dimensions now
        assert im.size == ((9 * 30 + 2) * 4, (2 * 30 + 2) * 4)


def _tiles(images, nrow, pad=2):
    """The grid a run's picture shows, built here tile by tile: ``uint8``, white borders."""
    n, _, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=np.uint8)
    pixels = np.rint(np.clip(images[:, 0].numpy(), 0, 1) * 255).astype(np.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def test_run_pictures_show_the_documented_pixels(tmp_path):
    """reconstructions.png: the first 32 examples, each input just left of its reconstruction,
    four pairs a row; traversals.png: row r varies z_j over linspace(-3, 3, 9) for the
    dimensions by decreasing mean KL, the others at the posterior mean; both enlarged
    112 // 8 = 14 times (nearest neighbour)."""
    from vaekit.models import VAE, ModelConfig
    from vaekit.plots import save_run_pictures

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 8, 8), latent_dim=3, hidden=(16,)))
    x = torch.rand(40, 1, 8, 8)
    save_run_pictures(model, x, tmp_path, [])
    scale = 14

    def read(name):
        with Image.open(tmp_path / name) as im:
            return np.asarray(im)

    with torch.no_grad():
        shown = x[:32]
        rec = model.reconstruct(shown)
        pairs = torch.stack([shown, rec], 1).reshape(64, 1, 8, 8)  # x_0, rec_0, x_1, rec_1, ...
        expected = _tiles(pairs, nrow=8)
        np.testing.assert_array_equal(read("reconstructions.png"), expected.repeat(scale, 0).repeat(scale, 1))

        mu, logvar = model.encode_params(shown)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean(0)  # mean KL per dimension, of the examples shown
        order = torch.argsort(kl, descending=True, stable=True).tolist()
        z = model.encode_params(shown[:1])[0].repeat(3 * 9, 1)
        for r, j in enumerate(order):
            z[r * 9 : (r + 1) * 9, j] = torch.linspace(-3.0, 3.0, 9)
        expected = _tiles(model.generate(z), nrow=9)
    assert expected[2:10].std() > 0 and (expected[2:10, 2:10] != expected[2:10, -10:-2]).any()  # the rows vary
    np.testing.assert_array_equal(read("traversals.png"), expected.repeat(scale, 0).repeat(scale, 1))


def test_a_runs_traversals_pick_their_rows_by_the_kl_over_the_data_not_the_examples_shown(tmp_path, monkeypatch):
    """The rows of a run's traversals are the dimensions of highest mean KL over the data
    given (up to KL_EXAMPLES of them), not over the 32 examples the reconstructions show."""
    import vaekit.plots
    from vaekit.models import VAE, ModelConfig
    from vaekit.plots import save_run_pictures

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 8, 8), latent_dim=6, hidden=(16,)))
    x = torch.rand(300, 1, 8, 8)
    x[32:] = (x[32:] > 0.8).float()  # the examples not shown differ from those shown
    seen = {}
    real = vaekit.plots.save_traversals
    monkeypatch.setattr(vaekit.plots, "save_traversals", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    monkeypatch.setattr(vaekit.plots, "KL_EXAMPLES", 250)
    save_run_pictures(model, x, tmp_path, [])

    def mean_kl(xs):  # the closed form KL(N(mu, s^2) || N(0, 1)) per dimension, in float64
        with torch.no_grad():
            mu, logvar = (t.double() for t in model.encode_params(xs))
        return (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).mean(0)

    kl = torch.as_tensor(seen["kl_per_dim"]).double()
    torch.testing.assert_close(kl, mean_kl(x[:250]), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(kl, mean_kl(x[:32]), rtol=1e-3)  # the test tells the two apart
    assert (tmp_path / "traversals.png").is_file()


def _pixelcnn_vae():
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 6, 6), latent_dim=3, hidden=(16,), pixelcnn_layers=2, pixelcnn_width=8))
    with torch.no_grad():
        for p in model.pixelcnn.parameters():
            p.normal_(0, 0.5)  # a head whose draws differ visibly
    return model.eval()


def test_a_pixelcnn_runs_pictures_are_those_of_its_seed_and_its_traversal_rows_one_draw(tmp_path):
    """Its reconstructions and traversals drew from the global generator (two calls with the
    same seed differed), and each traversal column was a draw of its own, so a row flickered
    where only z_j should change it."""
    from vaekit.plots import save_run_pictures

    model = _pixelcnn_vae()
    x = torch.rand(20, 1, 6, 6).bernoulli()
    for k in range(2):
        torch.manual_seed(k)  # the global generator: not what the pictures draw from
        save_run_pictures(model, x, tmp_path / str(k), [], seed=3)
    for name in ("reconstructions.png", "samples.png", "traversals.png"):
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes(), name
    path = save_traversals(model, x[:1], tmp_path / "t.png", n_steps=4, span=1e-6, scale=1,
                           generator=torch.Generator().manual_seed(0))
    with Image.open(path) as im:
        grid = np.asarray(im)
    for r in range(3):  # z barely moves along a row: its images are one draw, the same
        cells = [grid[2 + 8 * r : 8 + 8 * r, 2 + 8 * c : 8 + 8 * c] for c in range(4)]
        assert all((cell == cells[0]).all() for cell in cells)
    assert len({grid[2 + 8 * r : 8 + 8 * r, 2:8].tobytes() for r in range(3)}) > 1  # rows drawn apart


def test_run_pictures_say_once_that_they_clip_values_outside_0_1(tmp_path, capsys):
    """A Gaussian run on data in [-1, 1] had half its values drawn black without a word."""
    from vaekit.models import VAE, ModelConfig
    from vaekit.plots import save_run_pictures

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,), likelihood="gaussian"))
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # decoded means near 0.5, well inside [0, 1]
        last.bias.fill_(0.5)
        last.weight.mul_(0.01)
    save_run_pictures(model, torch.rand(10, 1, 4, 4), tmp_path / "a", [])
    assert capsys.readouterr().err == ""
    save_run_pictures(model, torch.rand(10, 1, 4, 4) * 2 - 1, tmp_path / "b", [])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.fullmatch(
        r"vaekit: note: the data shown \(values in \[-\d\.\d+, \d\.\d+\]\) lie outside \[0, 1\]; the pictures in "
        r"\S+b clip them to \[0, 1\]\n", err), err


def test_run_pictures_of_a_model_gone_to_nan_say_so_and_leave_the_traversals_out(tmp_path, capsys):
    """A run whose weights blew up to NaN (every step skipped) ended in a ValueError from
    the traversals, after its checkpoint; and the note named the range [nan, nan]."""
    from vaekit.models import VAE, ModelConfig
    from vaekit.plots import save_run_pictures

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)))
    run = tmp_path / "run"
    save_run_pictures(model, torch.rand(10, 1, 4, 4), run, [])
    assert (run / "traversals.png").exists() and capsys.readouterr().err == ""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_run_pictures(model, torch.rand(10, 1, 4, 4), run, [])
    err = capsys.readouterr().err
    assert not (run / "traversals.png").exists()  # the finite model's picture does not stand for this one
    assert (run / "reconstructions.png").exists() and (run / "samples.png").exists()
    assert re.search(r"the decoded means \((\d+) of \1 not finite\) lie outside \[0, 1\]", err), err
    assert f"the model's KL per latent dimension is not finite; {run} has no traversals.png" in err, err
    assert "nan, nan" not in err
