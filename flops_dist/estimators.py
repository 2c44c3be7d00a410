"""Scalar losses -> per-seed update coefficients c_s and per-example variance estimates ĉ_j.

Every estimator here is linear in the noise, so the batch gradient is ĝ = Σ_s c_s · u(seed_s).

- lr:          ĝ_j = (1/A_j) Σ_k (ℓ_j(θ+σu_k) − ℓ_j(θ)) u_k / σ
- antithetic:  ĝ_j = (1/P_j) Σ_k (ℓ_j(θ+σu_k) − ℓ_j(θ−σu_k)) u_k / (2σ)
- ĝ = (1/B') Σ_j ĝ_j over the B' examples that kept at least one finite query.

A query whose loss (or whose partner's, or whose clean baseline) is NaN or inf is dropped and
counted; an example's remaining queries are re-weighted by 1/(its finite count), so a drop never
puts a non-finite number into θ.

ĉ_j = Tr Cov of one unit's estimate (a unit is a query for lr, a pair for antithetic). With
Δ = ℓ(θ+σu) − ℓ(θ) (or half the antithetic difference), Δ ≈ σ gᵀu, and
    Tr Cov = E‖Δu/σ‖² − ‖g‖² = κ ‖g‖²,  κ = d − 1 (Rademacher, ‖u‖² = d), d + 1 (Gaussian),
so ĉ_j = κ · mean_k(Δ_jk²) / σ² uses the scalar losses alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("lr", "antithetic")


@dataclass(frozen=True)
class QueryLosses:
    """One step's queries in global order. A unit k of example j has 1 query (lr) or 2 (antithetic,
    signs +1 then −1), all with the same seed."""
    example: np.ndarray  # int64 [Q]
    seed: np.ndarray     # int64 [Q]
    sign: np.ndarray     # int8  [Q], +1 or −1
    loss: np.ndarray     # float [Q]


@dataclass(frozen=True)
class Estimate:
    seeds: np.ndarray          # int64 [S], unique, in order of first use
    coefficients: np.ndarray   # float64 [S]
    c_hat: np.ndarray          # float64 [B], NaN where an example kept no finite unit
    units_used: np.ndarray     # int64 [B], finite units per example
    dropped_queries: int


def variance_scale(d: int, noise_kind: str) -> float:
    """κ with Tr Cov(Δu/σ) = κ‖g‖² for a linear loss (see module docstring)."""
    return float(d - 1 if noise_kind == "rademacher" else d + 1)


def _unit_differences(q: QueryLosses, clean_loss: np.ndarray, estimator: str):
    """Per unit: example, seed, Δ (NaN when the unit is dropped), and the count of dropped queries."""
    loss = q.loss.astype(np.float64)
    if estimator == "lr":
        delta = loss - clean_loss[q.example]
        finite = np.isfinite(delta)
        return q.example, q.seed, np.where(finite, delta, np.nan), int((~finite).sum())
    if estimator == "antithetic":
        plus, minus = slice(0, None, 2), slice(1, None, 2)
        if not (np.all(q.sign[plus] == 1) and np.all(q.sign[minus] == -1)
                and np.array_equal(q.seed[plus], q.seed[minus])):
            raise ValueError("antithetic queries must come in (+σu, −σu) pairs sharing a seed")
        delta = 0.5 * (loss[plus] - loss[minus])
        finite = np.isfinite(delta)
        return q.example[plus], q.seed[plus], np.where(finite, delta, np.nan), int(2 * (~finite).sum())
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def estimate(q: QueryLosses, clean_loss: np.ndarray, estimator: str, sigma: float, d: int,
             noise_kind: str, kappa: np.ndarray | None = None) -> Estimate:
    """Coefficients of ĝ = Σ_s c_s u(seed_s) and the per-example ĉ_j (module docstring). `kappa`:
    κ_j per example where it depends on the example (output-space noise, outputs.py), else κ(d)."""
    batch = len(clean_loss)
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf is a dropped query, counted below, not news
        example, seed, delta, dropped = _unit_differences(q, np.asarray(clean_loss, np.float64), estimator)
    finite = np.isfinite(delta)
    units_used = np.bincount(example[finite], minlength=batch)
    contributing = int((units_used > 0).sum())
    per_unit = np.zeros_like(delta)
    if contributing:
        per_unit[finite] = delta[finite] / (sigma * units_used[example[finite]] * contributing)
    # bincount sums sequentially in query order, so c_s does not depend on how queries were sharded.
    seeds, first, inverse = np.unique(seed, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    coefficients = np.bincount(rank[inverse], weights=per_unit, minlength=len(seeds))
    sq = np.bincount(example[finite], weights=delta[finite] ** 2, minlength=batch)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = variance_scale(d, noise_kind) if kappa is None else np.asarray(kappa, np.float64)
        c_hat = scale * sq / (units_used * sigma**2)
    c_hat[units_used == 0] = np.nan
    keep = coefficients != 0.0
    return Estimate(seeds[order][keep], coefficients[keep], c_hat, units_used, dropped)


def shared_unit_scores(q: QueryLosses, clean_loss: np.ndarray, estimator: str, sigma: float, d: int,
                       noise_kind: str) -> np.ndarray:
    """Under shared pairing, z [B, S]: z_jk = √κ Δ_jk / σ for example j's unit with the k-th of the
    step's S seeds in increasing order (unit k of every example uses seed s_k), NaN where example j
    has no finite unit with that seed.

    Δ_jk ≈ σ g_jᵀu_k with u_k common to all examples, so E[z_ik z_jk] = κ g_iᵀg_j: mean_k z_jk² is
    ĉ_j, and a product across examples estimates the covariance of their estimates, which
    allocators.shared_variance_objective needs.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        example, seed, delta, _ = _unit_differences(q, np.asarray(clean_loss, np.float64), estimator)
    seeds, column = np.unique(seed, return_inverse=True)
    z = np.full((len(clean_loss), len(seeds)), np.nan)
    z[example, column] = np.sqrt(variance_scale(d, noise_kind)) * delta / sigma
    return z
