"""The sprites: a data set with known generative factors, rendered here, for the
disentanglement scores of :mod:`vaekit.disentangle`.

A dSprites-like set: 64x64 binary images of one white shape on black, with
five independent factors of sizes ``sprite_factor_sizes = (3, 6, 40, 32, 32)``:

====  ===========  ======  =====================================================
k     factor       values  meaning
====  ===========  ======  =====================================================
0     shape        3       square, ellipse, heart
1     scale        6       ``linspace(0.5, 1, 6)`` times a 10 pixel half-size
2     orientation  40      ``2*pi*i/40``, i = 0..39
3     pos_x        32      centre column ``16 + i`` pixels, i = 0..31
4     pos_y        32      centre row, the same grid
====  ===========  ======  =====================================================

As in the original, the square looks the same after a quarter turn and the ellipse after
a half turn, so orientation is only partly identifiable from their images; only the heart
shows all 40 orientations. The full product is 737,280 images, 737280 * 4096 bytes = 3.0 GB
as uint8 (12 GB as float32), so images are rendered on demand: ``make_sprites`` and
``FactorSampler`` draw random factors, ``iter_all`` walks the whole set in batches.

How it differs from dSprites (Matthey et al. 2017): the images come from our own
rasteriser (a point-in-shape test at each pixel centre, after undoing the shape's
translation, rotation and scale), not from the original files; the heart is the implicit
curve ``(x^2 + y^2 - 1)^3 = x^2 y^3``; the square is 20x20 and the ellipse 20x10 pixels at
scale 1; orientations are 40 distinct angles (the original's ``linspace(0, 2*pi, 40)``
repeats 0 as 2*pi); positions keep every rotated shape inside the frame. Scores on it are
comparable between models trained here, not digit for digit with published dSprites numbers.

**Samplers.** ``FactorSampler(sizes, render)`` draws uniform independent factors and their
observations (without ``render``, the factor indices themselves, a stand-in world where a
representation can be written down by hand); ``SpritesFactors()`` is the sprites' sampler.

Rendering costs about 0.15 ms an image on one CPU thread.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .checks import MAX_GENERATOR_SEED, check_int

__all__ = ["sprite_factor_sizes", "sprite_factor_names", "render_sprites", "sample_factors", "make_sprites",
           "iter_all", "FactorSampler", "SpritesFactors", "MAX_SPRITES"]

sprite_factor_sizes = (3, 6, 40, 32, 32)
sprite_factor_names = ("shape", "scale", "orientation", "pos_x", "pos_y")
# The number of distinct sprites (vaekit.data imports this module, so it defines its own).
MAX_SPRITES = math.prod(sprite_factor_sizes)
# The most factor rows one call draws: 80 MB a factor (the metrics draw thousands).
_MAX_DRAWS = 10_000_000

_SIZE = 64
_HALF = 10.0  # pixels from the centre to a square's side at scale 1
_SCALES = torch.linspace(0.5, 1.0, 6)
_ANGLES = torch.arange(40) * (2 * math.pi / 40)
# Whole-pixel steps put every centre on a pixel corner, so unrotated shapes come out
# symmetric; a square's half-diagonal at scale 1 is 14.1 px, inside the 16 px margin.
_POSITIONS = torch.arange(32, dtype=torch.float32) + 16.0
_HEART_WIDTH = 1.139  # half-width of (x^2+y^2-1)^3 = x^2 y^3; it spans y in [-1, 1.236]
_HEART_MIDDLE = 0.118


def _check_sizes(factor_sizes) -> tuple[int, ...]:
    """``factor_sizes`` as a tuple of ints, if it is a non-empty sequence of ints >= 1."""
    if isinstance(factor_sizes, (str, bytes)) or not hasattr(factor_sizes, "__iter__"):
        raise TypeError(f"factor_sizes must be a sequence of ints >= 1, got {type(factor_sizes).__name__}")
    sizes = tuple(factor_sizes)
    if not sizes:
        raise ValueError("factor_sizes must hold at least one factor size, got ()")
    return tuple(check_int(f"factor_sizes[{k}]", s, low=1) for k, s in enumerate(sizes))


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype):  # .to() would read a str as a device
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")


def _check_factors(factors: Tensor, sizes: Sequence[int]) -> None:
    if not isinstance(factors, Tensor) or factors.dtype != torch.long:
        raise TypeError(f"factors must be a torch.long tensor, got {getattr(factors, 'dtype', type(factors))}")
    if factors.dim() != 2 or factors.shape[1] != len(sizes):
        raise ValueError(f"factors must have shape [N, {len(sizes)}], got {tuple(factors.shape)}")
    bad = (factors < 0) | (factors >= torch.tensor(sizes))
    if bad.any():
        k = int(bad.any(0).nonzero()[0])
        raise ValueError(f"factors[:, {k}] must lie in [0, {sizes[k]}), got values {factors[bad.any(1), k].unique().tolist()}")


def render_sprites(factors: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Render sprites for factor indices ``[N, 5]`` (long) as ``[N, 1, 64, 64]`` in {0, 1}.

    A pixel is on when its centre ``p`` lies inside the shape: with centre ``c``, angle
    ``theta`` and scale ``s``, the local point ``q = R(-theta) (p - c) / (10 s)`` must satisfy
    ``max(|q_x|, |q_y|) <= 1`` (square), ``q_x^2 + (2 q_y)^2 <= 1`` (ellipse) or
    ``(u^2 + v^2 - 1)^3 <= u^2 v^3`` with ``(u, v) = 1.139 (q_x, -q_y) + (0, 0.118)``
    (heart, tip down at angle 0). Vectorised over N and the pixels; deterministic.
    """
    _check_factors(factors, sprite_factor_sizes)
    _check_dtype(dtype)
    inside = torch.empty(len(factors), _SIZE, _SIZE, dtype=torch.bool, device=factors.device)
    # Each shape's test runs only on its own sprites: the heart's cubic costs the most.
    for shape in range(3):
        index = (factors[:, 0] == shape).nonzero().squeeze(1)
        if len(index):
            qx, qy = _local_coordinates(factors[index])
            inside[index] = _inside_shape(shape, qx, qy)
    return inside.unsqueeze(1).to(dtype)


def _local_coordinates(factors: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel centres in each sprite's frame, ``q = R(-theta) (p - c) / (10 s)``: two ``[N, 64, 64]``."""
    device = factors.device
    scale = _SCALES.to(device)[factors[:, 1]][:, None, None] * _HALF
    angle = _ANGLES.to(device)[factors[:, 2]][:, None, None]
    cx = _POSITIONS.to(device)[factors[:, 3]][:, None, None]
    cy = _POSITIONS.to(device)[factors[:, 4]][:, None, None]
    centres = torch.arange(_SIZE, device=device, dtype=torch.float32) + 0.5
    dx, dy = centres[None, None, :] - cx, centres[None, :, None] - cy
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return cos * dx + sin * dy, cos * dy - sin * dx


def _inside_shape(shape: int, qx: Tensor, qy: Tensor) -> Tensor:
    if shape == 0:
        return torch.maximum(qx.abs(), qy.abs()) <= 1.0
    if shape == 1:
        return qx.square() + (2.0 * qy).square() <= 1.0
    u, v = _HEART_WIDTH * qx, _HEART_MIDDLE - _HEART_WIDTH * qy
    return (u.square() + v.square() - 1.0) ** 3 <= u.square() * v**3


def sample_factors(n: int, generator: torch.Generator | None = None, factor_sizes: Sequence[int] = sprite_factor_sizes) -> Tensor:
    """Factor indices ``[n, K]`` (long), each factor uniform and independent of the others."""
    n = check_int("n", n, high=_MAX_DRAWS)
    cols = [torch.randint(s, (n,), generator=generator) for s in _check_sizes(factor_sizes)]
    return torch.stack(cols, 1)


def _render_chunked(factors: Tensor, dtype: torch.dtype, chunk: int = 1024) -> Tensor:
    # A chunk's intermediates are ~10 float tensors of chunk*4096 values: 160 MB at 1024.
    if len(factors) == 0:
        return torch.zeros(0, 1, _SIZE, _SIZE, dtype=dtype)
    return torch.cat([render_sprites(f, dtype=dtype) for f in factors.split(chunk)])


def make_sprites(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` random sprites: images ``[n, 1, 64, 64]`` float32 in {0, 1} and factors ``[n, 5]`` long.

    ``n`` is at most ``MAX_SPRITES``, the number of distinct sprites (3 GB of images).
    """
    check_int("n", n, high=MAX_SPRITES)
    check_int("seed", seed, high=MAX_GENERATOR_SEED)
    factors = sample_factors(n, torch.Generator().manual_seed(seed))
    return _render_chunked(factors, torch.float32), factors


def iter_all(batch_size: int = 4096, *, dtype: torch.dtype = torch.uint8) -> Iterator[tuple[Tensor, Tensor]]:
    """Every sprite once, in lexicographic factor order (pos_y fastest), as ``(images, factors)``
    batches. The arguments are checked at the call, not at the first batch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_dtype(dtype)
    return _iter_all(batch_size, dtype)


def _iter_all(batch_size: int, dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    total = math.prod(sprite_factor_sizes)
    strides = [math.prod(sprite_factor_sizes[k + 1 :]) for k in range(len(sprite_factor_sizes))]
    for start in range(0, total, batch_size):
        index = torch.arange(start, min(start + batch_size, total))
        factors = torch.stack([(index // st) % sz for st, sz in zip(strides, sprite_factor_sizes)], 1)
        yield _render_chunked(factors, dtype), factors


class FactorSampler:
    """Uniform independent factors and their observations ``render(factors)``.

    Without ``render`` the observations are the factor indices as float32 ``[n, K]``:
    a stand-in world where a representation can be written down by hand.
    """

    def __init__(self, factor_sizes: Sequence[int], render: Callable[[Tensor], Tensor] | None = None) -> None:
        if render is not None and not callable(render):
            raise TypeError(f"render must be callable (factors -> observations) or None, got {type(render).__name__}")
        self.factor_sizes = _check_sizes(factor_sizes)
        self.render = render

    def _observe(self, factors: Tensor) -> Tensor:
        return factors.float() if self.render is None else self.render(factors)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        factors = sample_factors(n, generator, self.factor_sizes)
        return self._observe(factors), factors

    def sample_with_fixed(
        self, n: int, factor_index: int, value, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` draws with factor ``factor_index`` set to ``value`` (an int, or ``[n]`` values)."""
        n = check_int("n", n, high=_MAX_DRAWS)
        check_int("factor_index", factor_index, high=len(self.factor_sizes) - 1)
        if isinstance(value, Tensor):
            if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
                raise TypeError(f"value must be an int or an integer tensor, got dtype {value.dtype}")
            if value.dim() > 1 or (value.dim() == 1 and len(value) != n):
                raise ValueError(f"value must be an int or a tensor of shape [{n}], got shape {tuple(value.shape)}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"value must be an int or an integer tensor of shape [{n}], got {type(value).__name__}")
        else:
            check_int("value", value, high=self.factor_sizes[factor_index] - 1)
        factors = sample_factors(n, generator, self.factor_sizes)
        factors[:, factor_index] = torch.as_tensor(value, dtype=torch.long)
        _check_factors(factors, self.factor_sizes)
        return self._observe(factors), factors


class SpritesFactors(FactorSampler):
    """The sprites world: observations are ``render_sprites(factors)`` ``[n, 1, 64, 64]``."""

    names = sprite_factor_names

    def __init__(self) -> None:
        super().__init__(sprite_factor_sizes, lambda f: _render_chunked(f, torch.float32))
