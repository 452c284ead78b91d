"""An autoregressive decoder head: a small PixelCNN conditioned on the latent code.

With ``ModelConfig(pixelcnn_layers=L)`` the decoder no longer treats pixels as independent
given ``z``. It factorises

    p(x | z) = prod_i p(x_i | x_<i, z)        (pixels in raster order)

with each factor a Bernoulli whose logit comes from masked convolutions over the pixels
already seen (van den Oord et al. 2016, "Pixel Recurrent Neural Networks") plus the
ordinary decoder's output for ``z``. The channels of one pixel are independent given the
pixels before it and ``z``. Training and likelihood evaluation need one forward pass
(the true pixels are the inputs: teacher forcing); drawing a sample needs one pass per
pixel (:func:`sample_pixels`).

This is the design of the PixelVAE (Gulrajani et al. 2017) and of the variational lossy
autoencoder (Chen et al. 2017), reduced to its core: a local autoregressive model takes the
pixel-level detail, the latent code the global structure. Their MNIST results (about 79
nats) are the reason it is here: an MLP decoder with independent pixels stalls near 84.

The last 1 x 1 convolution starts at zero, so an untrained head computes exactly the
plain decoder's logits: the autoregressive part is learned as a correction.

Where ``z`` enters is a choice (``fusion``). ``"early"``: the decoder's maps feed every
masked layer, so all of the head runs once per ``z``. ``"late"``: the masked layers read the
pixels only and end in, for each pixel, an offset and nine weights for the decoder's logits
in the 3 x 3 window around it:

    logit_i = l_i(z) + o_i(x_<i) + sum_t a_ti(x_<i) l_(i+t)(z)

``z`` enters linearly, through the decoder's logits ``l``. An importance-weighted estimate
decodes ``k`` latents for each image: with late fusion the masked layers run once per image,
not ``k`` times (:meth:`PixelCNNHead.run_samples`), and each sample costs the plain decoder
plus a few operations per pixel, which makes ``k = 5000`` affordable on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .iw import repeat_for_samples

__all__ = ["FUSIONS", "MaskedConv2d", "PixelCNNHead", "sample_pixels"]

FUSIONS = ("early", "late")


class MaskedConv2d(nn.Conv2d):
    """A 2-d convolution that sees only the pixels before the centre in raster order.

    ``mask="A"`` also hides the centre pixel (the first layer: an output must not see its
    own input); ``mask="B"`` shows it (later layers, whose inputs at the centre already
    depend only on earlier pixels). Every input channel of a pixel is masked alike.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask: str) -> None:
        if mask not in ("A", "B"):
            raise ValueError(f"mask must be 'A' or 'B', got {mask!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        k = kernel_size
        m = torch.zeros(k, k)
        m[: k // 2] = 1.0  # the rows above
        m[k // 2, : k // 2 + (mask == "B")] = 1.0  # the centre row: left of the centre (and the centre for B)
        self.register_buffer("mask", m.expand(out_channels, in_channels, k, k).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNNHead(nn.Module):
    """Logits of ``p(x_i | x_<i, z)`` from the pixels ``x`` and the decoder's maps ``cond``.

    ``fusion="early"``: layer 0 is a 7 x 7 mask-A convolution of ``x`` plus a 3 x 3
    convolution of ``cond``; layers 1..L-1 are residual 3 x 3 mask-B convolutions, each also
    fed ``cond``; a 1 x 1 convolution makes one logit per channel, added to ``cond``.
    ``fusion="late"``: the same masked layers without ``cond``; a 1 x 1 convolution makes, per
    channel, an offset and nine weights that mix ``cond`` over the 3 x 3 window (module notes).
    Either way the last convolution starts at zero, so an untrained head gives ``cond``.

    Args:
        channels: image channels ``C`` (``x`` and ``cond`` are ``[B, C, H, W]``).
        width: feature maps of the masked layers.
        layers: masked layers (>= 1).
        activation: the module class between layers.
        fusion: ``"early"`` or ``"late"`` (where ``cond`` enters).
    """

    def __init__(self, channels: int, width: int, layers: int, activation: type[nn.Module],
                 fusion: str = "early") -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        self.fusion = fusion
        self.masked = nn.ModuleList(
            [MaskedConv2d(channels, width, 7, "A")] + [MaskedConv2d(width, width, 3, "B") for _ in range(layers - 1)]
        )
        # cond depends on z only, never on x: its convolutions need no mask.
        n_cond = layers if fusion == "early" else 0
        self.cond = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1) for _ in range(n_cond)])
        self.act = activation()
        self.out = nn.Conv2d(width, channels * (1 if fusion == "early" else 1 + _TAPS), 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def rows_above(self) -> int:
        """How many rows above its own an output reads: 3 for the 7 x 7 layer, 1 per 3 x 3."""
        return 3 + (len(self.masked) - 1)

    def condition(self, cond: Tensor) -> list[Tensor]:
        """What each layer takes from ``cond`` (it depends on ``z`` only: computed once per
        ``z``). Late fusion: ``cond`` over each pixel's 3 x 3 window, ``[N, C * 9, H, W]``."""
        if self.fusion == "late":
            n, c, h, w = cond.shape
            return [F.unfold(cond, 3, padding=1).reshape(n, c * _TAPS, h, w)]
        return [conv(cond) for conv in self.cond]

    def mixing(self, x: Tensor) -> Tensor:
        """Late fusion: per pixel and channel, the nine window weights and the offset,
        ``[B, C, 10, H, W]``; they depend on ``x`` only (on the pixels before each one)."""
        h = self.act(self.masked[0](x))
        for layer in self.masked[1:]:
            h = h + self.act(layer(h))
        m = self.out(h)
        return m.reshape(m.shape[0], -1, 1 + _TAPS, *m.shape[2:])

    def run(self, x: Tensor, cond: Tensor, features: list[Tensor] | None = None) -> Tensor:
        """The logits from ``x`` and ``cond`` (``features``: :meth:`condition` of ``cond``,
        computed once when many calls share one ``cond``). Rows may be cut off at the
        bottom, alike in ``x``, ``cond`` and ``features``: no output looks at a later row."""
        if features is None:
            features = self.condition(cond)
        if self.fusion == "late":
            return _mix(self.mixing(x), features[0].unflatten(1, (cond.shape[1], _TAPS)), cond)
        h = self.act(self.masked[0](x) + features[0])
        for layer in range(1, len(self.masked)):
            h = h + self.act(self.masked[layer](h) + features[layer])
        return cond + self.out(h)

    def run_samples(self, x: Tensor, cond: Tensor, mixing: Tensor | None = None) -> Tensor:
        """Logits for ``k`` decoder maps per image: ``x`` ``[B, C, H, W]``, ``cond``
        ``[k, B, C, H, W]`` -> ``[k, B, C, H, W]``; equal to :meth:`run` on ``x`` repeated
        ``k`` times. With late fusion the masked layers run once per image, not ``k`` times
        (``mixing``: :meth:`mixing` of ``x``, when already computed)."""
        k, b, c, hh, ww = cond.shape
        flat = cond.reshape(k * b, c, hh, ww)
        if self.fusion == "early":
            return self.run(repeat_for_samples(x, k), flat).unflatten(0, (k, b))
        windows = self.condition(flat)[0].reshape(k, b, c, _TAPS, hh, ww)
        return _mix(self.mixing(x) if mixing is None else mixing, windows, cond)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.run(x, cond)


_TAPS = 9  # a 3 x 3 window


def _mix(mixing: Tensor, windows: Tensor, cond: Tensor) -> Tensor:
    """Late fusion's logits ``cond + offset + sum_t weight_t * window_t``. ``mixing``
    ``[B, C, 10, H, W]``; ``windows`` ``[..., B, C, 9, H, W]`` and ``cond`` ``[..., B, C, H, W]``
    with the same leading sample dimensions (the mixing maps broadcast over them)."""
    return cond + mixing[:, :, _TAPS] + (mixing[:, :, :_TAPS] * windows).sum(-3)


@torch.no_grad()
def sample_pixels(head: PixelCNNHead, cond: Tensor, *, generator: torch.Generator | None = None,
                  probabilities: bool = True, uniforms: Tensor | None = None) -> Tensor:
    """Draw ``x ~ p(x | z)`` pixel by pixel (``H * W`` passes of ``head`` over a band of rows).

    Args:
        head: the autoregressive head.
        cond: the plain decoder's maps for ``z``, ``[B, C, H, W]``.
        generator: for the Bernoulli draws: one uniform number a pixel, all drawn before
            the first pixel (``[B, C, H, W]``, so an image's draw does not depend on how
            many images are drawn with it).
        probabilities: return, for each pixel, its probability of being 1 given the pixels
            drawn before it (a grey-level picture of the sample, smoother than the 0/1
            draw); ``False`` returns the 0/1 draw itself.
        uniforms: those numbers, given (``cond``'s shape) instead of drawn: pixel ``x_i``
            is 1 where ``uniforms_i < p(x_i = 1 | x_<i, z)``.
    """
    if uniforms is None:
        uniforms = torch.rand(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
    elif tuple(uniforms.shape) != tuple(cond.shape):
        raise ValueError(f"uniforms must have cond's shape {tuple(cond.shape)}, got {tuple(uniforms.shape)}")
    _, _, h, w = cond.shape
    features = head.condition(cond)
    x = torch.zeros_like(cond)
    probs = torch.zeros_like(cond)
    for i in range(h):
        # Row i reads rows i - rows_above .. i only: the rest is not computed. (Within the
        # window, rows near its top see zero padding in place of the rows cut off; row i's
        # outputs never read them, so they are exact.)
        top = max(0, i - head.rows_above)
        rows = slice(top, i + 1)
        feats = [f[:, :, rows] for f in features]
        for j in range(w):
            logits = head.run(x[:, :, rows], cond[:, :, rows], feats)[:, :, i - top, j]
            p = torch.sigmoid(logits)
            x[:, :, i, j] = (uniforms[:, :, i, j] < p).to(x.dtype)
            probs[:, :, i, j] = p
    return probs if probabilities else x
