"""Ground-truth factors and disentanglement metrics.

A data set with known generative factors, rendered here, and four scores of how well a
representation separates them: MIG, DCI, the FactorVAE score and the beta-VAE score.

The data set is :mod:`vaekit.sprites` (its names are re-exported here).

**Samplers.** The metrics that intervene on factors take a ``sampler`` with
``factor_sizes``, ``sampler(n, generator) -> (obs, factors)`` and
``sampler.sample_with_fixed(n, factor_index, value, generator) -> (obs, factors)``, and a
``representation(obs) -> codes [n, d]``, called on CPU batches of at most ``chunk_size``
under ``torch.no_grad`` (for a VAE in eval mode, the posterior mean:
``lambda x: model.encode_params(x.to(device))[0]``). ``FactorSampler(sizes)`` with no
renderer returns the factors themselves as observations, which lets the metrics be
tested without images. MIG and DCI take code and factor arrays; ``sample_codes`` makes
them from a representation and a sampler.

Costs on the sprites (one CPU thread): rendering is about 0.15 ms an image, so the
FactorVAE score's defaults (5,000 + 1,600 x 64 images) take some 20 s and the beta-VAE
score's (1,200 x 128) some 25 s, plus the encoder; DCI on 10,000 codes of 10 dimensions
about 20 s.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .checks import MAX_GENERATOR_SEED, check_int, check_number
from .sprites import (  # re-exported: the disentanglement API names them
    FactorSampler, SpritesFactors, iter_all, make_sprites, render_sprites, sample_factors, sprite_factor_names,
    sprite_factor_sizes,
)
from .sprites import _MAX_DRAWS

__all__ = [
    "sprite_factor_sizes",
    "sprite_factor_names",
    "render_sprites",
    "sample_factors",
    "make_sprites",
    "iter_all",
    "evaluate_disentanglement",
    "FactorSampler",
    "SpritesFactors",
    "sample_codes",
    "mig",
    "dci",
    "factor_vae_score",
    "beta_vae_score",
]

# ---------------------------------------------------------------- codes


def _check_encoding(representation, sampler, seed, chunk_size, fixed: bool = True) -> None:
    """Refuse a representation, sampler, seed or chunk size the metrics cannot use."""
    if not callable(representation):
        raise TypeError(f"representation must be callable (observations -> codes [n, d]), got {type(representation).__name__}")
    needs = ("factor_sizes", "sample_with_fixed") if fixed else ("factor_sizes",)
    if not callable(sampler) or not all(hasattr(sampler, a) for a in needs):
        raise TypeError(f"sampler must be a FactorSampler (callable, with {' and '.join(needs)}), "
                        f"got {type(sampler).__name__}")
    check_int("seed", seed, high=MAX_GENERATOR_SEED)
    check_int("chunk_size", chunk_size, low=1)


def _encode(representation, obs: Tensor, chunk_size: int) -> np.ndarray:
    with torch.no_grad():
        parts = [torch.as_tensor(representation(o)).detach().cpu().double() for o in obs.split(chunk_size)]
    codes = torch.cat(parts).numpy()
    if codes.ndim != 2 or codes.shape[0] != len(obs):
        raise ValueError(f"representation must map {len(obs)} observations to codes [n, d], got shape {codes.shape}")
    return codes


def _encode_groups(representation, groups: Iterator[Tensor], chunk_size: int) -> Iterator[np.ndarray]:
    """Codes of each observation group, encoding several small groups per call."""
    pending: list[Tensor] = []
    for obs in groups:
        pending.append(obs)
        if sum(len(p) for p in pending) >= chunk_size:
            codes = _encode(representation, torch.cat(pending), chunk_size)
            yield from np.split(codes, np.cumsum([len(p) for p in pending])[:-1])
            pending = []
    if pending:
        codes = _encode(representation, torch.cat(pending), chunk_size)
        yield from np.split(codes, np.cumsum([len(p) for p in pending])[:-1])


# Observations one sampler call makes in sample_codes: about 1 GB of 64 x 64 float32
# sprites, where the 10,000,000 draws allowed at once would be 164 GB.
_SAMPLE_CHUNK = 65_536


def sample_codes(representation, sampler, n: int, *, seed: int = 0, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``[n, d]`` (float64) and factors ``[n, K]`` (int64) of ``n`` random observations.

    Up to 65,536 observations come from one ``sampler`` call; more, from one call per
    65,536 with the same generator (so the memory of the observations stays bounded)."""
    _check_encoding(representation, sampler, seed, chunk_size, fixed=False)
    check_int("n", n, low=1, high=_MAX_DRAWS)
    gen = torch.Generator().manual_seed(seed)
    codes, factors = [], []
    for start in range(0, n, _SAMPLE_CHUNK):
        obs, f = sampler(min(_SAMPLE_CHUNK, n - start), gen)
        codes.append(_encode(representation, obs, chunk_size))
        factors.append(f.numpy())
    if len(codes) == 1:
        return codes[0], factors[0]
    return np.concatenate(codes), np.concatenate(factors)


def _as_array(name: str, a) -> np.ndarray:
    """``a`` as a finite, numeric 2-d array with at least one row and one column."""
    a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a 2-d array [n, d] with n, d >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, but it holds NaN or infinite values")
    return a


# ---------------------------------------------------------------- MIG

# The most bins MIG cuts a code into: 10**9 would allocate gigabytes and hang.
_MAX_BINS = 10_000


def mig(codes, factors, n_bins: int = 20) -> float:
    """Mutual Information Gap (Chen et al. 2018), in [0, 1].

    Each code dimension is cut into ``n_bins`` equal-width bins over its range; with
    ``I[j, k]`` the empirical mutual information between binned code ``j`` and factor
    ``k`` and ``H_k`` the factor's entropy,
    ``MIG = mean_k (I[j1, k] - I[j2, k]) / H_k`` over the two codes ``j1, j2`` most
    informative about ``k``. Constant factors (``H_k = 0``) are left out. The binned codes
    are how disentanglement_lib estimates ``I``; Chen et al. estimate it from ``q(z_j|x)``
    instead, so the two scores of one model can differ.

    Shape: codes ``[n, d]``, factors ``[n, K]`` (discrete labels).
    """
    from sklearn.metrics import mutual_info_score

    codes, factors = _as_array("codes", codes), _as_array("factors", factors)
    if len(codes) != len(factors):
        raise ValueError(f"codes has {len(codes)} rows but factors has {len(factors)}")
    check_int("n_bins", n_bins, low=2, high=_MAX_BINS)
    binned = [np.digitize(c, np.histogram_bin_edges(c, bins=n_bins)[1:-1]) for c in codes.T.astype(np.float64)]
    gaps = []
    for f in factors.T:
        entropy = mutual_info_score(f, f)
        if entropy <= 0:
            continue
        info = np.sort([mutual_info_score(f, b) for b in binned])[::-1]
        second = info[1] if len(info) > 1 else 0.0
        gaps.append((info[0] - second) / entropy)
    if not gaps:
        raise ValueError("factors must vary: every factor column is constant")
    return float(np.mean(gaps))


# ---------------------------------------------------------------- DCI


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy of each row of a probability matrix, in log base ``base`` (0 when base is 1)."""
    if base < 2:
        return np.zeros(len(p))
    logs = np.log(p, where=p > 0, out=np.zeros_like(p))
    return -(p * logs).sum(1) / math.log(base)


def dci(codes_train, factors_train, codes_test, factors_test, *, seed: int = 0, n_estimators: int = 30, max_depth: int | None = 8) -> dict:
    """DCI (Eastwood & Williams 2018) from random-forest importances.

    For each factor ``k`` a random-forest classifier predicts ``k`` from the codes; its
    impurity importances form column ``k`` of ``R [d, K]``. With ``P_jk = R_jk / sum_k R_jk``:

    * disentanglement ``D = sum_j rho_j (1 - H_K(P_j.))``, ``rho_j = sum_k R_jk / sum R``;
    * completeness ``C = sum_k w_k (1 - H_d(R_.k / sum_j R_jk))``, ``w_k = sum_j R_jk / sum R``
      (every factor the forests can predict has importances summing to 1, so ``C`` is
      their mean; a constant factor, with none, is left out rather than counted as 0);
    * informativeness: the classifiers' mean test accuracy.

    ``H_b`` is the entropy in log base ``b``. The paper uses lasso or random-forest
    regressors; classifiers suit discrete factors, and a few shallow trees keep it fast.
    Every split may use any code (``max_features=None``): with the usual ``sqrt(d)``
    subsampling a tree offered only irrelevant codes splits on them anyway, which spreads
    importance and understates the disentanglement of a perfect code.
    Returns ``{"disentanglement", "completeness", "informativeness"}`` as floats.
    """
    from sklearn.ensemble import RandomForestClassifier

    check_int("seed", seed, high=MAX_GENERATOR_SEED)
    check_int("n_estimators", n_estimators, low=1)
    if max_depth is not None:
        check_int("max_depth", max_depth, low=1)
    ctr, ftr = _as_array("codes_train", codes_train), _as_array("factors_train", factors_train)
    cte, fte = _as_array("codes_test", codes_test), _as_array("factors_test", factors_test)
    if len(ctr) != len(ftr) or len(cte) != len(fte):
        raise ValueError(f"codes and factors must have the same rows, got {len(ctr)}/{len(ftr)} and {len(cte)}/{len(fte)}")
    if ctr.shape[1] != cte.shape[1] or ftr.shape[1] != fte.shape[1]:
        raise ValueError(f"train and test must have the same columns, got {ctr.shape}/{cte.shape}, {ftr.shape}/{fte.shape}")
    d, n_factors = ctr.shape[1], ftr.shape[1]
    importance = np.zeros((d, n_factors))
    accuracy = []
    for k in range(n_factors):
        forest = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth, max_features=None, random_state=(seed + k) % 2**32)
        forest.fit(ctr, ftr[:, k])
        importance[:, k] = np.abs(forest.feature_importances_)
        accuracy.append(forest.score(cte, fte[:, k]))
    disent, complete = _disentanglement_completeness(importance)
    return {"disentanglement": disent, "completeness": complete, "informativeness": float(np.mean(accuracy))}


def _disentanglement_completeness(importance: np.ndarray) -> tuple[float, float]:
    """``(D, C)`` of an importance matrix ``[d, K]``, each code's and each factor's term
    weighted by its share of the importance (one with none weighs 0)."""
    d, n_factors = importance.shape
    total = importance.sum()
    if total <= 0:  # no code helps any factor: nothing is disentangled
        return 0.0, 0.0
    row, col = importance.sum(1), importance.sum(0)
    p_rows = np.divide(importance, row[:, None], out=np.zeros_like(importance), where=row[:, None] > 0)
    p_cols = np.divide(importance, col[None, :], out=np.zeros_like(importance), where=col[None, :] > 0)
    disent = float(((1.0 - _entropy_rows(p_rows, n_factors)) * row / total).sum())
    complete = float(((1.0 - _entropy_rows(p_cols.T, d)) * col / total).sum())
    return disent, complete


# ---------------------------------------------------------------- FactorVAE and beta-VAE scores


def factor_vae_score(
    representation,
    sampler,
    *,
    seed: int = 0,
    n_reference: int = 5000,
    n_train: int = 800,
    n_eval: int = 800,
    batch_size: int = 64,
    prune_fraction: float = 0.05,
    chunk_size: int = 1024,
) -> float:
    """FactorVAE score (Kim & Mnih 2018): held-out accuracy of a majority-vote classifier.

    Codes are divided by their standard deviation ``s_j`` over ``n_reference`` random
    observations. Dimensions with ``s_j <= prune_fraction * max_j s_j`` count as collapsed
    and are dropped: a constant code would divide by zero, and a nearly dead one can be
    constant within a vote's batch (a saturated or quantised code), so it would win the
    argmin whatever factor is fixed. The paper prunes by an absolute threshold on codes on
    the prior's unit scale; relative to the largest spread the rule is the same for a
    VAE's posterior means (their active dimensions share that scale) and does not depend
    on a representation's units. It does depend on the dimensions' relative scales: an
    informative dimension more than ``1 / prune_fraction`` times (20 times, by default)
    narrower than the widest is dropped too, and the score falls (a perfectly disentangled
    code with one dimension scaled 25 times scored 0.54). Standardise such codes first, or
    pass ``prune_fraction=0``, which drops only constant dimensions. Each vote fixes a random factor ``k``
    at a random value, encodes ``batch_size`` observations and records
    ``(argmin_j Var[z_j / s_j], k)``. Each dimension predicts the factor it got most
    training votes for; the score is the accuracy on ``n_eval`` further votes.
    Chance is about ``1 / K``.
    """
    _check_encoding(representation, sampler, seed, chunk_size)
    check_int("n_reference", n_reference, low=2, high=_MAX_DRAWS)  # one observation has no spread
    check_int("n_train", n_train, low=1, high=_MAX_DRAWS)
    check_int("n_eval", n_eval, low=1, high=_MAX_DRAWS)
    check_int("batch_size", batch_size, low=2, high=_MAX_DRAWS)  # a variance needs two codes
    check_number("prune_fraction", prune_fraction)
    if not prune_fraction < 1:  # 1 would prune every code
        raise ValueError(f"prune_fraction must be a number in [0, 1), got {prune_fraction}")
    gen = torch.Generator().manual_seed(seed)
    obs, _ = sampler(n_reference, gen)
    std = _encode(representation, obs, chunk_size).std(0)
    active = std > prune_fraction * std.max()
    if not active.any():
        return 0.0
    sizes = sampler.factor_sizes
    n_votes = n_train + n_eval
    fixed = torch.randint(len(sizes), (n_votes,), generator=gen)

    def groups():
        for k in fixed.tolist():
            value = int(torch.randint(sizes[k], (), generator=gen))
            yield sampler.sample_with_fixed(batch_size, k, value, gen)[0]

    votes = np.array([np.argmin((z[:, active] / std[active]).var(0, ddof=1)) for z in _encode_groups(representation, groups(), chunk_size)])
    labels = fixed.numpy()
    counts = np.zeros((int(active.sum()), len(sizes)), dtype=np.int64)
    np.add.at(counts, (votes[:n_train], labels[:n_train]), 1)
    predicted = np.where(counts.sum(1) > 0, counts.argmax(1), -1)
    return float(np.mean(predicted[votes[n_train:]] == labels[n_train:]))


def beta_vae_score(
    representation,
    sampler,
    *,
    seed: int = 0,
    n_train: int = 800,
    n_eval: int = 400,
    batch_size: int = 64,
    chunk_size: int = 1024,
) -> float:
    """beta-VAE score (Higgins et al. 2017): held-out accuracy of a linear factor classifier.

    Each point picks a factor ``k`` and ``batch_size`` pairs ``(x1, x2)`` whose factors
    agree on ``k`` only by construction; its feature is ``mean |z(x1) - z(x2)|`` over the
    pairs (``[d]``) and its label ``k``. A logistic regression (on standardised features)
    is fit on ``n_train`` points and scored on ``n_eval``. Chance is about ``1 / K``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_encoding(representation, sampler, seed, chunk_size)
    check_int("n_train", n_train, low=1, high=_MAX_DRAWS)
    check_int("n_eval", n_eval, low=1, high=_MAX_DRAWS)
    check_int("batch_size", batch_size, low=1, high=_MAX_DRAWS)
    gen = torch.Generator().manual_seed(seed)
    n_points = n_train + n_eval
    labels = torch.randint(len(sampler.factor_sizes), (n_points,), generator=gen)

    def groups():
        for k in labels.tolist():
            x1, f1 = sampler(batch_size, gen)
            x2, _ = sampler.sample_with_fixed(batch_size, k, f1[:, k], gen)
            yield torch.cat([x1, x2])

    features = np.stack([np.abs(z[:batch_size] - z[batch_size:]).mean(0) for z in _encode_groups(representation, groups(), chunk_size)])
    y = labels.numpy()
    if len(np.unique(y[:n_train])) < 2:
        raise ValueError(f"n_train={n_train} points drew a single factor; use more points")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(features[:n_train], y[:n_train])
    return float(classifier.score(features[n_train:], y[n_train:]))


def evaluate_disentanglement(model, *, seed: int = 0, n_codes: int = 10000, quick: bool = False) -> dict:
    """MIG, DCI, FactorVAE and beta-VAE scores of a VAE trained on the sprites.

    The representation is the posterior mean ``E[z|x]`` (``model.encode_params(x)[0]``,
    model in eval mode). MIG and DCI use ``n_codes`` random sprites (DCI: 80 % to fit,
    20 % to score); the intervention metrics draw their own. ``quick`` shrinks every
    sample size about tenfold, for tests and smoke runs.
    """
    from .models import VAE

    if not isinstance(model, VAE):
        raise TypeError(f"model must be a vaekit VAE, got {type(model).__name__}")
    check_int("seed", seed, high=MAX_GENERATOR_SEED)
    check_int("n_codes", n_codes, low=1, high=_MAX_DRAWS)
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    weights = next(model.parameters())
    was = model.training
    model.eval()

    def representation(obs: Tensor) -> Tensor:  # the sprites in the model's device and dtype
        mu = model.encode_params(obs.to(weights.device, weights.dtype))[0]
        return mu.to(torch.promote_types(mu.dtype, torch.float32)).cpu()  # NumPy has no bfloat16

    scale = 10 if quick else 1
    sampler = SpritesFactors()
    try:
        codes, factors = sample_codes(representation, sampler, max(200, n_codes // scale), seed=seed)
        cut = int(0.8 * len(codes))
        out = {"mig": mig(codes, factors)}
        for key, value in dci(codes[:cut], factors[:cut], codes[cut:], factors[cut:], seed=seed).items():
            out[f"dci_{key}"] = value
        out["factor_vae"] = factor_vae_score(representation, sampler, seed=seed, n_reference=max(500, 5000 // scale),
                                             n_train=max(80, 800 // scale), n_eval=max(80, 800 // scale))
        out["beta_vae"] = beta_vae_score(representation, sampler, seed=seed, n_train=max(80, 800 // scale),
                                         n_eval=max(40, 400 // scale))
    finally:
        model.train(was)
    return out
