"""What a VAE is made of, as data: :class:`ModelConfig` and the values its fields accept.

The config names an architecture (``arch``, ``hidden``, ``activation``), a latent size and
the decoder's likelihood with its variance; :class:`vaekit.models.VAE` builds the networks
from it. Every field is checked in ``__post_init__`` and an error names the field it is
about (``ModelConfig.latent_dim must be an integer in [1, 2147483647], got 0``). ``to_dict`` gives the
JSON that :func:`vaekit.io.save_model` writes beside the weights, and the command line's
``--help`` takes each field's description from the class docstring (:mod:`vaekit.flags`).

``ARCHS``, ``ACTIVATIONS``, ``LIKELIHOODS`` and ``DECODER_VARIANCES`` are the choices
those fields accept. :mod:`vaekit.models` re-exports everything listed in ``__all__``, so
``from vaekit.models import ModelConfig`` keeps working and remains the import to write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .checks import in_section, refuse_inert, reset_inert
from .losses import RECONSTRUCTIONS
from .pixelcnn import FUSIONS

__all__ = ["ModelConfig", "ARCHS", "ACTIVATIONS", "LIKELIHOODS", "DECODER_VARIANCES"]

ARCHS = ("mlp", "conv")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}
LIKELIHOODS = RECONSTRUCTIONS + ("discretized_logistic",)
DECODER_VARIANCES = ("fixed", "learned", "optimal")
MAX_SIZE = 2**31 - 1  # a layer's width, the latent size, a side of the input
# |fixed_logvar| and logvar_limit at most: exp of the log-variance (and of its negative)
# stays a normal float32 (float32 overflows past 88.7)
MAX_LOGVAR = 80.0
MAX_PIXELCNN_LAYERS = 1000  # PixelCNNs are published with up to about 20


# Fields that act only under other fields' settings (:func:`vaekit.checks.refuse_inert`):
# their default, those fields, whether their values let them act, what they need.
_ONLY_WITH = {
    "pixelcnn_width": (64, ("pixelcnn_layers",), lambda n: n > 0, "pixelcnn_layers > 0"),
    "pixelcnn_fusion": ("early", ("pixelcnn_layers",), lambda n: n > 0, "pixelcnn_layers > 0"),
    # the fixed decoder log-variance, or the learned one's starting value
    "fixed_logvar": (0.0, ("likelihood", "decoder_variance"), lambda lik, var: lik == "gaussian" and var != "optimal",
                     "likelihood='gaussian' with decoder_variance 'fixed' or 'learned'"),
}


def model_without_inert(section: dict, keep=()) -> dict:
    """A saved ``model`` section with the fields earlier versions accepted where they had no
    effect (a ``pixelcnn_width`` without a PixelCNN head, ...) set to their defaults, so
    the runs and models saved then still load."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return reset_inert(section, defaults, _ONLY_WITH, keep)


def _size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name} must be {expected}, got {got!r}")  # ModelConfig.: in_section


@dataclass
class ModelConfig:
    """Architecture and likelihood of a VAE. Saved as JSON beside the weights.

    Attributes:
        arch: ``"mlp"`` (fully connected) or ``"conv"`` (stride-2 convolutions).
        input_shape: shape of one example, ``(C, H, W)`` or ``(D,)``.
        latent_dim: size ``d`` of the latent code.
        hidden: MLP layer widths, or the channels of each stride-2 convolution.
        activation: one of ``relu``, ``tanh``, ``elu``, ``gelu``, ``silu``.
        likelihood: the decoder's distribution: ``bernoulli`` (binary data, logits),
            ``continuous_bernoulli`` (grey levels, logits), ``gaussian`` (mean),
            ``mse`` (squared error: the Gaussian of variance 1/2 in disguise, and scored
            as that Gaussian, so that its ELBO is in nats) or
            ``discretized_logistic`` (8-bit images scaled to [0, 1]: a mean and a log-scale
            per subpixel; report it in bits per dimension).
        decoder_variance: for ``gaussian``: ``fixed`` (``fixed_logvar``), ``learned``
            (one log-variance per data dimension, trained with the model) or ``optimal``
            (in training, each example's maximum-likelihood variance, the calibrated
            decoder of Rybkin et al. 2021; in evaluation (``model.eval()``) one variance
            for all, the running mean of the training batches' squared error per
            dimension, kept in the buffer ``decoder_mse``: a variance fitted to the
            example being scored would not make a normalised density, and the ELBO and
            likelihood estimates would not bound a log-likelihood).
        fixed_logvar: the decoder log-variance when it is fixed (``gaussian``); with
            ``learned``, its starting value.
        logvar_limit: the encoder's log-variance is softly bounded to
            ``(-logvar_limit, logvar_limit)`` (``L * tanh(raw / L)``), so ``exp(logvar)``
            can neither overflow nor underflow to an exact zero.
        pixelcnn_layers: masked convolution layers of an autoregressive head on the
            decoder (``p(x|z) = prod_i p(x_i | x_<i, z)``; :mod:`vaekit.pixelcnn`); 0: none,
            pixels independent given ``z``. Needs ``(C, H, W)`` images and ``bernoulli``.
        pixelcnn_width: feature maps of those layers.
        pixelcnn_fusion: where ``z`` enters the head: ``"early"`` (every masked layer) or
            ``"late"`` (one layer after them, so the masked layers read the pixels only and
            an importance-weighted estimate runs them once per image, not once per sample).
    """

    arch: str = "mlp"
    input_shape: tuple = (1, 28, 28)
    latent_dim: int = 16
    hidden: tuple = (512, 256)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    decoder_variance: str = "fixed"
    fixed_logvar: float = 0.0
    logvar_limit: float = 12.0
    pixelcnn_layers: int = 0
    pixelcnn_width: int = 64
    pixelcnn_fusion: str = "early"

    def __post_init__(self) -> None:
        with in_section("ModelConfig"):
            self._check()

    def _check(self) -> None:
        if self.arch not in ARCHS:
            _fail("arch", f"one of {', '.join(ARCHS)}", self.arch)
        if isinstance(self.input_shape, list):
            self.input_shape = tuple(self.input_shape)
        if isinstance(self.hidden, list):
            self.hidden = tuple(self.hidden)
        if (
            not isinstance(self.input_shape, tuple)
            or not self.input_shape
            or not all(_size(s) for s in self.input_shape)
        ):
            _fail("input_shape", f"a non-empty tuple of integers in [1, {MAX_SIZE}]", self.input_shape)
        if not _size(self.latent_dim):
            _fail("latent_dim", f"an integer in [1, {MAX_SIZE}]", self.latent_dim)
        if not isinstance(self.hidden, tuple) or not all(_size(h) for h in self.hidden):
            _fail("hidden", f"a tuple of integers in [1, {MAX_SIZE}]", self.hidden)
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            _fail("activation", f"one of {', '.join(ACTIVATIONS)}", self.activation)
        if not isinstance(self.likelihood, str) or self.likelihood not in LIKELIHOODS:
            _fail("likelihood", f"one of {', '.join(LIKELIHOODS)}", self.likelihood)
        if not isinstance(self.decoder_variance, str) or self.decoder_variance not in DECODER_VARIANCES:
            _fail("decoder_variance", f"one of {', '.join(DECODER_VARIANCES)}", self.decoder_variance)
        if self.decoder_variance != "fixed" and self.likelihood != "gaussian":
            _fail("decoder_variance", "'fixed' unless likelihood is 'gaussian'", self.decoder_variance)
        for name, low in (("fixed_logvar", -MAX_LOGVAR), ("logvar_limit", 0.0)):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not low <= v <= MAX_LOGVAR
                    or (name == "logvar_limit" and v == 0)):
                span = f"[{low:g}, {MAX_LOGVAR:g}]" if low else f"(0, {MAX_LOGVAR:g}]"
                _fail(name, f"a number in {span} (its exp a normal float32)", v)
        v = self.pixelcnn_layers
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_PIXELCNN_LAYERS:
            _fail("pixelcnn_layers", f"an integer in [0, {MAX_PIXELCNN_LAYERS}]", v)
        if not _size(self.pixelcnn_width):
            _fail("pixelcnn_width", f"an integer in [1, {MAX_SIZE}]", self.pixelcnn_width)
        if not isinstance(self.pixelcnn_fusion, str) or self.pixelcnn_fusion not in FUSIONS:
            _fail("pixelcnn_fusion", f"one of {', '.join(FUSIONS)}", self.pixelcnn_fusion)
        refuse_inert(self, _ONLY_WITH)
        if self.pixelcnn_layers:
            if len(self.input_shape) != 3:
                _fail("input_shape", "(C, H, W) images when pixelcnn_layers > 0", self.input_shape)
            if self.likelihood != "bernoulli":
                _fail("likelihood", "'bernoulli' when pixelcnn_layers > 0", self.likelihood)
        if self.arch == "conv":
            if len(self.input_shape) != 3:
                _fail("input_shape", "(C, H, W) for arch 'conv'", self.input_shape)
            if not self.hidden:
                _fail("hidden", "at least one channel count for arch 'conv'", self.hidden)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hidden"] = list(self.hidden)
        return d
