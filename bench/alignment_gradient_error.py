"""How much each allocator cuts the gradient-estimate error on the alignment application.

    python bench/alignment_gradient_error.py [--steps 150] [--reps 16] [--batches 6] [--smoke]

Final accuracy moves little with the allocator (bench/blackbox_apps.py); this measures the
quantity the allocators minimise, as bench/allocators_digits.py does for digits. The frozen part
of the alignment loss (MiniLM's label-text embeddings, a cosine and a cross-entropy) is plain
torch, so here, and only here, backprop gives the true batch gradient g of the projection W.

θ is taken from the uniform/lr run (seed 0) after 0, steps/3 and steps updates. At each, for
--batches fixed batches, every allocator's estimate ĝ is repeated --reps times (the batch pinned,
the step index varied: new query seeds and allocator draws, common to all allocators), and
MSE = mean ‖ĝ − g‖² is summed over batches and divided by uniform's (± a jackknife over batches);
g-gain = Σ gᵀĝ̄ / Σ ‖g‖² is 1 for an unbiased estimate, below 1 where it shrinks along g.
flops is measured at the λ its own seed-0 run had learned by that step. The oracle is the exact
integer optimum on the true c_j = (d − 1)‖g_j‖²: the least any unbiased allocation can reach.
B = 32, A₀ = 4, A_min = 2, the lr estimator, as in the bench's alignment runs.
--smoke: 3 steps, 2 batches × 3 repeats; the example's data is prepared under bench/out if missing.
"""
import argparse

import numpy as np
import torch

from common import Application, gradient_errors, jackknife_ratio, oracle_ratio
from flops_dist.loading import build_model
from flops_dist.engine import Engine, LocalExecutor

ALLOCATORS = ("uniform", "bernoulli", "neyman", "flops")


def trajectory(app, allocator, checkpoints):
    """θ (a replica snapshot) and the allocator's state (λ, for flops) of a seed-0 run at the
    checkpoint steps."""
    cfg = app.config(allocator)
    replica = app.replica(cfg)
    engine = Engine(cfg.train, LocalExecutor([replica]), app.train, replica.d)
    snapshots, lambdas = {}, {}
    for t in range(max(checkpoints) + 1):
        if t in checkpoints:
            snapshots[t] = replica.snapshot_tensors()
            lambdas[t] = engine.allocator.state
        if t < max(checkpoints):
            engine.step(t)
    return snapshots, lambdas


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.reps, args.batches = 3, 3, 2
    torch.set_num_threads(1)
    app = Application("alignment")
    t = app.cfg.train
    checkpoints = (0, args.steps // 3, args.steps)
    snapshots, _ = trajectory(app, "uniform", checkpoints)
    _, lambdas = trajectory(app, "flops", checkpoints)
    rng = np.random.default_rng(123)
    d = sum(p.numel() for p in build_model(app.cfg).parameters())
    print(f"alignment, d = {d}, B = {t.batch_size}, A₀ = {t.queries_per_example}; MSE ÷ uniform's "
          f"({args.batches} batches × {args.reps} repeats; ± jackknife over batches)")
    print(f"{'after step':>10} " + " ".join(f"{a:>14}" for a in ALLOCATORS[1:]) + f" {'oracle':>8}   g-gain: "
          + " ".join(f"{a:>9}" for a in ALLOCATORS))
    for step in checkpoints:
        replica = app.replica(app.config("uniform"))
        replica.restore(snapshots[step], step, [])
        batches = [rng.choice(len(app.train), t.batch_size, replace=False) for _ in range(args.batches)]
        # flops is measured with its learned λ frozen (allocator learning rate 0)
        errors = {a: gradient_errors(app.config(a, allocator_learning_rate=0.0).train, replica, app.train,
                                     batches, args.reps, lambdas.get(step) if a == "flops" else None)
                  for a in ALLOCATORS}
        oracle, _ = oracle_ratio(replica, app.train, batches, t.batch_size * t.queries_per_example, t.min_queries)
        cells = []
        for a in ALLOCATORS[1:]:
            ratio, se = jackknife_ratio(errors[a][:, 0], errors["uniform"][:, 0])
            cells.append(f"{ratio:6.2f} ± {se:.2f}  ")
        # columns of gradient_errors: MSE, variance, bias², ‖g‖², gᵀĝ̄
        gains = " ".join(f"{errors[a][:, 4].sum() / errors[a][:, 3].sum():9.2f}" for a in ALLOCATORS)
        print(f"{step:>10} " + " ".join(f"{c:>14}" for c in cells) + f" {oracle:8.2f}           {gains}",
              flush=True)


if __name__ == "__main__":
    main()
