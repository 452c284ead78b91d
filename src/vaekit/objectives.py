"""Objectives beyond the plain ELBO, and ``objective_loss``, the one call the training loop makes.

Beta schedules (pure functions of the step), the capacity penalty, free bits, the IWAE bound
(its importance weights are computed in :mod:`vaekit.iw`, shared with the evaluation) and
the beta-TCVAE decomposition of the KL. The calibrated Gaussian decoder (sigma-VAE) and the
discretized logistic likelihood for 8-bit data live in :mod:`vaekit.likelihoods` and are
importable from here too. Conventions as in :mod:`vaekit.losses`:
per-example values ``[B]`` in nats, summed over event or latent dims; the batch is reduced
once, in :func:`objective_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import (
    MAX_IW_SAMPLES, check_finite, check_int, check_number, check_same_shape, check_tensor, in_section, refuse_inert, reset_inert,
    upcast, validating,
)
from .iw import (  # re-exported: the IWAE objective's pieces are public here too
    _importance_terms, _log_normal, decode_nll, iwae_bound, iwae_loss, log_importance_weights, log_weights_from_noise,
)
from .iw import _check_noise_callable, _drawn
from .likelihoods import discretized_logistic_nll, optimal_sigma_nll  # re-exported: public here first
from .losses import gaussian_kl

__all__ = [
    "constant_beta", "linear_warmup", "cyclical_beta", "beta_schedule", "capacity_kl_penalty",
    "free_bits_kl", "log_importance_weights", "iwae_bound", "iwae_loss", "TCTerms",
    "tc_decomposition", "beta_tcvae_kl", "optimal_sigma_nll", "discretized_logistic_nll",
    "decode_nll", "log_weights_from_noise", "ObjectiveConfig", "ObjectiveResult", "objective_loss",
    "SCHEDULES", "OBJECTIVES", "TC_ESTIMATORS",
]

SCHEDULES = ("constant", "linear", "cyclical")
OBJECTIVES = ("elbo", "iwae", "beta_tcvae")
TC_ESTIMATORS = ("mws", "stratified")


# ---------------------------------------------------------------------------------------
# Beta schedules: pure functions of the (0-based) step, returning a float.


def constant_beta(step: int, beta: float) -> float:
    """``beta`` at every step."""
    check_int("step", step)
    return check_number("beta", beta)


def linear_warmup(step: int, *, beta: float, warmup_steps: int, start: float = 0.0) -> float:
    """``start + (beta - start) * step / warmup_steps`` for ``step < warmup_steps``, then ``beta``.

    ``warmup_steps = 0`` means no warm-up (``beta`` from step 0); :func:`beta_schedule`
    and ``ObjectiveConfig`` refuse it with the "linear" schedule, where it would be
    ``"constant"`` under another name.
    """
    step, warmup_steps = check_int("step", step), check_int("warmup_steps", warmup_steps)
    return _linear(step, check_number("beta", beta), warmup_steps, check_number("start", start))


def _linear(step: int, beta: float, warmup_steps: int, start: float = 0.0) -> float:
    if step >= warmup_steps:
        return beta
    return start + (beta - start) * (step / warmup_steps)  # (a ratio <= 1: no overflow, whatever the sizes)


def cyclical_beta(step: int, *, beta: float, cycle_steps: int, ratio: float = 0.5) -> float:
    """Cyclical annealing (Fu et al., 2019): with ``tau = (step mod cycle_steps) / cycle_steps``,
    ``beta * min(1, tau / ratio)``: 0 at the start of each cycle, ``beta`` from ``tau = ratio`` on.
    With ``ratio = 1`` the whole cycle rises and ``beta`` itself is never reached (the last
    step of a cycle has ``beta * (cycle_steps - 1) / cycle_steps``), as in the paper's formula.
    """
    step, cycle_steps = check_int("step", step), check_int("cycle_steps", cycle_steps, low=1)
    return _cyclical(step, check_number("beta", beta), cycle_steps,
                     check_number("ratio", ratio, open_low=True, high=1.0))


def _cyclical(step: int, beta: float, cycle_steps: int, ratio: float) -> float:
    tau = (step % cycle_steps) / cycle_steps
    return beta * min(1.0, tau / ratio)


def _schedule_value(name: str, step: int, beta: float, warmup_steps: int, cycle_steps: int, ratio: float) -> float:
    """The schedule's value from arguments already checked (:func:`_check_schedule`)."""
    if name == "constant":
        return beta
    if name == "linear":
        return _linear(step, beta, warmup_steps)
    return _cyclical(step, beta, cycle_steps, ratio)


def _check_schedule(name, beta, warmup_steps, cycle_steps, ratio, *, ratio_name="ratio") -> None:
    if name not in SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    check_number("beta", beta)
    check_number(ratio_name, ratio, open_low=True, high=1.0)
    if check_int("warmup_steps", warmup_steps) == 0 and name == "linear":
        raise ValueError("warmup_steps must be >= 1 with the 'linear' beta schedule, got 0")
    if check_int("cycle_steps", cycle_steps) == 0 and name == "cyclical":
        raise ValueError("cycle_steps must be >= 1 with the 'cyclical' beta schedule, got 0")


def beta_schedule(name: str, step: int, *, beta: float, warmup_steps: int = 0,
                  cycle_steps: int = 0, ratio: float = 0.5) -> float:
    """The KL weight at ``step`` for the schedule ``name`` in ``"constant" | "linear" | "cyclical"``.

    Every argument is checked whether or not the schedule uses it; ``"linear"`` needs
    ``warmup_steps >= 1`` and ``"cyclical"`` needs ``cycle_steps >= 1``.

    Example:
        >>> [beta_schedule("linear", step, beta=2.0, warmup_steps=4) for step in range(0, 7, 2)]
        [0.0, 1.0, 2.0, 2.0]
    """
    _check_schedule(name, beta, warmup_steps, cycle_steps, ratio)
    return _schedule_value(name, check_int("step", step), float(beta), int(warmup_steps), int(cycle_steps),
                           float(ratio))


# ---------------------------------------------------------------------------------------
# Capacity and free bits


def capacity_kl_penalty(kl: Tensor, step: int, *, gamma: float, capacity_max: float,
                        capacity_steps: int) -> Tensor:
    r"""Controlled capacity (Burgess et al., 2018): ``gamma * |kl - C(step)|``.

    ``C`` rises linearly from 0 to ``capacity_max`` over ``capacity_steps``, then stays.
    The absolute value is taken per example (``mean_i |kl_i - C|``, which by Jensen is >=
    the ``|mean_i kl_i - C|`` of implementations that penalise the batch-mean KL). Half
    precision is computed in float32.

    Shape: ``kl`` is ``[B]``; returns ``[B]``.
    """
    check_tensor("kl", kl)
    if kl.dim() != 1:  # a [B, d] KL per dimension would give a [B, d] penalty
        raise ValueError(f"kl must be [B] (one KL per example), got shape {tuple(kl.shape)}")
    gamma = check_number("gamma", gamma, open_low=True)
    check_number("capacity_max", capacity_max)
    check_int("capacity_steps", capacity_steps)
    capacity = linear_warmup(step, beta=capacity_max, warmup_steps=capacity_steps)
    (kl,) = upcast(kl)  # gamma (1000 by default) times a float16 KL overflows past 65 nats
    return gamma * (kl - capacity).abs()


def free_bits_kl(mu: Tensor, logvar: Tensor, free_bits: float, *, validate_args: bool | None = None) -> Tensor:
    r"""KL to N(0, I) with free bits (Kingma et al., 2016), batch-mean-per-dimension form.

    With ``KL_ij`` the KL of example ``i`` in latent dimension ``j`` and ``kl_j = mean_i KL_ij``,
    the penalty is ``sum_j max(free_bits, kl_j)``. It is returned per example as

    .. math::
        r_i = \sum_j \big[\, KL_{ij} \text{ if } kl_j > \lambda \text{ else } \lambda \,\big],

    so that ``r.mean() == sum_j max(free_bits, kl_j)`` exactly. The gradient of ``r.mean()``
    is the plain KL's gradient in dimensions above the threshold and zero in dimensions at
    or below it (the threshold itself counts as below). ``free_bits = 0`` gives
    :func:`vaekit.losses.gaussian_kl`.

    Shape: ``mu``, ``logvar`` are ``[B, d]``; returns ``[B]``.
    """
    threshold = check_number("free_bits", free_bits)
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    if mu.dim() != 2:
        raise ValueError(f"mu must have shape [B, d], got shape {tuple(mu.shape)}")
    check_same_shape("mu", mu, "logvar", logvar)
    kl = gaussian_kl(mu.unsqueeze(-1), logvar.unsqueeze(-1), validate_args=validate_args)  # [B, d]
    active = kl.mean(0) > threshold
    return torch.where(active, kl, kl.new_tensor(threshold)).sum(-1)


# ---------------------------------------------------------------------------------------
# beta-TCVAE (Chen et al., 2018)


class TCTerms(NamedTuple):
    """Per-example ``[B]`` terms; they sum to ``log q(z|x) - log p(z)`` at the given ``z``."""

    mutual_info: Tensor
    total_correlation: Tensor
    dimwise_kl: Tensor


def _minibatch_log_weights(batch: int, dataset_size: int, estimator: str, like: Tensor) -> Tensor:
    if estimator == "mws":
        return like.new_full((batch, batch), -math.log(batch * dataset_size))
    if batch < 2 and dataset_size > 1:
        raise ValueError("the 'stratified' estimator needs a batch of at least 2, got 1")
    # the other B - 1 items stand for the N - 1 items that are not the sample's own
    other = (dataset_size - 1) / (dataset_size * max(batch - 1, 1))
    w = like.new_full((batch, batch), math.log(other) if other > 0 else -math.inf)
    return w.fill_diagonal_(-math.log(dataset_size))


def tc_decomposition(z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int, *,
                     estimator: str = "stratified", validate_args: bool | None = None) -> TCTerms:
    r"""Split ``log q(z|x) - log p(z)`` into index-code MI, total correlation and dimension-wise KL.

    For sample ``z_i ~ q(z|x_i)`` the aggregate posterior is estimated from the batch as
    ``log q(z_i) = logsumexp_j [log w_ij + log q(z_i|x_j)]`` and each marginal likewise per
    dimension, ``log prod_d q(z_id) = sum_d logsumexp_j [log w_ij + log q(z_id|x_jd)]``. Then

    ``MI_i = log q(z_i|x_i) - log q(z_i)``, ``TC_i = log q(z_i) - log prod_d q(z_id)``,
    ``DWKL_i = log prod_d q(z_id) - log p(z_i)``; they telescope to ``log q(z_i|x_i) - log p(z_i)``.

    ``estimator``:
        * ``"stratified"`` (the default): ``w_ii = 1/N`` for the sample's own item and
          ``w_ij = (N-1) / (N (B-1))`` for the others, which stand for the rest of the data
          (the idea of Chen et al.'s minibatch stratified sampling, with uniform weights
          rather than their weight matrix): the sum is an unbiased estimate of ``q(z_i)``, so
          a factorised ``q(z)`` gives a TC near 0; its logs are biased at small batches
          (two independent checks at B = 64 for a true TC of 0: -1 to -2 nats with
          overlapping posteriors and d = 6, +0.1 to +0.25 with narrow ones; Chen et al.'s
          own matrix was +0.3 to +4 nats off in the second); the bias grows as the batch
          shrinks (about +0.3 at B = 32, d = 3, narrow posteriors). It needs two examples a
          batch where ``dataset_size > 1`` (one has no others to stand for the rest): training
          refuses ``batch_size=1`` and skips a last batch of one (fewer than 2 a rank,
          data-parallel).
        * ``"mws"``: Chen et al.'s minibatch-weighted sampling (their code's default),
          ``w_ij = 1 / (B N)``. It underestimates ``log q(z_i)`` and each ``log q(z_id)`` by an
          offset ``o`` between ``log B`` (the item's own posterior dominates the sum) and
          ``log N`` (many items overlap there), so its TC carries ``sum_d o_d - o_joint``:
          ``(d-1) log B`` when every posterior stands apart (exactly, when the batch is the
          whole data set), ``(d-1) log N`` when all overlap, and up to ``d log N - log B`` in a
          trained VAE's usual case, joint posteriors apart and each dimension's marginals
          overlapping. The offset is no constant: it grows by up to ``log(N/B)`` as the
          posteriors move apart, that is as the index-code MI grows, so ``beta * TC`` also
          penalises the MI, by up to about ``beta * log(N/B)`` when the codes are informative.
          An audit measured it on digits (d = 8, B = 64, N = 1350, beta = 6, two seeds): MI
          1.8-1.9 nats with "mws" against 4.3-4.4 with "stratified" (3.9 under the plain
          ELBO), test reconstruction 2.5-2.8 nats worse; the excess of its TC gradient over
          the stratified one had cosine +0.99 with the MI's gradient.

    Shape: ``z``, ``mu``, ``logvar`` are ``[B, d]``; returns three ``[B]`` tensors. Cost ``O(B^2 d)``.
    """
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t, min_dim=2)
    check_same_shape("z", z, "mu", mu)
    check_same_shape("mu", mu, "logvar", logvar)
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, d], got shape {tuple(z.shape)}")
    dataset_size = check_int("dataset_size", dataset_size, low=1)
    if z.shape[0] == 0:
        raise ValueError(f"z must hold at least 1 example [B, d], got shape {tuple(z.shape)}")
    if dataset_size < z.shape[0]:  # the batch is drawn from the data set
        raise ValueError(f"dataset_size must be >= the batch size B = {z.shape[0]}, got {dataset_size}")
    if estimator not in TC_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(TC_ESTIMATORS)}, got {estimator!r}")
    if validating(validate_args):
        for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
            check_finite(name, t)
    z, mu, logvar = upcast(z, mu, logvar)
    log_q_ij = _log_normal(z.unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0))  # [B_i, B_j, d]
    log_w = _minibatch_log_weights(z.shape[0], dataset_size, estimator, z)
    log_qz = torch.logsumexp(log_w + log_q_ij.sum(-1), 1)
    log_prod_qz = torch.logsumexp(log_w.unsqueeze(-1) + log_q_ij, 1).sum(-1)
    log_qz_x = torch.diagonal(log_q_ij, dim1=0, dim2=1).sum(0)
    log_pz = _log_normal(z).sum(-1)
    return TCTerms(log_qz_x - log_qz, log_qz - log_prod_qz, log_prod_qz - log_pz)


def beta_tcvae_kl(z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int, *, alpha: float = 1.0,
                  beta: float = 6.0, gamma: float = 1.0, estimator: str = "stratified") -> Tensor:
    """``alpha * MI + beta * TC + gamma * DWKL`` from :func:`tc_decomposition`, ``[B]``."""
    alpha, beta, gamma = check_number("alpha", alpha), check_number("beta", beta), check_number("gamma", gamma)
    terms = tc_decomposition(z, mu, logvar, dataset_size, estimator=estimator)
    return alpha * terms.mutual_info + beta * terms.total_correlation + gamma * terms.dimwise_kl


# ---------------------------------------------------------------------------------------
# The single entry point


# Fields that only act for one objective, with their "off" value.
_ONLY_FOR = {"free_bits": ("elbo", 0.0), "capacity_max": ("elbo", 0.0), "iw_samples": ("iwae", 1),
             "tc_alpha": ("beta_tcvae", 1.0), "tc_gamma": ("beta_tcvae", 1.0),
             "tc_estimator": ("beta_tcvae", "stratified")}
# Off values of earlier versions, which every run they saved records ("mws" was the default).
_OLD_OFF = {"tc_estimator": "mws"}
# Fields that only act under another field's setting: their "off" value, that field, whether
# its value lets them act, and what it needs. Set away from "off" where they cannot act,
# they are refused: a warmup_steps with the constant schedule would warm nothing up.
_ONLY_WITH = {
    "warmup_steps": (0, ("beta_schedule",), lambda v: v == "linear", "beta_schedule='linear'"),
    "cycle_steps": (0, ("beta_schedule",), lambda v: v == "cyclical", "beta_schedule='cyclical'"),
    "cycle_ratio": (0.5, ("beta_schedule",), lambda v: v == "cyclical", "beta_schedule='cyclical'"),
    "capacity_steps": (0, ("capacity_max",), lambda v: v > 0, "capacity_max > 0"),
    "capacity_gamma": (1000.0, ("capacity_max",), lambda v: v > 0, "capacity_max > 0"),
}


@dataclass
class ObjectiveConfig:
    """What the training loop optimises; see :func:`objective_loss`.

    Attributes:
        name: "elbo", "iwae" (importance-weighted bound) or "beta_tcvae".
        beta: KL weight (for "beta_tcvae": the total-correlation weight).
        beta_schedule: "constant", "linear" (warm-up from 0) or "cyclical" (Fu et al., 2019).
        warmup_steps: steps of the linear warm-up ("linear" only).
        cycle_steps: length of one cycle of the cyclical schedule ("cyclical" only).
        cycle_ratio: fraction of each cycle spent rising from 0 to beta ("cyclical" only).
        free_bits: nats per latent dimension below which the KL is not penalised ("elbo" only).
        capacity_max: target KL in nats of the capacity penalty, 0 = off ("elbo" only); it
            replaces beta * KL by capacity_gamma * |KL - C|, each example's KL (the penalty
            is then averaged over the batch with the other terms, so its gradient does not
            flip where the batch's mean KL meets C), so it takes no beta or schedule.
        capacity_steps: steps over which the capacity C rises from 0 to capacity_max
            (capacity_max > 0 only).
        capacity_gamma: weight of the capacity penalty (capacity_max > 0 only).
        iw_samples: importance samples per example ("iwae" only; it takes no beta or schedule).
        tc_alpha: weight of the index-code mutual information ("beta_tcvae" only).
        tc_gamma: weight of the dimension-wise KL ("beta_tcvae" only).
        tc_estimator: "stratified" (minibatch stratified sampling; needs batches of at least 2)
            or "mws" (minibatch-weighted sampling, the default of Chen et al.'s code), both
            after Chen et al. (2018) (:func:`tc_decomposition`). The stratified estimate is
            close to 0 for an independent posterior. MWS adds an offset of up to
            d log N - log B nats that grows with the mutual information, so beta times it
            penalises the MI too, by up to about beta log(N/B) nats when the codes are
            informative ("beta_tcvae" only).

    A field set away from its default where it has no effect (``warmup_steps`` without the
    "linear" schedule, ``tc_estimator`` without "beta_tcvae", ...) is refused, naming what
    it needs. A field set later (``config.beta = 2.0``) is checked as the constructor checks
    it, on its own, so that two fields can be changed one after the other: the settings
    with no effect are not looked for again, and what the schedule needs of the other
    fields (a warm-up for "linear", a cycle for "cyclical") is checked at the next
    :meth:`beta_at`. ``fit`` checks the whole config again.
    """

    name: str = "elbo"
    beta: float = 1.0
    beta_schedule: str = "constant"
    warmup_steps: int = 0
    cycle_steps: int = 0
    cycle_ratio: float = 0.5
    free_bits: float = 0.0
    capacity_max: float = 0.0
    capacity_steps: int = 0
    capacity_gamma: float = 1000.0
    iw_samples: int = 1
    tc_alpha: float = 1.0
    tc_gamma: float = 1.0
    tc_estimator: str = "stratified"

    def __post_init__(self) -> None:
        with in_section("ObjectiveConfig"):
            self._check()

    def __setattr__(self, name: str, value) -> None:
        # A field set after the config was made (config.beta = -5.0) is checked on its own, as
        # the constructor checks it; the checks across fields (settings with no effect) are
        # not rerun, so that two fields can be changed one after the other.
        if name in self.__dict__ and name in _FIELD_CHECKS:
            with in_section("ObjectiveConfig"):
                _FIELD_CHECKS[name](name, value)
            if name in _SCHEDULE_FIELDS:  # what the schedule needs of the others: at the next beta_at
                self.__dict__["_schedule_unchecked"] = True
        super().__setattr__(name, value)

    def beta_at(self, step: int) -> float:
        """The KL weight at ``step``: :func:`beta_schedule` of this config's schedule, its
        arguments checked once, when the config was made (the training loop asks at every
        step, where the checks cost more than the schedule)."""
        if "_schedule_unchecked" in self.__dict__:  # a schedule field was set since
            with in_section("ObjectiveConfig"):
                _check_schedule(self.beta_schedule, self.beta, self.warmup_steps, self.cycle_steps,
                                self.cycle_ratio, ratio_name="cycle_ratio")
            del self.__dict__["_schedule_unchecked"]
        return _schedule_value(self.beta_schedule, step, float(self.beta), int(self.warmup_steps),
                               int(self.cycle_steps), float(self.cycle_ratio))

    def _check(self) -> None:
        for field, check in _FIELD_CHECKS.items():  # each field on its own, then across fields
            check(field, getattr(self, field))
        _check_schedule(self.beta_schedule, self.beta, self.warmup_steps, self.cycle_steps,
                        self.cycle_ratio, ratio_name="cycle_ratio")  # (the warm-up or cycle a schedule needs)
        for field, (objective, off) in _ONLY_FOR.items():
            if self.name != objective and getattr(self, field) != off:
                raise ValueError(f"{field}={getattr(self, field)!r} applies only to name={objective!r}, "
                                 f"got name={self.name!r}")
        if self.free_bits > 0 and self.capacity_max > 0:
            raise ValueError("free_bits and capacity_max cannot both be > 0: the capacity penalty "
                             "replaces the KL term that free bits modifies")
        beta_set = self.beta != 1.0 or self.beta_schedule != "constant"
        if _kl_weight_unused(self.name, self.capacity_max) and beta_set:
            who = "name='iwae'" if self.name == "iwae" else "capacity_max > 0"
            raise ValueError(f"beta and beta_schedule are unused with {who}; got beta={self.beta}, "
                             f"beta_schedule={self.beta_schedule!r} (leave 1.0 and 'constant')")
        refuse_inert(self, _ONLY_WITH)


def _one_of(choices: tuple):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return check


# Each field's own check, in the order ObjectiveConfig._check makes them (also for a field
# set after the config was made); _check then checks the fields against each other.
_SCHEDULE_FIELDS = frozenset({"beta_schedule", "beta", "warmup_steps", "cycle_steps", "cycle_ratio"})
_FIELD_CHECKS = {
    "name": _one_of(OBJECTIVES), "beta_schedule": _one_of(SCHEDULES), "beta": check_number,
    "cycle_ratio": lambda name, value: check_number(name, value, open_low=True, high=1.0),
    "warmup_steps": check_int, "cycle_steps": check_int,
    "free_bits": check_number, "capacity_max": check_number, "tc_alpha": check_number, "tc_gamma": check_number,
    "capacity_gamma": lambda name, value: check_number(name, value, open_low=True),
    "capacity_steps": check_int,
    "iw_samples": lambda name, value: check_int(name, value, low=1, high=MAX_IW_SAMPLES),
    "tc_estimator": _one_of(TC_ESTIMATORS),
}


def _kl_weight_unused(name, capacity_max) -> bool:
    """The IWAE bound and the capacity penalty have no KL weight: beta and its schedule do
    nothing there."""
    return name == "iwae" or capacity_max > 0


def without_inert(section: dict, keep=(), given=()) -> dict:
    """A saved ``objective`` section with each field that could have no effect there (the
    ``_ONLY_FOR`` / ``_ONLY_WITH`` cases, which earlier versions accepted: ``warmup_steps``
    with the constant schedule, ...) set to its "off" value, so that runs saved then still
    load: they trained exactly as the section now says. Fields in ``keep`` stay as they
    are (:func:`vaekit.flags.build_config` keeps the user's own, to be refused), but for
    an earlier version's off value (``tc_estimator="mws"``, the default before
    "stratified", which a run's ``config.json`` given to ``--config`` records); fields in
    ``given`` (the user's flags, not a file) stay whatever their value."""
    defaults = {name: f.default for name, f in ObjectiveConfig.__dataclass_fields__.items()}
    out = dict(section)
    for field, (objective, off) in _ONLY_FOR.items():
        mine = field in given or (field in keep and not (field in _OLD_OFF and out.get(field) == _OLD_OFF[field]))
        if field in out and not mine and out.get("name", defaults["name"]) != objective:
            out[field] = off
    try:
        unused = _kl_weight_unused(out.get("name", defaults["name"]), out.get("capacity_max", defaults["capacity_max"]))
    except TypeError:  # a malformed field: ObjectiveConfig names it
        unused = False
    if unused:  # (and with the constant schedule, the warm-up and cycle fields are inert below)
        out.update({k: defaults[k] for k in ("beta", "beta_schedule") if k in out and k not in keep})
    return reset_inert(out, defaults, _ONLY_WITH, keep)  # a gate the loops above set off counts as off


class ObjectiveResult(NamedTuple):
    """Scalars (batch means) for the step; ``beta`` is the KL weight used (``capacity_gamma``
    under the capacity penalty, 1.0 for IWAE)."""

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor
    beta: float


def objective_loss(model, x: Tensor, config: ObjectiveConfig, step: int, *,
                   dataset_size: int | None = None, noise=None) -> ObjectiveResult:
    """The loss the training loop minimises at ``step``, from one forward pass of ``model``.

    * ``"elbo"``: ``mean(nll + beta_t * KL)``; with ``free_bits > 0`` the KL is
      :func:`free_bits_kl`; with ``capacity_max > 0``, :func:`capacity_kl_penalty` replaces
      ``beta_t * KL``.
    * ``"iwae"``: ``mean(-L_k)``, ``k = iw_samples`` (one encode, one decode of ``k * B``).
    * ``"beta_tcvae"``: ``mean(nll + beta_tcvae_kl(z, ...))`` with the model's own sample
      ``z``, ``beta = beta_t``; needs ``dataset_size``.

    ``reconstruction`` is the mean NLL (over the ``k`` samples too for IWAE) and ``kl`` the
    mean analytic KL to N(0, I), whatever the loss uses, for logging.

    ``noise(shape) -> Tensor``, when given, supplies the standard-normal draws of the
    reparameterisation (``[B, d]``, or ``[k, B, d]`` for IWAE); the training loop uses it to
    make the noise a function of the step, identical across data-parallel ranks.
    """
    if not isinstance(config, ObjectiveConfig):
        raise TypeError(f"config must be an ObjectiveConfig, got {type(config).__name__}")
    check_int("step", step)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:  # the loss is a mean over the batch: NaN for none
        raise ValueError(f"x must be a batch [B, *event] with B >= 1, got shape {tuple(x.shape)}")
    _check_noise_callable(noise)
    if config.name == "iwae":
        log_w, nll, (mu, logvar) = _importance_terms(model, x, config.iw_samples, noise)
        kl = gaussian_kl(mu, logvar)
        return ObjectiveResult(-iwae_bound(log_w).mean(), nll.mean(), kl.mean(), 1.0)
    if config.name == "beta_tcvae" and dataset_size is None:
        raise ValueError("dataset_size is required for name='beta_tcvae', got None")
    beta = config.beta_at(step)
    out = model(x) if noise is None else model(x, noise=lambda shape: _drawn(noise, shape))
    nll = model.nll(out.decoder_out, x)
    kl = gaussian_kl(out.mu, out.logvar)
    if config.name == "beta_tcvae":
        penalty = beta_tcvae_kl(out.z, out.mu, out.logvar, dataset_size, alpha=config.tc_alpha,
                                beta=beta, gamma=config.tc_gamma, estimator=config.tc_estimator)
    elif config.capacity_max > 0:
        beta = config.capacity_gamma
        penalty = capacity_kl_penalty(kl, step, gamma=beta, capacity_max=config.capacity_max,
                                      capacity_steps=config.capacity_steps)
    elif config.free_bits > 0:
        penalty = beta * free_bits_kl(out.mu, out.logvar, config.free_bits)
    else:
        penalty = beta * kl
    return ObjectiveResult((nll + penalty).mean(), nll.mean(), kl.mean(), beta)
