"""Query allocation across a batch: integers A_j ≥ A_min with Σ_j A_j = N, ask/tell style.

The objective is V(A) = Σ_j c_j / A_j (the trace of the batch estimator's variance, up to 1/B²);
its continuous optimum is Neyman allocation A_j ∝ √c_j. Allocations are counted in *units*: a
query for the lr estimator, a (+, −) pair for the antithetic one.

Every allocator is ask/tell: `allocate(features, budget, a_min, rng) -> (allocation, ask)` and
`learn(ask, c_hat)`, where the ask carries what allocate drew. Everything learning changes is in
the allocator's `state`, a small dataclass (None for those that do not learn), logged every step.

Allocators:
- uniform:   A_j = N / B.
- neyman:    A_min pilot units each, then A ∝ √ĉ_pilot: an adaptive oracle with no learning; the
             pilot is reused in the estimate (biased) or only allocates (unbiased).
- bernoulli: the heuristic of the FLOPS authors' code: a below-mean-loss example has its units
             halved with probability 1/2; the rest of the budget is spread over the others.
- flops:     the learned Gaussian allocator: x ~ N(μ, K), μ_j = β0 + β1 Φ̃_j,
             K_ij = s² exp(−(1 − cos(e_i, e_j)) / (2γ²)), then A = project_to_budget(max(x, 0)).
             (β1, s, γ) follow the likelihood-ratio gradient of E[J(A)], J(A) = Σ ĉ_j / A_j, on the
             continuous allocation; β0 stays fixed (the projection makes the scale of x irrelevant).
             Any of β1, s, γ can be frozen too (`frozen`), for the ablations of bench/ablation.toml.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

ALLOCATORS = ("uniform", "neyman", "bernoulli", "flops")
LEARNABLE = ("beta1", "s", "gamma")  # the λ components learn() moves; β0 is always fixed (LambdaState)


@dataclass
class BatchFeatures:
    """What a clean forward gives for free, and, for allocators with a pilot, the pilot's ĉ_j."""
    losses: np.ndarray               # Φ_j, float [B]
    embeddings: np.ndarray | None    # e_j, float [B, m]
    pilot_c_hat: np.ndarray | None = None
    kappa: np.ndarray | None = None  # κ_j of ĉ_j = κ_j mean Δ²/σ² (estimators.estimate); None: κ(d)

    def subset(self, keep: np.ndarray) -> "BatchFeatures":
        part = lambda v: None if v is None else v[keep]
        return BatchFeatures(self.losses[keep], part(self.embeddings), part(self.pilot_c_hat), part(self.kappa))


def variance_objective(c: np.ndarray, allocation: np.ndarray) -> float:
    """V(A) = Σ_j c_j / A_j."""
    return float(np.sum(np.asarray(c, np.float64) / allocation))


def shared_variance_objective(c: np.ndarray, allocation: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """V(A) under shared pairing, for rows of allocation [..., B].

    With shared noise, unit k of every example uses the same u_k, so ĝ = (1/B) Σ_k u_k u_kᵀ h_k with
    h_k = Σ_{j: A_j > k} g_j / A_j, independent across k, each with Tr Cov = κ‖h_k‖². Summed over k,
        B² Tr Cov ĝ = κ Σ_{i,j} g_iᵀg_j / max(A_i, A_j) = Σ_j c_j / A_j + κ Σ_{i≠j} g_iᵀg_j / max(A_i, A_j):
    Σ c_j/A_j plus the covariance of the examples' estimates, which aligned gradients make positive.
    `scores` z [B, m] (estimators.shared_unit_scores, over m units every example has; NaN counts as 0)
    give E[z_ik z_jk] = κ g_iᵀg_j, so the cross term is estimated without bias by
        (1/m) Σ_k (Σ_{i,j} z_ik z_jk / max(A_i, A_j) − Σ_j z_jk² / A_j),
    and since 1/max(a, b) = ∫ 1[a ≤ t] 1[b ≤ t] dt/t², with A sorted ascending and P_r the prefix
    sums of z in that order, Σ_{i,j} z_i z_j / max(A_i, A_j) = Σ_r P_r² (1/A_(r) − 1/A_(r+1)): O(B log B).
    """
    a = np.asarray(allocation, np.float64)
    z = np.nan_to_num(np.asarray(scores, np.float64))
    order = np.argsort(a, axis=-1, kind="stable")
    inverse = 1.0 / np.take_along_axis(a, order, -1)
    gaps = inverse - np.concatenate([inverse[..., 1:], np.zeros_like(inverse[..., :1])], -1)
    prefix = np.cumsum(z[order], axis=-2)  # [..., B, m]
    pairs = (prefix**2 * gaps[..., None]).sum((-2, -1))
    own = ((z**2).sum(-1) / a).sum(-1)
    return (np.asarray(c, np.float64) / a).sum(-1) + (pairs - own) / max(z.shape[1], 1)


def water_fill(weights: np.ndarray, budget: float, a_min: float) -> np.ndarray:
    """The real allocation A_j = max(A_min, α w_j) with Σ_j A_j = budget; α is found by sorting.
    With w = √c this is the continuous minimiser of V under the floor A_min. Weights [..., B]:
    each row (a candidate) is filled on its own."""
    w = np.nan_to_num(np.asarray(weights, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    w = np.maximum(w, 0.0)
    batch = w.shape[-1]
    if budget < batch * a_min:
        raise ValueError(f"budget {budget} is below batch size × minimum = {batch} × {a_min}")
    w = np.where(w.sum(-1, keepdims=True) > 0.0, w, 1.0)
    ws = -np.sort(-w, axis=-1)
    k = np.arange(1, batch + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (budget - (batch - k) * a_min) / np.cumsum(ws, axis=-1)
    # the largest prefix whose smallest member still sits above the floor
    above = (ws > 0) & (alpha * ws >= a_min)
    last = batch - 1 - np.argmax(above[..., ::-1], axis=-1)
    level = np.where(above.any(-1), np.take_along_axis(alpha, last[..., None], -1)[..., 0], 0.0)
    real = np.maximum(float(a_min), level[..., None] * w)
    return real * (budget / real.sum(-1, keepdims=True))  # absorb the float error of the water level


def project_to_budget(weights: np.ndarray, budget: int, a_min: int) -> np.ndarray:
    """Integers A_j ≥ A_min with Σ_j A_j = budget, closest to water_fill(weights): largest-remainder
    rounding, ties to the lower index, so the result is deterministic and sums exactly."""
    real = water_fill(weights, budget, a_min)
    base = np.maximum(np.floor(real).astype(np.int64), a_min)
    remainder = budget - int(base.sum())
    frac = real - base
    if remainder > 0:
        base[np.argsort(-frac, kind="stable")[:remainder]] += 1
    elif remainder < 0:
        frac[base <= a_min] = np.inf  # never take from an example at the floor
        base[np.argsort(frac, kind="stable")[:-remainder]] -= 1
    return base


def optimal_integer_allocation(c: np.ndarray, budget: int, a_min: int) -> np.ndarray:
    """The exact integer minimiser of V(A): V is separable and convex, so greedily giving each
    next unit to the largest marginal decrease c_j / (A_j (A_j + 1)) is optimal. O(N log B)."""
    c = np.asarray(c, np.float64)
    allocation = np.full(len(c), a_min, dtype=np.int64)
    heap = [(-cj / (a_min * (a_min + 1)), j) for j, cj in enumerate(c)]
    heapq.heapify(heap)
    for _ in range(budget - a_min * len(c)):
        _, j = heapq.heappop(heap)
        allocation[j] += 1
        a = allocation[j]
        heapq.heappush(heap, (-c[j] / (a * (a + 1)), j))
    return allocation


def standardize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros_like(x)
    x = np.where(finite, x, x[finite].max())  # a non-finite loss counts as the worst seen
    std = x.std()
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)


class UniformAllocator:
    name = "uniform"
    pilot_units = 0
    reuses_pilot = True  # a pilot's units (neyman's) also count in the estimate
    state = None  # nothing is learned

    def allocate(self, features: BatchFeatures, budget: int, a_min: int, rng: np.random.Generator):
        return self.allocation(features, budget, a_min, rng), None

    def allocation(self, features: BatchFeatures, budget: int, a_min: int, rng: np.random.Generator):
        return project_to_budget(np.ones(len(features.losses)), budget, a_min)

    def learn(self, ask, c_hat: np.ndarray, shared_scores: np.ndarray | None = None) -> None:
        """Nothing to learn."""

    def parameters(self) -> dict[str, float]:
        return {}

    def load_state(self, saved: dict | None) -> None:
        """The state as logged (a dict of its fields), or None."""
        if saved is not None:
            raise ValueError(f"the {self.name} allocator learns nothing, but the log holds a learned state")


class NeymanAllocator(UniformAllocator):
    """Pilot p = A_min units per example, then units ∝ √ĉ_pilot; an adaptive oracle with no learning.

    reuse: A = project_to_budget(√ĉ, N, p) and the pilot's units count in the estimate. A pilot with
    a large |Δ| attracts more units, so its own term gets a smaller weight 1/A_j: E[ĝ] is shrunk
    along g (biased).
    discard: the pilot only allocates. A_j = p + A'_j, A' = project_to_budget(√ĉ, N − B·p, 1), and
    the estimate uses the A'_j later units alone. Their seeds are new, so given the pilot A' is a
    constant and each ĝ_j is unbiased; the price is the B·p pilot units the estimate does not use.
    """
    name = "neyman"

    def __init__(self, pilot_units: int, reuse_pilot: bool = True):
        self.pilot_units = pilot_units
        self.reuses_pilot = reuse_pilot

    def allocation(self, features, budget, a_min, rng):
        if features.pilot_c_hat is None:
            raise ValueError("neyman allocation needs the pilot's variance estimates")
        root_c = np.sqrt(np.maximum(np.nan_to_num(features.pilot_c_hat, nan=0.0), 0.0))
        if self.reuses_pilot:
            return project_to_budget(root_c, budget, max(a_min, self.pilot_units))
        # every example keeps ≥ 1 unit beyond the pilot, or its gradient would be missing from ĝ
        return self.pilot_units + project_to_budget(root_c, budget - self.pilot_units * len(root_c), 1)


class BernoulliAllocator(UniformAllocator):
    name = "bernoulli"

    def allocation(self, features, budget, a_min, rng):
        phi = standardize(features.losses)
        halve = (phi < 0) & (rng.random(len(phi)) < 0.5)
        return project_to_budget(np.where(halve, 0.5, 1.0), budget, a_min)


@dataclass(frozen=True)
class LambdaState:
    """λ = (β0, β1, log s, log γ) and the Adam moments learn() keeps for it.

    β0 is held fixed: the projection scales x to the budget, so λ and (aβ0, aβ1, as, γ) give the
    same allocation for any a > 0. Fixing β0 > 0 removes that direction, along which learning
    drifted until β0 crossed zero and the allocation reversed; Σ_j μ_j = B·β0 then stays positive.
    `adam_step` counts learn steps: the step-size decay reads it, so a resumed run decays the same.
    """
    beta0: float
    beta1: float
    log_s: float
    log_gamma: float
    adam_step: float = 0.0
    adam_m: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    adam_v: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)

    @property
    def raw(self) -> list[float]:
        return [self.beta0, self.beta1, self.log_s, self.log_gamma]


@dataclass(frozen=True)
class GaussianAsk:
    """What allocate() drew and learn() reuses: the standardised losses Φ̃, the unit embeddings,
    the kernel's random features, and the rng, whose stream learn() continues."""
    phi: torch.Tensor
    unit: torch.Tensor | None
    omega: torch.Tensor | None
    phase: torch.Tensor | None
    budget: int
    a_min: int
    rng: np.random.Generator


def random_features(unit, omega, phase, log_gamma, derivative: bool = False):
    """Z with (ZZᵀ)_ij ≈ exp(−‖ê_i − ê_j‖²/(4γ²)) = exp(−(1 − cos)/(2γ²)); None without embeddings.
    derivative: the pair (Z, ∂Z/∂log γ) instead ((None, None) without embeddings)."""
    if unit is None:
        return (None, None) if derivative else None
    proj = unit @ omega / (math.sqrt(2.0) * torch.exp(log_gamma))
    angle, scale = proj + phase, math.sqrt(2.0 / omega.shape[1])
    z = scale * torch.cos(angle)
    if not derivative:
        return z
    return z, scale * torch.sin(angle) * proj  # proj ∝ 1/γ: ∂proj/∂log γ = −proj


class GaussianAllocator:
    """The learned FLOPS allocator (module docstring), at O(B·R·m) per allocation.

    K is never formed: random Fourier features Z ∈ R^{B×R} give exp(−‖ê_i − ê_j‖²/(4γ²)) ≈ (ZZᵀ)_ij
    for unit embeddings ê (1 − cos = ‖ê_i − ê_j‖²/2), and a small nugget η keeps the density proper:
        K = s² ((1 − η) ZZᵀ + η I).
    log p(x | λ) then costs O(B R²) through the Woodbury identity and the determinant lemma.
    Without embeddings, K = s² I. The object holds hyperparameters and `state` (a LambdaState).
    """
    name = "flops"
    pilot_units = 0
    reuses_pilot = True  # it has no pilot: nothing to discard

    def __init__(self, beta0: float = 1.0, beta1: float = 1.0, scale: float = 0.3,
                 lengthscale: float = 0.5, learning_rate: float = 0.05, candidates: int = 16,
                 features: int = 64, nugget: float = 0.05, min_scale: float = 0.05, decay_steps: float = 200.0,
                 frozen: tuple[str, ...] = ()):
        if not beta0 > 0:
            raise ValueError(f"beta0 is the fixed scale of the mean and must be positive, got {beta0}")
        unknown = sorted(set(frozen) - set(LEARNABLE))
        if unknown:
            raise ValueError(f"cannot freeze {unknown[0]!r}: the learned components are {', '.join(LEARNABLE)}")
        self.state = LambdaState(beta0, beta1, math.log(max(scale, min_scale * beta0)), math.log(lengthscale))
        self.learning_rate = learning_rate  # 0 freezes λ
        self.candidates = candidates
        self.n_features = features
        self.nugget = nugget
        self.min_scale = min_scale  # floor of s/β0: below it every candidate is the same allocation
        self.decay_steps = decay_steps
        # indices into LambdaState.raw held at their initial values, with β0's
        self.frozen = (0,) + tuple(1 + LEARNABLE.index(name) for name in frozen)

    def parameters(self) -> dict[str, float]:
        s = self.state
        return {"beta0": s.beta0, "beta1": s.beta1, "s": math.exp(s.log_s), "gamma": math.exp(s.log_gamma)}

    def load_state(self, saved: dict | None) -> None:
        """The state as logged (a dict of LambdaState's fields); None keeps the initial one."""
        if saved is not None:
            self.state = LambdaState(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})

    def _sample(self, mu, z, log_s, rng: np.random.Generator, count: int) -> torch.Tensor:
        batch = mu.shape[0]
        eps = torch.from_numpy(rng.standard_normal((count, batch)))
        if z is None:
            return mu + torch.exp(log_s) * eps
        xi = torch.from_numpy(rng.standard_normal((count, z.shape[1])))
        return mu + torch.exp(log_s) * (math.sqrt(1 - self.nugget) * xi @ z.T
                                        + math.sqrt(self.nugget) * eps)

    def allocate(self, features, budget, a_min, rng):
        phi = torch.from_numpy(standardize(features.losses))
        unit = omega = phase = None
        if features.embeddings is not None:
            e = torch.as_tensor(np.asarray(features.embeddings, np.float64)).reshape(len(phi), -1)
            unit = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
            omega = torch.from_numpy(rng.standard_normal((unit.shape[1], self.n_features)))
            phase = torch.from_numpy(rng.uniform(0.0, 2.0 * math.pi, self.n_features))
        b0, b1, log_s, log_g = torch.tensor(self.state.raw, dtype=torch.float64)
        x = self._sample(b0 + b1 * phi, random_features(unit, omega, phase, log_g), log_s, rng, 1)[0]
        return project_to_budget(x.numpy(), budget, a_min), GaussianAsk(phi, unit, omega, phase, budget, a_min, rng)

    def log_prob(self, x: torch.Tensor, phi, unit, omega, phase, raw: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | λ) for rows of x [M, B], differentiable in `raw` (λ; the state's by default)."""
        b0, b1, log_s, log_g = torch.tensor(self.state.raw, dtype=torch.float64) if raw is None else raw
        r = x - (b0 + b1 * phi)
        batch = r.shape[1]
        s2_eta = torch.exp(2 * log_s) * self.nugget
        quad = (r * r).sum(1)
        logdet = batch * torch.log(s2_eta)
        z = random_features(unit, omega, phase, log_g)
        if z is not None:
            ratio = (1 - self.nugget) / self.nugget
            inner = torch.eye(z.shape[1], dtype=z.dtype) + ratio * z.T @ z
            chol = torch.linalg.cholesky(inner)
            zr = r @ z  # [M, R]
            solved = torch.cholesky_solve(zr.T, chol)  # inner⁻¹ Zᵀr
            quad = quad - ratio * (zr * solved.T).sum(1)
            logdet = logdet + 2 * torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (quad / s2_eta + logdet + batch * math.log(2 * math.pi))

    def log_prob_gradient(self, x, advantage, phi, z, dz, raw=None) -> np.ndarray:
        """∇_λ of mean_m a_m log p(x_m | λ), in closed form: what autograd gives through log_prob up to
        rounding, without its overhead (most of learn's time, for four numbers).

        x [M, B] and advantage a [M]; phi as log_prob's; z, dz = random_features(..., derivative=True)
        at λ's log γ; λ is the state's unless `raw` is given. With r_m = x_m − μ, ρ = (1 − η)/η,
        A = I + ρ ZᵀZ and w_m = s²η K⁻¹r_m = r_m − ρ Z A⁻¹Zᵀr_m (Woodbury):
            ∂ log p_m/∂μ = w_m / s²η                 (β0, β1 through μ = β0 + β1 Φ̃)
            ∂ log p_m/∂log s = r_mᵀw_m / s²η − B
            ∂ log p_m/∂Z = ρ (w_m w_mᵀZ / s²η − Z A⁻¹)
        the last from d(r_mᵀK⁻¹r_m) = −2ρ w_mᵀ dZ Zᵀw_m / s²η and d log det K = 2ρ tr(A⁻¹Zᵀ dZ);
        log γ enters through ∂Z/∂log γ = dz. Zᵀw_m = A⁻¹Zᵀr_m comes out of the Woodbury solve.
        """
        b0, b1, log_s, _ = self.state.raw if raw is None else [float(v) for v in raw]
        # torch, not numpy: its products keep to the coordinator's one thread, where numpy's BLAS starts
        # its own (at B = 65,536 that made learn 7× slower on shared cores); at B = 32 numpy was ~10% faster
        x, advantage, phi = (torch.as_tensor(v, dtype=torch.float64) for v in (x, advantage, phi))
        count, batch = x.shape
        r = x - (b0 + b1 * phi)
        s2_eta = math.exp(2 * log_s) * self.nugget
        w = r
        if z is not None:
            ratio = (1 - self.nugget) / self.nugget
            inner = torch.addmm(torch.eye(z.shape[1], dtype=z.dtype), z.T, z, alpha=ratio)  # A
            z_inner = torch.cholesky_solve(z.T, torch.linalg.cholesky(inner)).T  # Z A⁻¹ (A is symmetric)
            solved = r @ z_inner  # rows A⁻¹Zᵀr_m = Zᵀw_m
            w = torch.addmm(r, solved, z.T, alpha=-ratio)
        weighted = w * (advantage / (count * s2_eta))[:, None]  # rows a_m K⁻¹r_m / M
        mean_advantage = float(advantage.mean())  # 0 up to rounding for learn's advantages, not in general
        d_log_s = float((weighted * r).sum()) - batch * mean_advantage
        d_log_gamma = 0.0 if z is None else ratio * (float((weighted @ dz * solved).sum())
                                                     - mean_advantage * float((z_inner * dz).sum()))
        return np.array([float(weighted.sum()), float((weighted @ phi).sum()), d_log_s, d_log_gamma])

    def learn(self, ask: GaussianAsk, c_hat: np.ndarray, shared_scores: np.ndarray | None = None) -> None:
        """One likelihood-ratio step on (β1, log s, log γ): ∇E[J] ≈ (1/M) Σ_m (J_m − b_m) ∇ log p(x_m | λ),
        with the leave-one-out baseline b_m, and advantages divided by mean J so the step is scale-free.

        J_m is V on the *continuous* allocation water_fill(x_m): rounded allocations of nearby
        candidates coincide, which zeroes every advantage once s is small and stops learning for good.
        Under shared pairing (`shared_scores` given) V is shared_variance_objective, not Σ ĉ_j / A_j.
        The step size decays as η/√(1 + t/decay_steps) (Adam's step is about η whatever the
        gradient's scale, so a constant η leaves λ jittering around the optimum), and s stays at or
        above min_scale·β0.
        """
        c = np.nan_to_num(np.asarray(c_hat, np.float64), nan=0.0)
        if self.learning_rate <= 0 or not np.any(c > 0):
            return
        b0, b1, log_s, log_g = torch.tensor(self.state.raw, dtype=torch.float64)
        z, dz = random_features(ask.unit, ask.omega, ask.phase, log_g, derivative=True)
        x = self._sample(b0 + b1 * ask.phi, z, log_s, ask.rng, self.candidates)
        candidates = water_fill(x.numpy(), ask.budget, ask.a_min)
        j = (c / candidates).sum(1) if shared_scores is None else shared_variance_objective(c, candidates, shared_scores)
        baseline = (j.sum() - j) / (len(j) - 1)
        advantage = (j - baseline) / j.mean()
        grad = self.log_prob_gradient(x, advantage, ask.phi, z, dz)
        # β0 and the frozen components: Adam moves a coordinate whose gradient was always 0 by exactly 0
        grad[list(self.frozen)] = 0.0
        self._adam_step(grad)

    def _adam_step(self, grad: np.ndarray, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """One step of torch.optim.Adam (its defaults), descending `grad`, from and to the moments in
        the state, at this step's decayed size; then log s is clamped to its floor. Written out over
        plain floats: building torch's optimizer for four numbers cost more than the whole gradient."""
        state, (beta1, beta2) = self.state, betas
        lr = self.learning_rate / math.sqrt(1.0 + state.adam_step / self.decay_steps)
        step = state.adam_step + 1.0
        grad = grad.tolist()
        # β1 m + (1 − β1) g, in the form torch's lerp_ computes it
        m = [mi + (1 - beta1) * (gi - mi) for mi, gi in zip(state.adam_m, grad)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(state.adam_v, grad)]
        step_size, root_bias2 = lr / (1 - beta1**step), math.sqrt(1 - beta2**step)
        raw = [p - step_size * (mi / (math.sqrt(vi) / root_bias2 + eps)) for p, mi, vi in zip(state.raw, m, v)]
        raw[2] = max(raw[2], math.log(self.min_scale * state.beta0))
        self.state = LambdaState(*raw, step, tuple(m), tuple(v))


def make_allocator(name: str, *, pilot_units: int = 1, reuse_pilot: bool = True, learning_rate: float = 0.05,
                   **gaussian) -> UniformAllocator | GaussianAllocator:
    if name == "uniform":
        return UniformAllocator()
    if name == "neyman":
        return NeymanAllocator(pilot_units, reuse_pilot)
    if name == "bernoulli":
        return BernoulliAllocator()
    if name == "flops":
        return GaussianAllocator(learning_rate=learning_rate, **gaussian)
    raise ValueError(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
