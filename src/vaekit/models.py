"""Encoders, decoders and the VAE module.

``VAE.encode(x)`` returns the posterior q(z|x) as a distribution object
(``Independent(Normal(mu, sigma), 1)``), so ``rsample``, ``log_prob`` and
``kl_divergence`` come from ``torch.distributions``. ``VAE.decode(z)`` returns the
likelihood's parameters (logits, or a mean and a log-variance), never probabilities.
The objective itself lives in :mod:`vaekit.losses`.

The networks are built from a :class:`ModelConfig`. It is defined, with the choices its
fields accept, in :mod:`vaekit.model_config`, and re-exported here: ``vaekit.models`` stays
its public home.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from .checks import check_finite, check_generator, validating
from .iw import noise_dtype, repeat_for_samples
from .losses import reconstruction_nll
from .likelihoods import bernoulli_nll_samples, discretized_logistic_nll, optimal_sigma_nll
from .model_config import ACTIVATIONS, ARCHS, DECODER_VARIANCES, LIKELIHOODS, ModelConfig
from .pixelcnn import PixelCNNHead, sample_pixels

# Squared error is the Gaussian negative log-likelihood of variance 1/2 less (D/2) log(pi).
_MSE_LOGVAR = math.log(0.5)
# decoder_variance="optimal": the evaluation variance is the mean of the training batches'
# mean squared errors over the first 1/_MSE_MOMENTUM steps, then an exponential average.
_MSE_MOMENTUM = 0.01
_MIN_OPTIMAL_LOGVAR = -9.0  # optimal_sigma_nll's default floor, for the evaluation variance too
# The most parameters a VAE is built with (8 GiB in float32), and the most elements one
# call of sample() decodes at its peak (8 GiB in float32): larger sizes are typing
# mistakes, refused at once where they would take minutes and then fail in the allocator.
MAX_PARAMETERS = 2**31
MAX_SAMPLE_NUMEL = 2**31

__all__ = ["ModelConfig", "VAE", "VAEOutput", "likelihood_mean", "ARCHS", "ACTIVATIONS", "LIKELIHOODS", "DECODER_VARIANCES"]


def likelihood_mean(kind: str, decoder_out) -> Tensor:
    """The mean of p(x|z) from the decoder's parameters, for likelihood ``kind``.

    * ``bernoulli``: ``sigmoid(logits)``;
    * ``continuous_bernoulli``: the distribution's mean, which is *not* ``sigmoid(logits)``:
      ``E[x] = 1/(1 - exp(-l)) - 1/l`` (1/2 at l = 0), in float64: ``-1/expm1(-l) - 1/l``,
      and its series ``1/2 + l/12 - l^3/720 + ...`` for ``|l| < 0.1``, where the two terms
      cancel (``torch.distributions.ContinuousBernoulli`` clamps ``sigmoid(l)`` to
      ``[eps, 1 - eps]``: its mean is wrong past ``|l|`` of about 36);
    * ``gaussian`` / ``mse``: the mean (the first element of a ``(mean, logvar)`` pair);
    * ``discretized_logistic``: the logistic's location, clipped to [0, 1] (the edge bins
      take the mass beyond).
    """
    if kind in ("gaussian", "mse", "discretized_logistic"):
        mean = decoder_out[0] if isinstance(decoder_out, (tuple, list)) and decoder_out else decoder_out
        if not isinstance(mean, Tensor):
            raise TypeError(f"decoder_out must be a mean tensor or a (mean, ...) pair, "
                            f"got {type(decoder_out).__name__}")
        return mean.clamp(0.0, 1.0) if kind == "discretized_logistic" else mean
    if isinstance(decoder_out, (tuple, list)):
        raise TypeError(f"a {kind} decoder returns a logits tensor, got a {type(decoder_out).__name__}")
    if kind in ("bernoulli", "continuous_bernoulli") and not isinstance(decoder_out, Tensor):
        raise TypeError(f"decoder_out must be a logits tensor, got {type(decoder_out).__name__}")
    if kind == "bernoulli":
        return torch.sigmoid(decoder_out)
    if kind == "continuous_bernoulli":
        l = decoder_out.double()
        near = l.abs() < 0.1  # the series' next term, l^9 / 4.8e7, is below 2e-17 there
        far = torch.where(near, 1.0, l)
        l2 = l * l
        series = 0.5 + l * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240 - l2 / 1209600)))
        return torch.where(near, series, -1 / torch.expm1(-far) - 1 / far).to(decoder_out.dtype)
    raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {kind!r}")


class VAEOutput(NamedTuple):
    """What the loss needs: decoder parameters, posterior parameters and the sample."""

    decoder_out: Union[Tensor, tuple]
    mu: Tensor
    logvar: Tensor
    z: Tensor


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers)


def _n_parameters(config: ModelConfig) -> int:
    """The parameters :class:`VAE` builds for ``config``, counted before building it."""
    shape, d, hidden = config.input_shape, config.latent_dim, config.hidden
    n_out = 2 if config.likelihood == "discretized_logistic" else 1

    def layers(sizes, k=1):  # weights and biases of a chain of layers (k x k kernels)
        return sum(a * b * k * k + b for a, b in zip(sizes[:-1], sizes[1:]))

    if config.arch == "mlp":
        n_in = math.prod(shape)
        feat = hidden[-1] if hidden else n_in
        widths = [d, *reversed(hidden)]
        n = layers([n_in, *hidden]) + layers([feat, 2 * d]) + layers(widths) + layers([widths[-1], n_out * n_in])
    else:
        c = shape[0]
        chans = [c, *hidden]
        feat = chans[-1] * _conv_sizes(shape[1], len(hidden))[-1] * _conv_sizes(shape[2], len(hidden))[-1]
        n = layers(chans, 3) + layers([feat, 2 * d]) + layers([d, feat])
        n += layers([*reversed(chans[1:]), chans[1]], 3) + layers([chans[1], n_out * c], 3)
    if config.pixelcnn_layers:
        c, width, k = shape[0], config.pixelcnn_width, config.pixelcnn_layers
        n += layers([c, width], 7) + (k - 1) * layers([width, width], 3)
        n += layers([width, c * (1 if config.pixelcnn_fusion == "early" else 10)])
        if config.pixelcnn_fusion == "early":
            n += k * layers([c, width], 3)
    if config.decoder_variance == "learned":
        n += math.prod(shape)
    return n


def _conv_sizes(size: int, n: int) -> list[int]:
    """Spatial sizes after each stride-2, kernel-3, padding-1 convolution."""
    sizes = [size]
    for _ in range(n):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class VAE(nn.Module):
    """A variational autoencoder with a diagonal-Gaussian posterior and N(0, I) prior.

    Example:
        >>> model = VAE(ModelConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(64,)))
        >>> out = model(torch.rand(2, 1, 8, 8))
        >>> out.mu.shape
        torch.Size([2, 4])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        config.__post_init__()  # again: its fields may have been set since it was made
        n_params = _n_parameters(config)
        if n_params > MAX_PARAMETERS:
            head = f", pixelcnn_width={config.pixelcnn_width}" if config.pixelcnn_layers else ""
            raise ValueError(f"config (input_shape={config.input_shape}, hidden={config.hidden}, latent_dim="
                             f"{config.latent_dim}{head}) makes a model of {n_params} parameters, over the "
                             f"{MAX_PARAMETERS} (8 GiB in float32) a VAE is built with; use narrower layers or a "
                             f"smaller input")
        self.config = config
        act = ACTIVATIONS[config.activation]
        shape = config.input_shape
        d = config.latent_dim
        # The discretized logistic takes two maps per channel: a mean and a log-scale.
        n_out = 2 if config.likelihood == "discretized_logistic" else 1
        if config.arch == "mlp":
            n_in = math.prod(shape)
            self.encoder = nn.Sequential(nn.Flatten(), _mlp([n_in, *config.hidden], act))
            feat = config.hidden[-1] if config.hidden else n_in
            self.head = nn.Linear(feat, 2 * d)
            widths = [d, *reversed(config.hidden)]
            self.decoder = nn.Sequential(
                _mlp(widths, act), nn.Linear(widths[-1], n_out * n_in), nn.Unflatten(1, (n_out * shape[0], *shape[1:]))
            )
        else:
            c, h, w = shape
            hs, ws = _conv_sizes(h, len(config.hidden)), _conv_sizes(w, len(config.hidden))
            chans = [c, *config.hidden]
            enc: list[nn.Module] = []
            for a, b in zip(chans[:-1], chans[1:]):
                enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), act()]
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            feat = chans[-1] * hs[-1] * ws[-1]
            self.head = nn.Linear(feat, 2 * d)
            dec: list[nn.Module] = [nn.Linear(d, feat), act(), nn.Unflatten(1, (chans[-1], hs[-1], ws[-1]))]
            for i in range(len(config.hidden), 0, -1):
                # output_padding makes each transposed convolution undo its encoder twin exactly.
                op = (hs[i - 1] - (2 * hs[i] - 1), ws[i - 1] - (2 * ws[i] - 1))
                out_c = chans[i - 1] if i > 1 else chans[1]
                dec += [nn.ConvTranspose2d(chans[i], out_c, 3, stride=2, padding=1, output_padding=op), act()]
            dec.append(nn.Conv2d(chans[1], n_out * c, 3, padding=1))
            self.decoder = nn.Sequential(*dec)
        self.pixelcnn = (PixelCNNHead(shape[0], config.pixelcnn_width, config.pixelcnn_layers, act,
                                      config.pixelcnn_fusion) if config.pixelcnn_layers else None)
        self._shared_pixels = None  # (x, the head's mixing maps for it) inside sharing_pixels(x)
        if config.decoder_variance == "learned":
            self.decoder_logvar = nn.Parameter(torch.full(shape, float(config.fixed_logvar)))
        else:
            self.decoder_logvar = None
        if config.decoder_variance == "optimal":  # saved with the weights: the evaluation variance
            self.register_buffer("decoder_mse", torch.ones(()))
            self.register_buffer("decoder_mse_steps", torch.zeros(()))
        self._data_parallel = False  # set by vaekit.wiring under torchrun: decoder_mse from the combined batch

    # -- the two halves -----------------------------------------------------------------

    def encoder_head(self, x: Tensor) -> Tensor:
        """The encoder's output layer, ``[B, 2d]``: ``mu``, then the unbounded log-variance
        that :meth:`encode_params` bounds (:func:`vaekit.kernels.posterior_sample` takes it
        from here in one fused step)."""
        self._check_input(x)
        return self.head(self.encoder(x))

    def encode_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mu, logvar)``, each ``[B, d]``."""
        mu, raw = self.encoder_head(x).chunk(2, dim=-1)
        lim = self.config.logvar_limit
        return mu, lim * torch.tanh(raw / lim)

    def encode(self, x: Tensor) -> Independent:
        """q(z|x) as ``Independent(Normal(mu, sigma), 1)``: batch shape ``[B]``, event ``[d]``."""
        self._check_input(x)
        if validating(None):  # a value check (encode is for evaluation; the training step calls encode_params)
            check_finite("x", x)
        mu, logvar = self.encode_params(x)
        return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)

    @property
    def autoregressive(self) -> bool:
        """Whether p(x|z) is autoregressive: then :meth:`decode` needs ``x`` as well."""
        return self.pixelcnn is not None

    @property
    def decode_numel(self) -> int:
        """Elements one example's decode holds at its peak (evaluation sizes its chunks by it)."""
        n = math.prod(self.config.input_shape)
        if self.pixelcnn is None:
            return n * (2 if self.config.likelihood == "discretized_logistic" else 1)
        cfg = self.config
        if cfg.pixelcnn_fusion == "late":  # per sample: the 3 x 3 windows and their weighted copy
            return n * (1 + 2 * 9)
        return n * (1 + 3 * cfg.pixelcnn_width // cfg.input_shape[0])  # h, a layer's output, its input

    def decode(self, z: Tensor, x: Tensor | None = None):
        """Likelihood parameters for ``z`` (``[N, d]``): a ``[N, *input_shape]`` tensor of
        logits (Bernoulli kinds) or means, ``(mean, logvar)`` for a learned variance, or
        ``(mean, log_scale)`` for the discretized logistic.

        An autoregressive decoder (``pixelcnn_layers > 0``) needs the pixels ``x``
        (``[N, *input_shape]``) too: the logit of each pixel depends on the pixels before it.
        To draw new images, use :meth:`generate`."""
        self._check_latent(z)
        out = self.decoder(z)
        if self.pixelcnn is not None:
            if x is None:
                raise ValueError("decode(z, x): x is required by an autoregressive decoder (pixelcnn_layers > 0), "
                                 "got None; use generate(z) to draw images")
            if not isinstance(x, Tensor):
                raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
            if tuple(x.shape) != tuple(out.shape):
                raise ValueError(f"x has shape {tuple(x.shape)} but z decodes to {tuple(out.shape)}")
            return self.pixelcnn(x.to(out.dtype), out)
        if self.config.likelihood == "discretized_logistic":
            return tuple(out.chunk(2, dim=1))  # (mean, log_scale)
        if self.decoder_logvar is not None:
            return out, self.decoder_logvar
        return out

    def decode_samples(self, z: Tensor, x: Tensor):
        """:meth:`decode` of ``k`` latents per example: ``z`` ``[k, B, d]``, ``x``
        ``[B, *input_shape]`` -> the likelihood parameters of ``z.reshape(k * B, d)``, as
        :meth:`decode` would give them with ``x`` repeated ``k`` times. An autoregressive head
        with late fusion reads the pixels once per example here
        (:meth:`vaekit.pixelcnn.PixelCNNHead.run_samples`)."""
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor [k, B, d], got {type(z).__name__}")
        if z.dim() != 3:
            raise ValueError(f"z must be [k, B, d], got shape {tuple(z.shape)}")
        k, b, d = z.shape
        if self.pixelcnn is None:
            return self.decode(z.reshape(k * b, d))
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, *input_shape], got {type(x).__name__}")
        out = self.decoder(z.reshape(k * b, d))
        want = (b,) + tuple(out.shape[1:])
        if tuple(x.shape) != want:
            raise ValueError(f"x has shape {tuple(x.shape)} but z of shape {tuple(z.shape)} decodes to {want} per sample")
        shared = self._shared_pixels
        mixing = shared[1] if shared is not None and shared[0] is x else None
        logits = self.pixelcnn.run_samples(x.to(out.dtype), out.unflatten(0, (k, b)), mixing)
        return logits.flatten(0, 1)

    @contextlib.contextmanager
    def sharing_pixels(self, x: Tensor):
        """Within this block, :meth:`decode_samples` calls with this very ``x`` reuse one
        computation of the late-fusion head's mixing maps (chunked importance sampling
        decodes many chunks of samples of one batch). Gradients do not flow through the
        shared features: it is meant for evaluation under ``torch.no_grad()``."""
        if self.pixelcnn is None or self.pixelcnn.fusion != "late" or torch.is_grad_enabled():
            yield
            return
        self._shared_pixels = (x, self.pixelcnn.mixing(x.to(next(self.parameters()).dtype)))
        try:
            yield
        finally:
            self._shared_pixels = None

    def nll(self, decoder_out, x: Tensor, *, validate_args: bool | None = None) -> Tensor:
        """Per-example reconstruction term ``-log p(x|z)`` under the configured likelihood,
        ``[B]``, in nats. ``mse`` is scored as what it is, the Gaussian of variance 1/2:
        the squared error plus ``(D/2) log(pi)`` (the same gradients; docs/objective.md),
        so that its ELBO and likelihood estimates are log-likelihoods too."""
        cfg = self.config
        if cfg.likelihood == "discretized_logistic":
            if not isinstance(decoder_out, (tuple, list)) or len(decoder_out) != 2:
                got = (f"a {type(decoder_out).__name__} of {len(decoder_out)}" if isinstance(decoder_out, (tuple, list))
                       else type(decoder_out).__name__)
                raise TypeError(f"decoder_out must be a (mean, log_scale) pair for likelihood 'discretized_logistic', "
                                f"got {got}")
            mean, log_scale = decoder_out
            return discretized_logistic_nll(mean, log_scale, x)
        if cfg.decoder_variance == "optimal":
            # No training step seen (a model saved before vaekit kept decoder_mse, or never
            # trained): each example under its own variance, as such models were scored.
            if self.training or float(self.decoder_mse_steps) == 0:
                nll = optimal_sigma_nll(decoder_out, x, min_logvar=_MIN_OPTIMAL_LOGVAR, validate_args=validate_args)
                if self.training:
                    self._track_mse(decoder_out, x)
                return nll
            mse = self.decoder_mse.to(torch.promote_types(self.decoder_mse.dtype, torch.float32))
            logvar = mse.clamp(min=math.exp(_MIN_OPTIMAL_LOGVAR)).log()
            return reconstruction_nll("gaussian", decoder_out, x, logvar=logvar, validate_args=validate_args)
        if cfg.likelihood == "mse":
            return reconstruction_nll("gaussian", decoder_out, x, logvar=_MSE_LOGVAR, validate_args=validate_args)
        return reconstruction_nll(cfg.likelihood, decoder_out, x, logvar=cfg.fixed_logvar, validate_args=validate_args)

    def nll_samples(self, decoder_out, x: Tensor, *, validate_args: bool | None = None) -> Tensor:
        """:meth:`nll` of ``k`` decoded latent samples of each example: ``decoder_out`` from
        one decoder call on ``[k * B, d]`` latents (sample-major), ``x`` ``[B, *event]``;
        returns ``[k, B]``. A Bernoulli model scores them without repeating ``x``
        (:func:`vaekit.likelihoods.bernoulli_nll_samples`); otherwise, or when a subclass
        overrides :meth:`nll`, ``nll`` is called on ``x`` repeated ``k`` times."""
        if not isinstance(x, Tensor) or x.dim() < 1:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x must be a torch.Tensor [B, *event], got {got}")
        b = x.shape[0]
        own = getattr(self.nll, "__func__", None) is VAE.nll  # not overridden, nor patched on
        if self.config.likelihood == "bernoulli" and own and isinstance(decoder_out, Tensor):
            return bernoulli_nll_samples(decoder_out, x, validate_args=validate_args)
        first = decoder_out[0] if isinstance(decoder_out, (tuple, list)) else decoder_out
        if b == 0 or first.shape[0] % b:
            raise ValueError(f"decoder_out must hold k samples of each of the {b} examples of x "
                             f"([k * B, *event]), got {tuple(first.shape)}")
        k = first.shape[0] // b
        return self.nll(decoder_out, repeat_for_samples(x, k), validate_args=validate_args).reshape(k, b)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A decoder_variance="optimal" model saved before vaekit kept its evaluation
        variance lacks ``decoder_mse``: it loads, is evaluated as it was then (each example
        under its own best variance, which is no normalised density: warned), and tracks
        the variance afresh once it trains again (a resumed run)."""
        names = [prefix + "decoder_mse", prefix + "decoder_mse_steps"]
        # the whole of an old model, not a partial load (whose missing keys must show)
        others = [prefix + k for k in self.state_dict() if prefix + k not in names]
        weights = [state_dict[k] for k in others if k in state_dict and isinstance(state_dict[k], Tensor)]
        if (self.config.decoder_variance == "optimal" and weights and len(weights) == len(others)
                and not any(n in state_dict for n in names)):
            warnings.warn("this decoder_variance='optimal' model was saved before vaekit kept an evaluation "
                          "variance (decoder_mse): its ELBO and likelihood estimates use each example's own "
                          "variance and are not log-likelihoods; train it further (vaekit train --resume RUN "
                          "--epochs N) to record one", stacklevel=2)
            like = weights[0]  # the saved weights' dtype (assign=True keeps it)
            state_dict[names[0]] = torch.ones((), dtype=like.dtype, device=like.device)
            state_dict[names[1]] = torch.zeros((), dtype=like.dtype, device=like.device)  # 0 steps: unknown
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _track_mse(self, mean: Tensor, x: Tensor) -> None:
        """Fold a training batch's mean squared error into ``decoder_mse`` (no host sync;
        a non-finite batch leaves it as it was)."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), torch.float32)  # bf16: in float32
        sq = (x.to(dtype) - mean.to(dtype)).square()
        if self._data_parallel:  # under vaekit's torchrun: the combined batch's mean, as one process has it
            parts = torch.stack([sq.sum(), torch.full((), sq.numel(), dtype=dtype, device=sq.device)])
            torch.distributed.all_reduce(parts)
            mse = (parts[0] / parts[1]).to(self.decoder_mse.dtype)
        else:
            mse = sq.mean().to(self.decoder_mse.dtype)
        steps = self.decoder_mse_steps
        weight = torch.clamp(1.0 / (steps + 1.0), min=_MSE_MOMENTUM)
        ok = torch.isfinite(mse)
        self.decoder_mse.copy_(torch.where(ok, torch.lerp(self.decoder_mse, mse, weight), self.decoder_mse))
        steps.add_(ok.to(steps.dtype))

    def forward(self, x: Tensor, *, noise=None) -> VAEOutput:
        """Encode, draw ``z = mu + sigma * eps`` and decode. ``noise(shape)``, when given,
        supplies ``eps`` (the training loop uses it for step-keyed, rank-consistent noise);
        drawn here it is at least float32 (``noise_dtype``), as the training loop's is."""
        mu, logvar = self.encode_params(x)
        if noise is None:
            eps = torch.randn(mu.shape, dtype=noise_dtype(mu), device=mu.device)
        else:
            eps = noise(tuple(mu.shape))
            if not isinstance(eps, Tensor) or eps.shape != mu.shape:
                got = f"shape {tuple(eps.shape)}" if isinstance(eps, Tensor) else f"a {type(eps).__name__}"
                raise ValueError(f"noise(shape) must return a tensor of shape {tuple(mu.shape)}, got {got}")
        z = mu + torch.exp(0.5 * logvar) * eps
        if z.dtype != mu.dtype and not torch.is_autocast_enabled(mu.device.type):
            z = z.to(mu.dtype)  # a bfloat16 model's z, from float32 noise (autocast casts on its own)
        # Only an autoregressive decoder reads x (subclasses may override decode(z)).
        return VAEOutput(self.decode(z, x) if self.autoregressive else self.decode(z), mu, logvar, z)

    # -- conveniences -------------------------------------------------------------------

    def decoder_mean(self, decoder_out) -> Tensor:
        """The mean of p(x|z): what a picture of a sample or reconstruction shows."""
        return likelihood_mean(self.config.likelihood, decoder_out)

    @torch.no_grad()
    def generate(self, z: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """An image for each ``z`` (``[N, d]``): the mean of p(x|z), ``[N, *input_shape]``.

        For an autoregressive decoder the mean has no closed form: the image is a draw
        from p(x|z), pixel by pixel, shown as each pixel's probability of being 1 given the
        pixels drawn before it (:func:`vaekit.pixelcnn.sample_pixels`; ``generator`` seeds
        the draw)."""
        check_generator(generator)
        if self.pixelcnn is not None:
            self._check_latent(z)
            return sample_pixels(self.pixelcnn, self.decoder(z), generator=generator)
        return self.decoder_mean(self.decode(z))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws z ~ N(0, I), each made an image by :meth:`generate`: ``[n, *input_shape]``.
        Decoded in chunks whose peak stays under ``MAX_SAMPLE_NUMEL`` elements (a PixelCNN
        head holds many maps an image); ``n`` is refused where the images alone would not.
        With a PixelCNN head the uniform numbers of every pixel's draw are drawn from
        ``generator`` after ``z`` and before the first chunk: the images of one seed are those
        of :meth:`generate` on the same ``z``, whatever the chunk size."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        size = math.prod(self.config.input_shape)
        if n > MAX_SAMPLE_NUMEL // size:
            raise ValueError(f"n must be at most {MAX_SAMPLE_NUMEL // size} (images of {size} values, "
                             f"{MAX_SAMPLE_NUMEL} values in all), got {n}; draw them in batches")
        check_generator(generator)
        p = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        chunk = max(1, MAX_SAMPLE_NUMEL // self.decode_numel)
        if n <= chunk:
            return self.generate(z, generator=generator)
        if self.pixelcnn is None:
            return torch.cat([self.generate(part) for part in z.split(chunk)])
        u = torch.rand((n, *self.config.input_shape), generator=generator, device=p.device, dtype=p.dtype)
        return torch.cat([sample_pixels(self.pixelcnn, self.decoder(part), uniforms=v)
                          for part, v in zip(z.split(chunk), u.split(chunk))])

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The image :meth:`generate` makes of the posterior mean ``E[z|x]``, ``[B, *input_shape]``."""
        mu, _ = self.encode_params(x)
        return self.generate(mu, generator=generator)

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.config.input_shape):
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the model expects [B, {', '.join(map(str, self.config.input_shape))}]"
            )
        self._check_dtype("x", x)

    def _check_latent(self, z) -> None:
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape [N, {self.config.latent_dim}] (latent_dim {self.config.latent_dim}), "
                             f"got {tuple(z.shape)}")
        self._check_dtype("z", z)

    def _check_dtype(self, name: str, t: Tensor) -> None:
        """Floating, and of the weights' dtype (autocast runs the layers in its own)."""
        dtype = next(self.parameters()).dtype
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor of the model's dtype {dtype}, got {t.dtype}")
        if t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} has dtype {t.dtype} but the model's weights are {dtype}: "
                            f"convert one of them (x.to({dtype}) or model.to({t.dtype}))")

    # -- persistence --------------------------------------------------------------------

    def save_pretrained(self, directory) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``."""
        from .io import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, device=None) -> "VAE":
        """Load a model written by :meth:`save_pretrained` (safetensors + JSON only), in
        evaluation mode (:func:`vaekit.io.load_model`)."""
        from .io import load_model

        return load_model(directory, device=device)
