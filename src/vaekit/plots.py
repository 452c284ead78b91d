"""Pictures of a VAE: image grids, latent traversals and training curves.

Everything here writes files and returns their path; nothing touches pyplot's global
state. Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas attached, so
plotting works on a headless machine and inside a process that uses another backend.
Image grids are plain arrays written with Pillow.

Pixel values are expected in ``[0, 1]`` and are clipped to it; a grid is ``uint8``
``[H, W]`` for grey images and ``[H, W, 3]`` for RGB ones.
"""

from __future__ import annotations

import math
import numbers
import os
import stat
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .checks import check_int, check_number

__all__ = ["image_grid", "save_image_grid", "plot_curves", "save_traversals", "decoder_mean", "save_run_pictures",
           "MAX_GRID_PIXELS", "JPEG_MAX_SIDE", "KL_EXAMPLES"]


# The most pixels a grid may have: what Pillow, vaekit's reader of images, still opens
# (Image.MAX_IMAGE_PIXELS's default, doubled: beyond it Image.open raises
# DecompressionBombError). A larger grid would take minutes and gigabytes to make.
MAX_GRID_PIXELS = 2 * 89_478_485


def _to_numpy(images) -> np.ndarray:
    if isinstance(images, Tensor):
        if images.is_complex():
            raise TypeError(f"images must be real, got dtype {images.dtype}")
        return images.detach().to("cpu", torch.float32).numpy()
    if images is None or isinstance(images, (str, bytes)):
        raise TypeError(f"images must be a tensor or an array of numbers, got {type(images).__name__}")
    try:
        arr = np.asarray(images)
    except ValueError:  # a ragged nesting of lists
        raise ValueError("images must be a tensor or a rectangular array of numbers, got a ragged "
                         f"{type(images).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"images must be a tensor or an array of real numbers, got an array of dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float32)


def _check_image_shape(image_shape) -> tuple[int, ...]:
    """``image_shape`` as a tuple, if it is ``(C, H, W)`` or ``(H, W)`` of ints >= 1."""
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if (shape is None or len(shape) not in (2, 3)
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"image_shape must be (C, H, W) or (H, W), ints >= 1, got {image_shape!r}")
    return tuple(int(s) for s in shape)


def _grid_size(n: int, h: int, w: int, nrow: int, padding: int) -> tuple[int, int]:
    """The pixels of a grid of ``n`` images ``h x w``, ``nrow`` a row, ``padding`` around each."""
    cols = min(n, nrow)
    return -(-n // cols) * (h + padding) + padding, cols * (w + padding) + padding


def _check_grid_size(h: int, w: int, what: str) -> None:
    if h * w > MAX_GRID_PIXELS:
        raise ValueError(f"{what} make a grid of {h}x{w} pixels, more than the {MAX_GRID_PIXELS} that Pillow opens; "
                         f"use a smaller padding or fewer images")


def _output_path(path, suffixes: tuple[str, ...]) -> Path:
    """``path`` as a Path, if it can name a new image file with one of ``suffixes`` (or none:
    the first format): not a folder, nor a pipe or device that the write would block on."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() not in ("", *suffixes):
        raise ValueError(f"path {path}: the suffix {path.suffix!r} names no format written here; "
                         f"use {', '.join(suffixes)}")
    try:
        mode = path.stat().st_mode
    except OSError:  # nothing there yet (or out of reach: the write says why)
        return path
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise ValueError(f"path {path} is {kind}; name an image file to write")
    return path


def image_grid(images, nrow: int = 8, padding: int = 2, pad_value: float = 1.0, *, image_shape=None) -> np.ndarray:
    """Tile a batch of images into one ``uint8`` picture, ``nrow`` images per row.

    Args:
        images: ``[N, C, H, W]`` with ``C`` in {1, 3}, ``[N, H, W]`` (grey), or ``[N, D]``
            flat vectors together with ``image_shape``; a tensor or an array.
        nrow: images per row; the last row may be short and is filled with ``pad_value``.
        padding: pixels of ``pad_value`` around and between the images.
        pad_value: the border intensity in ``[0, 1]`` (1 = white).
        image_shape: ``(C, H, W)`` or ``(H, W)`` to reshape flat ``[N, D]`` input.

    Shape:
        rows = ceil(N / nrow), cols = min(N, nrow); the grid is
        ``[rows*(H+padding)+padding, cols*(W+padding)+padding]``, with a trailing 3 for RGB.
    """
    arr = _to_numpy(images)
    if image_shape is not None:
        shape = _check_image_shape(image_shape)
        if arr.ndim < 1 or math.prod(arr.shape[1:]) != math.prod(shape):
            raise ValueError(f"images of shape {arr.shape} cannot be reshaped to image_shape {shape}")
        arr = arr.reshape(arr.shape[0], *shape)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be [N, C, H, W] with C in (1, 3), [N, H, W], or [N, D] with image_shape; "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError("images must hold at least one image, got an empty batch")
    if arr.shape[2] == 0 or arr.shape[3] == 0:
        raise ValueError(f"images must be at least 1x1 pixels, got shape {arr.shape}")
    nrow, padding = check_int("nrow", nrow, low=1), check_int("padding", padding)
    check_number("pad_value", pad_value, low=-math.inf)  # finite; clipped to [0, 1] below
    n, c, h, w = arr.shape
    cols = min(n, nrow)
    size = _grid_size(n, h, w, nrow, padding)
    _check_grid_size(*size, f"{n} images of {h}x{w} with nrow={nrow} and padding={padding}")
    grid = np.full(
        (c, *size),
        np.clip(pad_value, 0.0, 1.0),
        dtype=np.float32,
    )
    # NaN would turn into an arbitrary byte; show it as black instead.
    arr = np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = arr[i]
    out = np.rint(grid * 255.0).astype(np.uint8)
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def save_image_grid(
    images, path, nrow: int = 8, scale: int = 1, image_shape=None, *, padding: int = 2, pad_value: float = 1.0
) -> Path:
    """Write ``image_grid(images, ...)`` as a PNG (a JPEG for a ``.jpg``/``.jpeg`` path),
    enlarged ``scale`` times.

    The enlargement repeats each pixel ``scale x scale`` times (nearest neighbour), so
    8x8 digits stay sharp and the file's size is exactly ``scale`` times the grid's.
    Parent directories are created. The file is replaced whole or not at all (an image
    that cannot be encoded leaves the one there as it was). Returns the path written.
    """
    import io

    from PIL import Image

    from .io import atomic_write

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    path = _output_path(path, (".png", ".jpg", ".jpeg"))
    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value, image_shape=image_shape)
    h, w = grid.shape[0] * scale, grid.shape[1] * scale
    if h * w > MAX_GRID_PIXELS:  # asked before the enlargement is made
        raise ValueError(f"path {path}: the grid of {grid.shape[0]}x{grid.shape[1]} pixels (nrow={nrow}, "
                         f"padding={padding}) enlarged scale={scale} times is {h}x{w}, more than the {MAX_GRID_PIXELS} "
                         f"pixels that Pillow opens; use a smaller scale or padding, or fewer images")
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    if fmt == "JPEG" and max(grid.shape[:2]) > JPEG_MAX_SIDE:
        fewer = "fewer" if grid.shape[1] > JPEG_MAX_SIDE else "more"
        raise ValueError(f"path {path}: a JPEG image is at most {JPEG_MAX_SIDE} pixels a side, and this grid is "
                         f"{grid.shape[0]}x{grid.shape[1]}; write a .png, or put {fewer} images in a row (nrow)")
    data = io.BytesIO()
    Image.fromarray(grid, mode="L" if grid.ndim == 2 else "RGB").save(data, format=fmt)
    atomic_write(path, lambda f: f.write(data.getbuffer()))
    return path


JPEG_MAX_SIDE = 65500  # the JPEG format's (and libjpeg's) limit on each side


def _number(value) -> float | None:
    """A metrics.csv cell as a float; empty cells and text that is not a number give None."""
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def plot_curves(
    rows: Sequence[Mapping], path, *, keys: Iterable[str] = ("loss", "reconstruction", "kl"), x: str = "epoch"
) -> Path:
    """Plot training curves: one subplot per metric in ``keys``, one line per ``split``.

    Args:
        rows: dicts as read from ``metrics.csv`` (values may be strings), e.g.
            ``{"epoch": "3", "split": "val", "loss": "98.1", ...}``; rows without a
            ``split`` column form a single line. Cells that are empty or not numbers are
            skipped, so a split that logs fewer metrics still plots the ones it has.
        path: the PNG to write (parent directories are created); a ``.png`` name, or one
            without a suffix.
        keys: the metrics to plot, each a column of at least one row.
        x: the column on the horizontal axis.
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(rows, (Mapping, str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError(f"rows must be a sequence of dicts (metrics rows), got {type(rows).__name__}")
    rows = list(rows)
    bad = next((r for r in rows if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise TypeError(f"rows must be a sequence of dicts (metrics rows), got a row of type {type(bad).__name__}")
    if isinstance(keys, str):
        keys = [keys]  # one metric by its name, not its letters
    elif isinstance(keys, Iterable) and not isinstance(keys, (Mapping, bytes)):
        keys = list(keys)
    else:
        raise TypeError(f"keys must be a metric's name or a sequence of them, got {type(keys).__name__}")
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"keys must be metric names (str), got {keys!r}")
    if not isinstance(x, str):
        raise TypeError(f"x must be a column name (str), got {type(x).__name__}")
    path = _output_path(path, (".png",))
    if not rows:
        raise ValueError("rows must hold at least one metrics row, got none")
    if not keys:
        raise ValueError("keys must name at least one metric, got none")
    columns = set().union(*(r.keys() for r in rows))
    missing = [k for k in [x, *keys] if k not in columns]
    if missing:
        raise ValueError(f"keys/x name columns {missing} that no row has; the rows have {sorted(columns)}")

    fig = Figure(figsize=(4.0 * len(keys), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    splits = list(dict.fromkeys(str(r.get("split", "")) for r in rows))
    for ax, key in zip(axes, keys):
        for split in splits:
            points = sorted(
                (_number(r.get(x)), _number(r.get(key)))
                for r in rows
                if str(r.get("split", "")) == split and _number(r.get(x)) is not None and _number(r.get(key)) is not None
            )
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=split or None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if any(splits) and ax.lines:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def decoder_mean(model, decoder_out) -> Tensor:
    """The mean of ``p(x|z)`` as an image in ``[0, 1]`` (see
    :func:`vaekit.models.likelihood_mean`), for a model with ``config.likelihood``."""
    from .models import likelihood_mean

    likelihood = getattr(getattr(model, "config", None), "likelihood", None)
    if likelihood is None:
        raise TypeError(f"model must be a VAE (a model with config.likelihood), got {type(model).__name__}")
    return likelihood_mean(likelihood, decoder_out).clamp(0.0, 1.0)


def _images_of(model, z: Tensor) -> Tensor:
    """``model.generate(z)`` where the model has it (an autoregressive decoder draws its
    images pixel by pixel), else the decoder mean."""
    if hasattr(model, "generate"):
        return model.generate(z).clamp(0.0, 1.0)
    return decoder_mean(model, model.decode(z))


def _row_draws(model, z: Tensor, n_steps: int, generator) -> Tensor:
    """An autoregressive decoder's images of ``z``, rows of ``n_steps``: draws from p(x|z)
    as :meth:`vaekit.models.VAE.generate` makes them, with one set of uniform numbers a
    row (drawn from ``generator``), so that along a row only z changes, not the draw."""
    from .pixelcnn import sample_pixels

    cond = model.decoder(z)
    u = torch.rand((z.shape[0] // n_steps, *cond.shape[1:]), generator=generator, device=cond.device,
                   dtype=cond.dtype)
    return sample_pixels(model.pixelcnn, cond, uniforms=u.repeat_interleave(n_steps, 0)).clamp(0.0, 1.0)


def _image_shape(input_shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return (1, *shape)
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    if side * side != math.prod(shape):
        raise ValueError(f"cannot show input_shape {shape} as an image; pass image_shape=(C, H, W)")
    return (1, side, side)


def save_traversals(
    model,
    x: Tensor,
    path,
    *,
    n_steps: int = 9,
    span: float = 3.0,
    dims=None,
    kl_per_dim=None,
    image_shape=None,
    scale: int = 4,
    generator: torch.Generator | None = None,
) -> Path:
    """Latent traversals of one example: a row per latent dimension, a column per value.

    ``x`` (``[1, *input_shape]`` or ``[*input_shape]``) is encoded to ``q(z|x) = N(mu,
    diag sigma^2)``. Row ``j`` decodes ``mu`` with coordinate ``z_j`` replaced by each of
    ``linspace(-span, span, n_steps)`` and shows the image the model makes of it: the
    mean of p(x|z) (``decoder_mean``), or, for an autoregressive decoder (a PixelCNN
    head), whose mean has no closed form, a draw from p(x|z) shown as each pixel's
    probability (:meth:`vaekit.models.VAE.generate`), with the same uniform numbers
    along a row, drawn from ``generator`` (the global generator when None).

    Rows are ordered by decreasing KL: by ``kl_per_dim`` (``[d]``, e.g. the mean KL per
    dimension over a data set, the better guide to which units are active) when given,
    otherwise by this example's ``KL(q(z_j|x) || N(0, 1))``. ``dims`` limits the rows: an
    int keeps the first ``dims`` of that order, a sequence of indices shows exactly those
    dimensions in the order given. ``image_shape`` is needed only for a flat input whose
    size is not a square. ``scale`` enlarges the PNG (nearest neighbour). Returns the path.
    """
    if not hasattr(model, "config") or not callable(getattr(model, "encode", None)):
        raise TypeError(f"model must be a VAE (a model with config and encode), got {type(model).__name__}")
    d = int(model.config.latent_dim)
    input_shape = tuple(model.config.input_shape)
    if image_shape is None:
        shape = _image_shape(input_shape)
    else:
        shape = _image_shape(_check_image_shape(image_shape))
        if math.prod(shape) != math.prod(input_shape):
            raise ValueError(f"image_shape {tuple(image_shape)} must hold the {math.prod(input_shape)} values of the "
                             f"model's input_shape {input_shape}, got {math.prod(shape)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) == input_shape:
        x = x.unsqueeze(0)
    if tuple(x.shape) != (1, *input_shape):
        raise ValueError(f"x must be one example of shape {(1, *input_shape)}, got {tuple(x.shape)}")
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2, got {n_steps!r}")
    span = check_number("span", span, low=0.0, open_low=True)
    if dims is not None and (isinstance(dims, (str, bytes, Mapping))
                             or not isinstance(dims, (numbers.Integral, Iterable))):
        raise TypeError(f"dims must be an int or a sequence of latent dimensions, got {type(dims).__name__}")
    if kl_per_dim is not None:
        try:
            kl_per_dim = torch.as_tensor(kl_per_dim, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"kl_per_dim must be latent_dim={d} numbers, got {type(kl_per_dim).__name__}") from None

    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            posterior = model.encode(x)
            mu, std = posterior.mean[0], posterior.stddev[0]
            if kl_per_dim is None:
                prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(std))
                kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std), prior)
            else:
                kl = kl_per_dim
                if kl.numel() != d:
                    raise ValueError(f"kl_per_dim must have latent_dim={d} entries, got {kl.numel()}")
                if not bool(torch.isfinite(kl).all()):  # (on the host) NaN would order the rows at random
                    raise ValueError(f"kl_per_dim must hold finite numbers, got {kl.tolist()}")
            order = torch.argsort(kl.cpu().double(), descending=True, stable=True).tolist()
            if dims is None:
                chosen = order
            elif isinstance(dims, numbers.Integral):
                chosen = order[:check_int("dims", dims, low=1)]
            else:
                chosen = dims.tolist() if isinstance(dims, (Tensor, np.ndarray)) else list(dims)
            if not chosen or any(isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < d
                                 for j in chosen):
                raise ValueError(f"dims must select latent dimensions (ints in [0, {d})), got {dims!r}")
            chosen = [int(j) for j in chosen]

            values = torch.linspace(-span, span, n_steps, dtype=mu.dtype, device=mu.device)
            z = mu.repeat(len(chosen) * n_steps, 1)
            for row, j in enumerate(chosen):
                z[row * n_steps : (row + 1) * n_steps, j] = values
            if getattr(model, "pixelcnn", None) is not None:
                images = _row_draws(model, z, n_steps, generator)
            else:
                images = _images_of(model, z)
    finally:
        if was_training:
            model.train()
    return save_image_grid(images.reshape(-1, *shape), path, nrow=n_steps, scale=scale)


def _fits(shape: tuple, scale: int, n: int, nrow: int) -> bool:
    """Whether a grid of ``n`` images of ``shape``, ``nrow`` a row (save_image_grid's default
    padding), enlarged ``scale`` times, is one Pillow opens."""
    h, w = _grid_size(n, *shape[-2:], nrow, 2)
    return h * w * scale * scale <= MAX_GRID_PIXELS


def _pictures_that_fit(shape: tuple, scale: int, nrow: int = 8) -> int:
    """64 images a run's grid, or the most (an even count) whose grid Pillow still opens:
    a run on large images keeps its pictures rather than fail after its training."""
    return next((n for n in (64, 56, 48, 40, 32, 24, 16, 8, 6, 4, 2) if _fits(shape, scale, n, nrow)), 0)


KL_EXAMPLES = 10_000  # the examples whose mean KL per dimension orders a run's traversals


def save_run_pictures(model, x: Tensor, run_dir, history: list, *, seed: int = 0) -> None:
    """The pictures of a training run, into ``run_dir``: ``reconstructions.png`` (up to 32
    examples of ``x``, each with its reconstruction to its right: four pairs a row),
    ``samples.png`` (64 draws),
    ``curves.png`` (from ``history``, the rows of ``metrics.csv``) and
    ``traversals.png`` (the first example, the 10 latent dimensions of highest mean KL over
    the first ``KL_EXAMPLES`` examples of ``x``).
    Data that are not images (a vector whose length is not a square) get the curves only;
    images so large that these grids would pass what Pillow opens get fewer of them. The
    curves come last: their file says the pictures are all there (a resume of a finished
    run makes them again without it). An autoregressive decoder's draws (reconstructions,
    samples, traversals) each come from a generator seeded with ``seed``: the pictures of
    one seed are the same. Data shown or decoded means outside [0, 1] are clipped to it,
    and a note on stderr says so."""
    run_dir = Path(run_dir)
    _save_image_pictures(model, x, run_dir, seed)
    if history:
        plot_curves(history, run_dir / "curves.png")


def _save_image_pictures(model, x: Tensor, run_dir: Path, seed: int) -> None:
    from .latents import kl_per_dimension

    try:
        shape = _image_shape(model.config.input_shape)
    except ValueError:
        return
    model.eval()
    scale = max(1, 112 // shape[-1])
    count = _pictures_that_fit(shape, scale)
    if not count:  # images too large for one picture Pillow opens
        return
    data, x = x, x[:count // 2].to(next(model.parameters()).device)

    def seeded():  # one generator a picture: each picture's draws the same whatever the others draw
        return torch.Generator(device=x.device).manual_seed(seed)

    rec = model.reconstruct(x, generator=seeded())
    pairs = torch.stack([x, rec], 1).reshape(-1, *x.shape[1:])  # input, then its reconstruction
    save_image_grid(pairs.cpu(), run_dir / "reconstructions.png", nrow=8, scale=scale, image_shape=shape)
    samples = model.sample(count, generator=seeded())
    save_image_grid(samples.cpu(), run_dir / "samples.png", nrow=8, scale=scale, image_shape=shape)
    _note_clipped(run_dir, x, torch.cat([rec.flatten(), samples.flatten()]))
    dims = next((d for d in range(min(10, model.config.latent_dim), 0, -1) if _fits(shape, scale, 9 * d, 9)), 0)
    if dims:  # a row of 9 values for each of the dimensions of highest KL that fit
        try:
            kl = kl_per_dimension(model, data[:KL_EXAMPLES])  # over the data, not over the examples shown
        except ValueError:  # the encoder's mu or logvar not finite
            kl = torch.tensor(float("nan"))
        if not bool(torch.isfinite(kl).all()):  # a model gone to NaN: no order of its dimensions to show
            (run_dir / "traversals.png").unlink(missing_ok=True)  # nor an earlier picture standing for it
            print(f"vaekit: note: the model's KL per latent dimension is not finite; {run_dir} has no "
                  "traversals.png", file=sys.stderr, flush=True)
            return
        save_traversals(model, x[:1], run_dir / "traversals.png", kl_per_dim=kl, dims=dims, scale=scale,
                        image_shape=shape, generator=seeded())


def _note_clipped(run_dir: Path, data: Tensor, means: Tensor) -> None:
    """One line on stderr where the ``data`` shown or the decoded ``means`` lie outside
    [0, 1], which the pictures clip: data on [-1, 1] would look as if half were black.
    Data within half a grey level of it are drawn exactly; a Gaussian decoder's means
    stray a little past its data's range, so they are named only a tenth of it past."""
    out = {}
    for name, t, slack in (("the data shown", data, 0.5 / 255), ("the decoded means", means, 0.1)):
        if t.numel() and not bool(((t >= -slack) & (t <= 1 + slack)).all()):
            finite = t[torch.isfinite(t)]
            bad = t.numel() - finite.numel()
            shown = f"values in [{float(finite.min()):g}, {float(finite.max()):g}]" if finite.numel() else ""
            if bad:
                shown += f"{', ' if shown else ''}{bad} of {t.numel()} not finite"
            out[name] = shown
    if out:
        ranges = " and ".join(f"{name} ({shown})" for name, shown in out.items())
        print(f"vaekit: note: {ranges} lie outside [0, 1]; the pictures in {run_dir} clip them to [0, 1]",
              file=sys.stderr, flush=True)
