"""How much each allocator cuts the gradient-estimate error on the alignment application.

    python bench/alignment_gradient_error.py [--steps 150] [--reps 16] [--batches 6]

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
"""
import argparse
import copy

import numpy as np
import torch

from allocators_digits import Capture, jackknife_ratio
from blackbox_apps import Application
from flops_dist.allocators import optimal_integer_allocation, variance_objective
from flops_dist.api import build_model
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec
from flops_dist.update import reconstruct_gradient

ALLOCATORS = ("uniform", "bernoulli", "neyman", "flops")


def replica_for(app, cfg):
    t = cfg.train
    spec = ReplicaSpec(sigma=t.sigma, noise=t.noise, optimizer=t.optimizer_config(), threads=1, device="cpu")
    return Replica(build_model(cfg), app.loss_fn, app.train, spec)


def config(app, allocator, **train):
    cfg = copy.deepcopy(app.cfg)
    cfg.train.allocator = allocator
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


def trajectory(app, allocator, checkpoints):
    """θ (and the allocator's raw λ) of a seed-0 run at the checkpoint steps."""
    cfg = config(app, allocator)
    replica = replica_for(app, cfg)
    engine = Engine(cfg.train, LocalExecutor([replica]), len(app.train), replica.d)
    thetas, lambdas = {}, {}
    for t in range(max(checkpoints) + 1):
        if t in checkpoints:
            thetas[t] = replica.theta.clone()
            if hasattr(engine.allocator, "raw"):
                lambdas[t] = engine.allocator.raw.detach().clone()
        if t < max(checkpoints):
            engine.step(t)
    return thetas, lambdas


def example_gradients(replica, batch):
    theta = replica.theta.clone().requires_grad_(True)
    x, y = replica.inputs[batch], replica.labels[batch]
    losses = replica.forward.losses(replica.forward.call(theta, x), x, y)[0]
    return torch.stack([torch.autograd.grad(l, theta, retain_graph=True)[0] for l in losses]).double()


def mse(app, replica, allocator, batches, reps, raw=None):
    # flops is measured with its learned λ frozen (allocator learning rate 0)
    cfg = config(app, allocator, allocator_learning_rate=0.0)
    executor = Capture([replica])
    engine = Engine(cfg.train, executor, len(app.train), replica.d)
    if raw is not None:
        engine.allocator.raw.data.copy_(raw)
    out = []
    for b, batch in enumerate(batches):
        g = example_gradients(replica, batch).mean(0)
        engine.batch = lambda t, batch=batch: batch
        est = []
        for r in range(reps):
            engine.step(b * reps + r)
            est.append(reconstruct_gradient(executor.message, replica.d, cfg.train.noise).double())
        est = torch.stack(est)
        out.append((float(((est - g) ** 2).sum(1).mean()), float(g @ est.mean(0)), float(g @ g)))
    return np.array(out)  # [batches, (MSE, gᵀĝ̄, ‖g‖²)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    app = Application("alignment")
    t = app.cfg.train
    checkpoints = (0, args.steps // 3, args.steps)
    thetas, _ = trajectory(app, "uniform", checkpoints)
    _, lambdas = trajectory(app, "flops", checkpoints)
    rng = np.random.default_rng(123)
    d = sum(p.numel() for p in build_model(app.cfg).parameters())
    print(f"alignment, d = {d}, B = {t.batch_size}, A₀ = {t.queries_per_example}; MSE ÷ uniform's "
          f"({args.batches} batches × {args.reps} repeats; ± jackknife over batches)")
    print(f"{'after step':>10} " + " ".join(f"{a:>14}" for a in ALLOCATORS[1:]) + f" {'oracle':>8}   g-gain: "
          + " ".join(f"{a:>9}" for a in ALLOCATORS))
    for step in checkpoints:
        replica = replica_for(app, config(app, "uniform"))
        replica.theta = thetas[step].clone()
        batches = [rng.choice(len(app.train), t.batch_size, replace=False) for _ in range(args.batches)]
        errors = {a: mse(app, replica, a, batches, args.reps, lambdas.get(step) if a == "flops" else None)
                  for a in ALLOCATORS}
        v_opt = v_unif = 0.0
        for batch in batches:
            c = (replica.d - 1) * (example_gradients(replica, batch) ** 2).sum(1).numpy()
            v_opt += variance_objective(c, optimal_integer_allocation(c, t.batch_size * t.queries_per_example,
                                                                      t.min_queries))
            v_unif += variance_objective(c, np.full(len(c), t.queries_per_example))
        cells = []
        for a in ALLOCATORS[1:]:
            ratio, se = jackknife_ratio(errors[a][:, 0], errors["uniform"][:, 0])
            cells.append(f"{ratio:6.2f} ± {se:.2f}  ")
        gains = " ".join(f"{errors[a][:, 1].sum() / errors[a][:, 2].sum():9.2f}" for a in ALLOCATORS)
        print(f"{step:>10} " + " ".join(f"{c:>14}" for c in cells) + f" {v_opt / v_unif:8.2f}           {gains}",
              flush=True)


if __name__ == "__main__":
    main()
