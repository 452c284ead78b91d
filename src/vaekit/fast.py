"""The fast training step: one whole step over static buffers, replayed as a CUDA graph.

:class:`StaticStep` runs forward, loss, backward, gradient clipping and Adam on
tensors that never move (the batch, the noise, beta and the learning rate are copied
into them), so that on CUDA the whole step is captured once in a CUDA graph and each
later step is one ``replay``: no Python per kernel, no host synchronisation inside the
epoch. It computes what the eager loop computes:

* the same objective (``reconstruction + beta * KL``, batch mean) through
  :func:`vaekit.kernels.fused_vae_loss_grads`, whose reference is :class:`vaekit.losses.VAELoss`
  (the Triton kernels on CUDA, which write the loss's gradients in the forward pass, so
  the backward pass starts from them; the eager functions elsewhere);
* the same noise (drawn by the caller: in :func:`vaekit.train.fit`, the step's part of a
  block of noise keyed by the run seed and the step);
* the same non-finite rule without a sync: when the loss or the gradient norm is not
  finite the step is not taken and is counted as skipped on the device. With a fused
  Adam (``fused=True``, what :func:`vaekit.train.fit` builds) the optimiser itself skips
  it: its ``found_inf`` flag (the hook PyTorch's GradScaler uses) is set on the device,
  and the fused kernel leaves weights, moments and step count as they were. With any
  other optimiser every parameter and optimiser state is put back to its value before the
  step (a ``torch.where`` against a copy kept on the device: three small kernels per
  tensor, which in a captured graph cost more than the model itself).

Off CUDA the same code runs uncaptured: that is how the tests compare it with the eager
loop on a CPU. There a host synchronisation costs nothing, so a non-finite step is simply
not taken (no copies to undo it). With ``compile=True`` the forward pass and the loss
are compiled by ``torch.compile`` (``TrainConfig(fast="compile")``): on a CPU inductor
fuses the element-wise work into C++ loops; on CUDA it writes fused Triton kernels (the
loss among them: the hand-written kernel is not used there) and the compiled step is
then captured like the eager one, with fewer kernels in the graph. Only the plain
ELBO/beta-VAE objective takes this path; the training loop runs the eager step for
anything else (IWAE, beta-TCVAE, free bits, capacity). A batch of another size than the
step's (an epoch's short last batch) gets, when capturing, buffers and a graph of its
own (its forward uncompiled); uncaptured it takes the eager step.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .adam_tail import AdamTail
from .kernels import (fused_available, fused_linear, fused_posterior_sample, fused_vae_loss_grads, posterior_sample,
                      weight_grads_aside)
from .losses import LossResult, gaussian_kl

__all__ = ["StaticStep", "FastPathError", "static_step_supported", "skips_on_device", "grad_norm", "set_lr"]


class FastPathError(RuntimeError):
    """The fast step could not be built here (torch.compile or CUDA-graph capture failed);
    the message names the setting that runs the step without it."""


def grad_norm(params, clip: float = 0.0) -> Tensor:
    """The global gradient norm of ``params``, clipping to ``clip`` when it is > 0 and
    finite. Without clipping only the norm is computed (``clip_grad_norm_`` would still
    multiply every gradient by 1)."""
    params = list(params)
    if (clip and math.isfinite(clip)) or not hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.clip_grad_norm_(params, clip or math.inf)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def set_lr(optimizer, value: float, on_device: Tensor | None = None) -> None:
    """Set every parameter group's learning rate to ``value``. A capturable optimiser keeps
    its tensor (a captured graph reads it): it is filled with ``value``, or copied from
    ``on_device`` when given (a copy on the device, which a graph can capture)."""
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], Tensor):
            g["lr"] = float(value)
        elif on_device is not None:
            g["lr"].copy_(on_device)
        else:
            g["lr"].fill_(value)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on the device: a fused Adam or AdamW, whose
    kernel reads a ``found_inf`` flag."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
            and all(g.get("fused") for g in optimizer.param_groups))


def static_step_supported(model, objective) -> bool:
    """Whether :class:`StaticStep` computes this objective for this model."""
    return (
        objective.name == "elbo"
        and objective.free_bits == 0
        and objective.capacity_max == 0
        and model.config.likelihood in ("bernoulli", "gaussian", "continuous_bernoulli", "mse")
        and model.config.decoder_variance != "optimal"
    )


def _aligned_slots(k: int, like: Tensor) -> Tensor:
    """A zeroed ``[k, *like.shape]`` buffer whose ``k`` slices each start on a 16-byte
    boundary (the rows of a padded matrix)."""
    n = like.numel()
    per_16 = max(1, 16 // like.element_size())
    return like.new_zeros(k, -(-n // per_16) * per_16)[:, :n].unflatten(1, like.shape)


# StaticStep's default for fused_sample: off until the kernels have run on a GPU (built
# and tested under Triton's interpreter, compiled for sm_90; benchmarks/gpu.sh runs their
# tests natively and times the steps with them). Read when a StaticStep is built.
FUSED_SAMPLE = False
# StaticStep's default for fused_linear, off for the same reason.
FUSED_LINEAR = False
# With fused_linear on CUDA: the weights' gradient products on a stream of their own,
# beside the chain of input gradients that the backward pass waits for
# (vaekit.kernels.weight_grads_aside). Read when a StaticStep is built.
WEIGHT_GRADS_ASIDE = True

# Warm-up steps (on a side stream) of a batch size other than the step's before it is
# captured: the optimiser's state exists by then; what the new shape needs first (Triton's
# kernels for it, cuBLAS's choices) comes in one step.
OTHER_WARMUP = 1


def _layers(module) -> list:
    """``module``'s layers in order, nested ``nn.Sequential`` opened."""
    if isinstance(module, torch.nn.Sequential):
        return [m for child in module for m in _layers(child)]
    return [module]


def _linear_plan(model) -> tuple[list, list] | None:
    """The encoder (with its head) and the decoder of ``model`` as flat lists of layers, for
    :func:`_through`; None where the step's forward is not that: a model other than
    :class:`vaekit.models.VAE`'s own MLP (its forward pass overridden, convolutions, an
    autoregressive head, a decoder returning two tensors)."""
    from .models import ACTIVATIONS, VAE

    cfg = model.config
    overridden = any(getattr(type(model), name) is not getattr(VAE, name)
                     for name in ("encoder_head", "encode_params", "decode"))
    if (overridden or cfg.arch != "mlp" or model.pixelcnn is not None or model.decoder_logvar is not None
            or cfg.likelihood == "discretized_logistic"):
        return None
    encoder, decoder = _layers(model.encoder) + [model.head], _layers(model.decoder)
    kinds = (torch.nn.Linear, torch.nn.Flatten, torch.nn.Unflatten, *ACTIVATIONS.values())
    if not all(type(m) in kinds for m in encoder + decoder):
        return None
    return encoder, decoder


def _through(layers: list, x: Tensor) -> Tensor:
    """``x`` through ``layers`` (:func:`_linear_plan`): each linear layer by
    :func:`vaekit.kernels.fused_linear`, with the ReLU that follows it."""
    i = 0
    while i < len(layers):
        m = layers[i]
        if type(m) is torch.nn.Linear:
            relu = i + 1 < len(layers) and type(layers[i + 1]) is torch.nn.ReLU
            x = fused_linear(x, m.weight, m.bias, relu)
            i += 2 if relu else 1
        else:
            x = m(x)
            i += 1
    return x


class _Other:
    """The buffers and graph of one other batch size of a :class:`StaticStep`."""

    def __init__(self, x: Tensor, eps: Tensor, warmup: int) -> None:
        self.x, self.eps, self.warmup_left = x, eps, warmup
        self.graph = None


class StaticStep:
    """One optimiser step of ``model`` on a batch of a fixed size, over static buffers.

    Args:
        model: a :class:`vaekit.models.VAE` (on its training device).
        optimizer: its Adam; on CUDA built with ``capturable=True`` and a tensor ``lr``,
            best also ``fused=True`` (a non-finite step is then skipped by the kernel).
        batch_size: the (constant) batch size of the steps it runs.
        grad_clip: global gradient-norm clip (0: off).
        amp: autocast the forward in bfloat16.
        capture: capture a CUDA graph (default: when the model is on CUDA).
        warmup: eager steps before the capture (CUDA's libraries make their workspaces
            and a compiled forward is compiled in them); 0 without capture.
        compile: compile the forward pass and the loss with ``torch.compile`` (needs a C++
            compiler on a CPU, Triton on a GPU); compiled in the first call (on CUDA in
            the first warm-up step, before capture).
        adam_kernel: run everything after the backward pass (gradient norm, clipping, the
            non-finite rule, Adam, the counters) as :class:`vaekit.adam_tail.AdamTail`'s
            three Triton kernels instead of about 20 PyTorch kernels; needs CUDA with
            Triton (or Triton's interpreter on a CPU) and an Adam of one parameter group.
            The tests compare it with the default, PyTorch's Adam. With ``amp``, when
            every parameter is a weight or bias of a linear or convolution layer (what
            autocast casts), the forward pass reads bfloat16 copies of them that the
            tail writes with each update (no cast of each weight a step, forward and
            backward), which computes what autocast's casts compute.
        fused_sample: the posterior's sample (the log-variance's bound and the
            reparameterisation, forward and backward) as
            :func:`vaekit.kernels.fused_posterior_sample`'s two Triton kernels, where
            Triton runs and the step is not compiled. Default: :data:`FUSED_SAMPLE`.
        fused_linear: an MLP VAE's linear layers as :func:`vaekit.kernels.fused_linear`
            (bias and ReLU in the product's epilogue; backward, the bias gradient and the
            ReLU's mask in one Triton kernel: two kernels fewer per layer with a ReLU, one
            without), where the step is not compiled (under ``amp`` only with the weights'
            bfloat16 copies) and the model is :class:`vaekit.models.VAE`'s own MLP.
            Default: :data:`FUSED_LINEAR`. On CUDA the weights' gradient products then
            run on a stream of their own, beside the rest of the backward pass
            (:data:`WEIGHT_GRADS_ASIDE`).
        other_sizes: whether :meth:`run` also takes batches of other sizes (an epoch's
            short last batch), each size captured in a graph of its own after
            ``OTHER_WARMUP`` warm-up steps, its forward pass and loss uncompiled (a
            compilation for one batch an epoch would cost more than it saves). Default:
            when capturing (on a CPU an uncaptured step gains nothing over the eager one).

    Call ``run(x, eps, lr, beta)`` per step; ``sums`` holds ``[loss*b, rec*b, kl*b, b]``
    over the accepted steps, ``skipped`` and ``bad_run`` count non-finite steps (all on
    the device, read them at epoch ends).
    """

    def __init__(self, model, optimizer, *, batch_size: int, grad_clip: float = 0.0, amp: bool = False,
                 capture: bool | None = None, warmup: int = 3, compile: bool = False,
                 adam_kernel: bool = False, other_sizes: bool | None = None,
                 fused_sample: bool | None = None, fused_linear: bool | None = None) -> None:
        p = next(model.parameters())
        self.device = p.device
        self.model, self.opt = model, optimizer
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.grad_clip = grad_clip or math.inf
        self.amp = amp
        cfg = model.config
        self.batch_size = batch_size
        self.x = torch.zeros(batch_size, *cfg.input_shape, device=self.device)
        self.eps = torch.zeros(batch_size, cfg.latent_dim, device=self.device)
        self.beta = torch.zeros((), device=self.device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._one = torch.ones((), device=self.device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.capture = (self.device.type == "cuda") if capture is None else capture
        self._graph = None
        # The Triton tail, or a fused Adam, skips a non-finite step itself (the latter when
        # this flag is 1); otherwise a captured step undoes it from backups, and an
        # uncaptured one checks on the host.
        # bf16 autocast with the Triton tail: the forward pass reads bfloat16 copies of the
        # weights that the tail writes with each update, instead of casting every weight
        # in every step (two kernels each, forward and backward, in a captured graph).
        self._places = self._parameter_places(model) if adam_kernel and amp else []
        self._shadows = ([q.detach().to(torch.bfloat16).requires_grad_() for q in self.params]
                         if self._places and self._autocast_casts_them() else None)
        self._tail = (AdamTail(optimizer, self.params, grad_clip=grad_clip, shadows=self._shadows)
                      if adam_kernel else None)
        self._found_inf = (torch.zeros((), device=self.device)
                           if self._tail is None and skips_on_device(optimizer) else None)
        self._backups: list[tuple[Tensor, Tensor]] | None = None
        self._warmup_left = warmup if self.capture else 0
        # Compiled, inductor fuses the eager loss itself (and would have to trace around the
        # hand-written kernel's autograd function).
        self._fused = (not compile and fused_available(self.device) and cfg.likelihood in ("bernoulli", "gaussian")
                       and cfg.decoder_variance == "fixed")
        self._compiled = compile
        # The posterior's sample too, where the model's encoder is VAE's own: one kernel
        # forward and one backward instead of about 20 (compiled, inductor fuses them).
        from .models import VAE

        self._fused_sample = (bool(FUSED_SAMPLE if fused_sample is None else fused_sample) and not compile
                              and fused_available(self.device) and type(model).encode_params is VAE.encode_params
                              and type(model).encoder_head is VAE.encoder_head)
        want = FUSED_LINEAR if fused_linear is None else fused_linear
        # Under bf16 autocast only with the weights' bfloat16 copies (else each layer would
        # cast its weight, as autocast does, for nothing gained).
        self._plan = (_linear_plan(model) if want and not compile and (not amp or self._shadows is not None)
                      else None)
        self._aside = (torch.cuda.Stream(self.device) if self._plan is not None and WEIGHT_GRADS_ASIDE
                       and self.device.type == "cuda" else None)
        self._forward = torch.compile(self._forward_loss, dynamic=False) if compile else self._forward_loss
        self._untried = compile  # the first call compiles: its failure gets a clear message
        self._beta_now = self._lr_now = None  # what the tensors hold: unchanged values are not refilled
        self._blocks: dict[int, tuple] = {}  # K -> (buffers, graph or None) of run_block
        self._warm: set[int] = set()  # the K whose block ran once uncaptured on CUDA
        self.other_sizes = self.capture if other_sizes is None else bool(other_sizes)
        self._others: dict[int, _Other] = {}  # batch size -> its buffers and graph

    # -- the step, as captured ----------------------------------------------------------

    def _parameter_places(self, model) -> list[list[tuple]]:
        """For each of ``self.params``, the (module, attribute name) pairs that hold it
        (more than one for a shared weight)."""
        index = {id(q): i for i, q in enumerate(self.params)}
        places: list[list[tuple]] = [[] for _ in self.params]
        for name, q in model.named_parameters(remove_duplicate=False):
            if id(q) in index:
                owner, _, leaf = name.rpartition(".")
                places[index[id(q)]].append((model.get_submodule(owner), leaf))
        return places

    def _autocast_casts_them(self) -> bool:
        """Whether every parameter is what autocast casts to bfloat16 in each step (a weight
        or bias of a linear or convolution layer) and nothing else: held in one place (a
        tied weight's gradients add up, which in a bfloat16 copy would round), not read
        in float32 elsewhere (a learned decoder log-variance)."""
        conv = torch.nn.modules.conv._ConvNd
        return all(len(where) == 1 and leaf in ("weight", "bias") and isinstance(module, (torch.nn.Linear, conv))
                   for where in self._places for module, leaf in where)

    @contextlib.contextmanager
    def _bf16_weights(self):
        """The model's parameters replaced by their bfloat16 copies while the forward pass
        runs (when the step keeps copies: autocast then casts no weight)."""
        if self._shadows is None:
            yield
            return
        for where, c in zip(self._places, self._shadows):
            for module, leaf in where:
                module._parameters[leaf] = c
        try:
            yield
        finally:
            for where, q in zip(self._places, self.params):
                for module, leaf in where:
                    module._parameters[leaf] = q

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for c in self._shadows or ():
            c.grad = None

    def _state_tensors(self) -> list[Tensor]:
        out = [q.data for q in self.params]
        for q in self.params:
            for v in self.opt.state.get(q, {}).values():
                if isinstance(v, Tensor) and v.device == self.device:
                    out.append(v)
        return out

    def _forward_loss(self, x: Tensor, eps: Tensor, beta: Tensor) -> tuple[LossResult, tuple | None]:
        """The losses, and where the fused loss serves, what the backward pass starts from:
        ``((decoder output, mu, logvar), their gradients)``, which the loss's kernels wrote
        in the forward pass (no seed and no backward kernel of the loss); otherwise None
        (``loss.backward()``)."""
        model, cfg = self.model, self.model.config
        # No cast cache: it would outlive a captured graph's memory (each weight is cast
        # once a step anyway).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            if self._plan is not None:  # the same layers, each linear one through fused_linear
                encoder, decoder = self._plan
                model._check_input(x)
                head = _through(encoder, x)
                mu, logvar, z = (fused_posterior_sample if self._fused_sample else posterior_sample)(
                    head, eps, cfg.logvar_limit)
                model._check_latent(z)
                out = _through(decoder, z)
            else:
                if self._fused_sample:
                    mu, logvar, z = fused_posterior_sample(model.encoder_head(x), eps, cfg.logvar_limit)
                else:
                    mu, logvar = model.encode_params(x)
                    z = mu + torch.exp(0.5 * logvar) * eps
                out = model.decode(z, x) if model.autoregressive else model.decode(z)
        if self._fused:
            res, grads = fused_vae_loss_grads(x, out, mu, logvar, beta=beta, reconstruction=cfg.likelihood,
                                              reduction="mean", gaussian_logvar=cfg.fixed_logvar, validate_args=False)
            return res, ((out, mu, logvar), grads)
        rec = model.nll(out, x, validate_args=False).mean()
        kl = gaussian_kl(mu, logvar, validate_args=False).mean()
        return LossResult(rec + beta * kl, rec, kl), None

    def _body(self, x: Tensor | None = None, eps: Tensor | None = None, beta: Tensor | None = None,
              forward=None) -> None:
        x = self.x if x is None else x
        # the fused linear layers made in the forward pass send their weight gradients to
        # the aside stream in the backward pass; both streams have joined on leaving
        with weight_grads_aside(self._aside):
            try:
                with self._bf16_weights():
                    res, roots = (forward or self._forward)(x, self.eps if eps is None else eps,
                                                            self.beta if beta is None else beta)
            except Exception as e:  # noqa: BLE001  (inductor raises many kinds; the cause is chained)
                if not (self._untried and forward is None):  # the compiled forward's first call
                    raise
                raise FastPathError(f"TrainConfig.fast='compile': torch.compile could not compile the step "
                                    f"({type(e).__name__}: {_first_line(e)}); train with fast='auto' or 'off'") from e
            if forward is None:
                self._untried = False
            if roots is None:
                res.loss.backward(self._one)  # a seed that exists: no kernel to make one
            else:
                torch.autograd.backward(*roots)
        if self._tail is not None:
            self._tail(res.loss.detach(), res.reconstruction.detach(), res.kl.detach(), self.sums, self.skipped,
                       self.bad_run, x.shape[0])
            return
        gnorm = grad_norm(self.params, self.grad_clip)
        ok = torch.isfinite(res.loss) & torch.isfinite(gnorm)
        # [loss, rec, kl, 1], added to the float64 sums times b by one add_ (b * a float32
        # is exact in float64): each kernel is a node of the captured graph.
        parts = torch.stack([res.loss.detach(), res.reconstruction.detach(), res.kl.detach(), self._one])
        b = float(x.shape[0])
        bad = ~ok
        self.skipped += bad
        self.bad_run.mul_(bad).add_(bad)
        if self._found_inf is not None:
            self._found_inf.copy_(bad)
            self.opt.found_inf = self._found_inf  # read by this step() only: eager steps
            try:                                  # of the same optimiser never see it
                self.opt.step()
            finally:
                del self.opt.found_inf
            self.sums.add_(torch.where(ok, parts, 0.0), alpha=b)
            return
        if self._backups is None:  # uncaptured: a sync is cheap, a bad step is just not taken
            if bool(ok):
                self.opt.step()
                self.sums.add_(parts, alpha=b)
            return
        self.opt.step()
        for t, backup in self._backups:
            t.copy_(torch.where(ok, t, backup))
            backup.copy_(t)
        self.sums.add_(torch.where(ok, parts, 0.0), alpha=b)

    def _refresh_backups(self) -> None:
        if self._found_inf is None and self._tail is None:  # these skip a bad step themselves: nothing to undo
            self._backups = [(t, t.detach().clone()) for t in self._state_tensors()]

    # -- driving it ---------------------------------------------------------------------

    def resync(self) -> None:
        """Call after an eager step changed the weights, the optimiser state or its
        learning rate in place: the copies that undo a non-finite step follow (the captured
        graph reads the same tensors, so it stays valid), so do the weights' bfloat16
        copies, and the next step writes the learning rate again."""
        self._lr_now = None
        if self._shadows is not None:  # the weights moved without their copies
            with torch.no_grad():
                for c, q in zip(self._shadows, self.params):
                    c.copy_(q)
        if self._backups is not None:
            for t, backup in self._backups:
                backup.copy_(t)

    def serves(self, batch_size: int) -> bool:
        """Whether :meth:`run` takes a batch of ``batch_size`` examples: the size the step
        was built for, and with ``other_sizes`` any other that has not failed to capture."""
        return batch_size == self.batch_size or (self.other_sizes and batch_size > 0
                                                 and self._others.get(batch_size, True) is not None)

    def _schedule(self, lr: float, beta: float) -> None:
        # Each fill is a kernel launch on CUDA: schedules that hold still cost none.
        if beta != self._beta_now:
            self.beta.fill_(beta)
            self._beta_now = beta
        if lr != self._lr_now:
            set_lr(self.opt, lr)
            self._lr_now = lr

    def run(self, x: Tensor, eps: Tensor, lr: float, beta: float) -> None:
        """One step on batch ``x`` with noise ``eps``, learning rate ``lr`` and KL weight ``beta``."""
        if x.shape[0] != self.batch_size:
            self._run_other(x, eps, lr, beta)
            return
        self.x.copy_(x)
        self.eps.copy_(eps)
        self._schedule(lr, beta)
        if not self.capture:
            self._zero_grad()
            self._body()
            return
        if self._graph is not None:
            self._graph.replay()
            return
        if self._backups is None or (self.opt.state and len(self._backups) != len(self._state_tensors())):
            self._refresh_backups()
        if self._warmup_left > 0:
            # Warm-up steps on a side stream create the optimiser state and the autograd
            # buffers before capture, as CUDA graphs require.
            self._warmup_left -= 1
            self._on_side_stream(self._body)
            self._refresh_backups()
            return
        self._refresh_backups()
        way_out = ("fast='auto' (vaekit train --fast auto) to capture it uncompiled, or fast='off'"
                   if self._compiled else "fast='off' (vaekit train --fast off) to run it uncaptured")
        self._graph = self._capture(self._body, "the training step could not be captured in a CUDA graph",
                                    f"train with {way_out}")

    def _on_side_stream(self, body) -> None:
        """``body()`` after zeroing the gradients, on a side stream: a warm-up before a
        capture (the optimiser's state, the autograd buffers and anything else that runs
        for the first time, such as a kernel's compilation, must not happen inside it)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._zero_grad()
            body()
        torch.cuda.current_stream().wait_stream(s)

    def _capture(self, body, failure: str, way_out: str):
        """``body()`` after zeroing the gradients, captured in a new CUDA graph, then run
        once (capture records without running); the Triton tail's tables are bound to the
        gradients the capture allocated. A capture that fails raises
        :class:`FastPathError` ``"{failure} (cause); {way_out}"``."""
        self._zero_grad()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                body()
        except Exception as e:  # noqa: BLE001  (capture fails in many ways; the cause is chained)
            torch.cuda.set_stream(stream)  # torch.cuda.graph leaves its stream only on a clean end
            if self._tail is not None:
                self._tail.discard_pending()
            raise FastPathError(f"{failure} ({type(e).__name__}: {_first_line(e)}); {way_out}") from e
        if self._tail is not None:
            self._tail.bind()
        graph.replay()
        return graph

    def _run_other(self, x: Tensor, eps: Tensor, lr: float, beta: float) -> None:
        """A step on a batch of another size (:meth:`serves`): its own buffers and graph,
        the forward pass uncompiled. Captured once the main step is and after
        ``OTHER_WARMUP`` warm-up steps on a side stream; a capture that fails leaves that
        size to the caller's eager step from then on (:class:`FastPathError`)."""
        b = x.shape[0]
        if not self.serves(b):
            raise ValueError(f"this StaticStep takes batches of {self.batch_size} examples"
                             f"{' (and other sizes: other_sizes=True)' if not self.other_sizes else ''}, got {b}")
        slot = self._others.get(b)
        if slot is None:
            slot = self._others[b] = _Other(torch.zeros(b, *self.x.shape[1:], device=self.device),
                                            torch.zeros(b, *self.eps.shape[1:], device=self.device), OTHER_WARMUP)
        slot.x.copy_(x)
        slot.eps.copy_(eps)
        self._schedule(lr, beta)

        def body():
            self._body(slot.x, slot.eps, forward=self._forward_loss)

        if not self.capture:
            self._zero_grad()
            body()
            return
        if slot.graph is not None:
            slot.graph.replay()
            return
        if slot.warmup_left > 0 or self._graph is None:  # the main step captures first (it makes the backups)
            slot.warmup_left -= 1
            self._on_side_stream(body)
            return
        try:
            slot.graph = self._capture(body, f"the training step on a batch of {b} could not be captured in a "
                                             f"CUDA graph", f"batches of {b} take the eager step")
        except FastPathError:
            self._others[b] = None  # not served again
            raise

    def run_block(self, xs: Tensor, eps: Tensor, lrs, betas) -> None:
        """``K = len(xs)`` steps: batch ``xs[i]``, noise ``eps[i]``, learning rate ``lrs[i]``
        and KL weight ``betas[i]`` for step ``i`` (what ``K`` calls of :meth:`run` do). On
        CUDA, once the single step is captured, the first block of each K runs uncaptured
        (a warm-up), the next is captured as one graph, and each later block is three
        copies and one replay: the host's work per step shrinks K-fold. Elsewhere the same
        code runs uncaptured.
        ``TrainConfig(graph_steps=K)`` makes ``fit`` call it."""
        k = xs.shape[0]
        if eps.shape[0] != k or len(lrs) != k or len(betas) != k:
            raise ValueError(f"xs, eps, lrs and betas must have one entry per step, got {k}, {eps.shape[0]}, "
                             f"{len(lrs)} and {len(betas)}")
        if self.capture and self._graph is None:  # warm up and capture the single step first
            for i in range(k):
                self.run(xs[i], eps[i], lrs[i], betas[i])
            return
        if k not in self._blocks:
            # Each step's slice starts on a 16-byte boundary, as the single step's buffers
            # do: Triton compiles a kernel per pointer alignment, and a compilation inside
            # a capture fails. Learning rates and KL weights: one slot of 4 floats a step.
            self._blocks[k] = ((_aligned_slots(k, self.x), _aligned_slots(k, self.eps),
                                self.beta.new_zeros(2, k, 4)), None)
        (bx, beps, sched), graph = self._blocks[k]
        bx.copy_(xs)
        beps.copy_(eps)
        host = torch.tensor([[(float(v), 0.0, 0.0, 0.0) for v in vals] for vals in (lrs, betas)], device="cpu")
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the GPU
            sched.copy_(host.pin_memory(), non_blocking=True)
        else:
            sched.copy_(host)
        blr, bbeta = sched[0, :, 0], sched[1, :, 0]
        self._beta_now = self._lr_now = None  # the single step's buffers were not written
        if graph is not None:
            graph.replay()
            return
        def steps():
            for i in range(k):
                self._block_step(i, lrs[i], bx, beps, blr, bbeta)

        if not self.capture:
            steps()
            return
        if k not in self._warm:  # on CUDA the first block of each K is a warm-up on a side stream
            self._on_side_stream(steps)
            self._warm.add(k)
            return
        # The single step is captured (above), so the copies that undo a non-finite step
        # (unfused optimisers) exist: the block's graph must update the very same ones.
        graph = self._capture(steps, f"{k} training steps could not be captured in one CUDA graph",
                              "run them one by one")
        self._blocks[k] = ((bx, beps, sched), graph)

    def _block_step(self, i: int, lr: float, bx: Tensor, beps: Tensor, blr: Tensor, bbeta: Tensor) -> None:
        """Step ``i`` of a block. A compiled forward is fed the single step's own buffers
        (copied from the block on the device): views into the block would be new inputs to
        its guards, and a recompilation inside a capture would fail."""
        set_lr(self.opt, lr, blr[i])
        self._zero_grad()
        if self._compiled:
            self.x.copy_(bx[i])
            self.eps.copy_(beps[i])
            self.beta.copy_(bbeta[i])
            self._body()
        else:
            self._body(bx[i], beps[i], bbeta[i])
