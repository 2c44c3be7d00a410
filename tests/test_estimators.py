"""Unbiasedness and the variance estimate, checked against known gradients.

Tolerances: each check compares a mean over R independent replications with its exact value,
in units of the replications' own standard error. With d coordinates tested at once, a
Bonferroni bound at family-wise error 1e-3 needs |z| < Φ⁻¹(1 − 0.0005/d) ≈ 4.0 for d ≤ 10.
The seeds are fixed, so the tests are deterministic; the bound says they are not tuned.
"""
import numpy as np
import pytest
import torch

from flops_dist.estimators import QueryLosses, estimate, variance_scale
from flops_dist.noise import noise_batch
from flops_dist.sharding import plan_queries
from flops_dist.update import UpdateMessage, reconstruct_gradient

Z_CRIT = 4.0
D = 8
SIGMA = 0.05


def quadratic_problem(rng, batch):
    theta = rng.normal(size=D)
    centres = rng.normal(size=(batch, D))
    curvature = rng.uniform(0.5, 2.0, size=(batch, D))
    losses = lambda th: 0.5 * np.sum(curvature * (th - centres) ** 2, axis=-1)  # noqa: E731
    gradient = np.mean(curvature * (theta - centres), axis=0)
    return theta, losses, gradient


def one_estimate(theta, loss_of, allocation, unit, noise_kind, seed_base, estimator):
    plan = plan_queries(np.zeros_like(allocation), allocation, seed_base, unit, False, 4)
    u = noise_batch(plan.seed, D, noise_kind).double().numpy()
    perturbed = theta + SIGMA * plan.sign[:, None] * u
    loss = np.array([loss_of(p)[j] for p, j in zip(perturbed, plan.example)])
    q = QueryLosses(plan.example, plan.seed, plan.sign, loss)
    est = estimate(q, loss_of(theta), estimator, SIGMA, D, noise_kind)
    g = reconstruct_gradient(UpdateMessage(0, 1.0, est.seeds, est.coefficients), D, noise_kind)
    return g.double().numpy(), est


@pytest.mark.parametrize("estimator,unit", [("lr", 1), ("antithetic", 2)])
@pytest.mark.parametrize("noise_kind", ["rademacher", "gaussian"])
def test_estimator_is_unbiased_on_a_quadratic(estimator, unit, noise_kind):
    """For a quadratic, E[(ℓ(θ+σu) − ℓ(θ)) u/σ] = g + (σ/2) E[(uᵀHu) u] = g: odd moments vanish."""
    rng = np.random.default_rng(0)
    theta, loss_of, gradient = quadratic_problem(rng, 3)
    allocation = np.array([1, 3, 2])  # unequal on purpose
    reps = np.array([one_estimate(theta, loss_of, allocation, unit, noise_kind, 1000 * r, estimator)[0]
                     for r in range(1500)])
    z = (reps.mean(0) - gradient) / (reps.std(0, ddof=1) / np.sqrt(len(reps)))
    assert np.all(np.abs(z) < Z_CRIT), z


def test_variance_estimate_matches_trace_covariance_on_linear_losses():
    """ℓ_j = g_jᵀθ gives Δ = σ g_jᵀu exactly, and Tr Cov(Δu/σ) = (d − 1)‖g_j‖² for Rademacher u."""
    rng = np.random.default_rng(1)
    slopes = rng.normal(size=(2, D))
    loss_of = lambda th: th @ slopes.T  # noqa: E731
    c_hats = []
    for r in range(2000):
        _, est = one_estimate(np.zeros(D), loss_of, np.array([2, 2]), 1, "rademacher", 7919 * r, "lr")
        c_hats.append(est.c_hat)
    c_hats = np.array(c_hats)
    exact = variance_scale(D, "rademacher") * np.sum(slopes**2, axis=1)
    z = (c_hats.mean(0) - exact) / (c_hats.std(0, ddof=1) / np.sqrt(len(c_hats)))
    assert np.all(np.abs(z) < Z_CRIT), (c_hats.mean(0), exact)


def test_nan_losses_are_dropped_counted_and_never_reach_the_update():
    example = np.array([0, 0, 0, 1, 1])
    seed = np.array([10, 11, 12, 20, 21])
    loss = np.array([1.0, np.nan, 2.0, np.inf, 3.0])
    est = estimate(QueryLosses(example, seed, np.ones(5, np.int8), loss), np.array([0.5, 1.0]), "lr",
                   0.1, D, "rademacher")
    assert est.dropped_queries == 2
    assert est.units_used.tolist() == [2, 1]
    assert np.all(np.isfinite(est.coefficients))
    assert 11 not in est.seeds and 20 not in est.seeds
    # example 0 keeps 2 finite queries, example 1 one; both contribute, so 1/B' = 1/2
    expected = {10: (1.0 - 0.5) / (0.1 * 2 * 2), 12: (2.0 - 0.5) / (0.1 * 2 * 2), 21: (3.0 - 1.0) / (0.1 * 1 * 2)}
    assert dict(zip(est.seeds.tolist(), est.coefficients.tolist())) == pytest.approx(expected)


def test_a_nan_clean_loss_drops_its_examples_queries():
    q = QueryLosses(np.array([0, 1]), np.array([1, 2]), np.ones(2, np.int8), np.array([1.0, 1.0]))
    est = estimate(q, np.array([np.nan, 0.0]), "lr", 0.1, D, "rademacher")
    assert est.dropped_queries == 1 and est.seeds.tolist() == [2]
    assert np.isnan(est.c_hat[0])


def test_antithetic_rejects_unpaired_queries():
    q = QueryLosses(np.array([0, 0]), np.array([1, 2]), np.array([1, -1], np.int8), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="pairs"):
        estimate(q, np.zeros(1), "antithetic", 0.1, D, "rademacher")


def test_shared_pairing_sums_coefficients_per_seed():
    """Query k of every example uses seed s_k, so c_{s_k} collects all of them."""
    q = QueryLosses(np.array([0, 1, 0]), np.array([5, 5, 6]), np.ones(3, np.int8), np.array([1.0, 2.0, 3.0]))
    est = estimate(q, np.zeros(2), "lr", 1.0, D, "rademacher")
    # A = (2, 1), B' = 2: c_5 = 1/(2·2) + 2/(1·2), c_6 = 3/(2·2)
    assert dict(zip(est.seeds.tolist(), est.coefficients.tolist())) == pytest.approx({5: 1.25, 6: 0.75})
    assert torch.is_tensor(reconstruct_gradient(UpdateMessage(0, 1.0, est.seeds, est.coefficients), D, "rademacher"))
