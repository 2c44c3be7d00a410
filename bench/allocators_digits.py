"""Allocators side by side on the digits fine-tuning of the main job, at an equal query budget.

    python bench/allocators_digits.py [--seeds 3] [--steps 300] [--reps 16] [--batches 6] [--lrs 0.1,0.2]
                                      [--smoke]

The job is examples/digits/digits.toml: TinyViT pretrained by backprop on digits 0-4, its `head`
(330 parameters) fine-tuned forward-only on all 10 digits; B = 32, A₀ = 8 (every allocator spends
exactly B·A₀ = 256 queries a step, neyman's pilot included), A_min = 2, lr estimator, Rademacher
noise, σ = 1e-3, SGD. Allocators: uniform, bernoulli, neyman (pilot = A_min), flops-frozen (λ fixed
at its start β0 = β1 = 1, i.e. A ∝ 1 + Φ̃ plus the kernel's noise) and flops (λ learned).

Training runs in this process on the Ray-free reference engine (Engine + LocalExecutor + Replica),
which the tests prove bit-identical to the Ray path: the same math, without Ray's overhead.

1. Gradient error. θ is taken from the uniform run of seed 0 after 0, steps/2 and steps updates,
   so every allocator is judged at the same θ, on the same batches, against the same truth: the
   batch gradient g of the head by backprop (this benchmark only). For each of --batches fixed
   batches the estimate ĝ is repeated --reps times: the engine's batch is pinned and its step index
   varied, which varies the query seeds and the allocator's draws; an executor keeps the update
   message instead of applying it, and ĝ = reconstruct_gradient(message). The same step indices
   for every allocator give common random numbers (query k of example j has the same noise). Per
   batch, with ĝ̄ the mean over reps and V = Σ_r ‖ĝ_r − ĝ̄‖² / (R − 1):
       MSE = mean_r ‖ĝ_r − g‖²,  variance = V,  bias² = MSE − V = ‖ĝ̄ − g‖² − V / R  (unbiased),
   summed over batches and divided by uniform's MSE (uniform is unbiased, so its MSE is its
   variance; dividing bias² by uniform's bias², which is ~0, would mean nothing). ± is a jackknife
   over batches. Also g-gain = Σ gᵀĝ̄ / Σ ‖g‖² (1 when unbiased; below 1 is shrinkage along g, which
   a small-pilot Neyman shows: large pilots draw more queries and so get less weight), and two
   analytic checks from per-example backprop gradients g_j, with c_j = (d − 1)‖g_j‖²: uniform's
   predicted MSE Σ c_j / (B² A₀), and the oracle V(A*)/V(uniform) of the exact integer optimum A*,
   the least any unbiased allocation can reach. flops is measured at the λ its own seed-0 run had
   learned by that step, with learning switched off while measuring.
2. Training: final test accuracy (600 digits) and final train loss (mean clean batch loss over the
   last 20 steps), mean ± std over seeds; batches are a function of the seed only, so allocators
   of one seed see the same batches, and the difference to uniform is also given paired by seed.
3. Learning rates: every allocator at every rate of --lrs; "best lr" picks each allocator's rate by
   final train loss. Queries to a train-loss target: the target is uniform's final train loss at the
   first rate; the curve is the seed-mean loss under a 20-step running mean; ratio to uniform's.

Writes the table to allocators_digits.txt and loss-vs-queries to allocators_digits.png in a new
directory bench/out/allocators_digits-*. --smoke: 1 seed, 4 steps, 2 batches × 3 repeats; the
example's data is prepared under bench/out if missing.
"""
import argparse
import time

import numpy as np
import torch

from common import Report, digits_config, fresh_dir, gradient_errors, jackknife_ratio, oracle_ratio
from flops_dist.loading import build_model, load_callable
from flops_dist.data import load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec

ALLOCATORS = {
    "uniform": dict(train__allocator="uniform"),
    "bernoulli": dict(train__allocator="bernoulli"),
    "neyman": dict(train__allocator="neyman"),
    "flops-frozen": dict(train__allocator="flops", train__allocator_learning_rate=0.0),
    "flops": dict(train__allocator="flops"),
}
WINDOW = 20  # steps in the final train loss and the running mean


def config(name, **overrides):
    # hash_every=0: one replica, nothing to compare. The budget this bench was measured at (A₀ = 8,
    # chunks of 16), not the main job's present one
    return digits_config(**ALLOCATORS[name], train__hash_every=0, train__queries_per_example=8,
                         train__chunk_size=16, **overrides)


class Setup:
    def __init__(self):
        cfg = config("uniform")
        self.loss_fn = load_callable(cfg.model.loss, "model.loss")
        self.train = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
        self.test = load_dataset(cfg.data.test, cfg.data.input_column, cfg.data.label_column)

    def replica(self, cfg):
        t = cfg.train
        spec = ReplicaSpec(include=cfg.target.include, embedding_module=cfg.target.embedding_module,
                           sigma=t.sigma, noise=t.noise, optimizer=t.optimizer_config(), threads=1,
                           device="cpu")
        return Replica(build_model(cfg), self.loss_fn, self.train, spec)


def train(setup, name, seed, lr, steps, checkpoints=()):
    """One run; returns per-step clean losses, test accuracy, and at the checkpoints a replica
    snapshot (θ), the allocator's state and its λ."""
    cfg = config(name, train__seed=seed, train__learning_rate=lr, train__steps=steps)
    replica = setup.replica(cfg)
    engine = Engine(cfg.train, LocalExecutor([replica]), setup.train, replica.d)
    losses, snapshots, states, lambdas = [], {}, {}, {}
    for t in range(steps + 1):
        if t in checkpoints:
            snapshots[t] = replica.snapshot_tensors()
            states[t], lambdas[t] = engine.allocator.state, engine.allocator.parameters()
        if t < steps:
            losses.append(engine.step(t).record.loss)
    return dict(loss=np.array(losses), accuracy=replica.score(setup.test, "accuracy"), snapshot=snapshots,
                allocator_state=states, lam=lambdas)


def show_lambda(lam):
    b0, b1, s, g = lam["beta0"], lam["beta1"], lam["s"], lam["gamma"]
    return f"β0 {b0:.2f} β1 {b1:.2f} s {s:.3f} γ {g:.2f} (β1/β0 {b1 / b0:.2f}, s/β0 {s / b0:.3f})"


def running_mean(x, w=WINDOW):
    c = np.cumsum(np.insert(x, 0, 0.0))
    return np.array([(c[t + 1] - c[max(0, t + 1 - w)]) / min(t + 1, w) for t in range(len(x))])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="train.seed = 0 .. seeds-1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--reps", type=int, default=16, help="repeats of each gradient estimate")
    parser.add_argument("--batches", type=int, default=6, help="fixed batches per checkpoint")
    parser.add_argument("--lrs", default="0.1,0.2", help="SGD learning rates; the first is the job's")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.reps, args.batches = 1, 4, 3, 2
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.checkpoints = (0, args.steps // 2, args.steps)
    return args


def train_all(setup, args, progress) -> dict:
    """(allocator, lr, seed) -> its run, every allocator at every rate and seed."""
    runs, lrs = {}, args.lrs
    for lr in lrs:
        for seed in range(args.seeds):
            for name in ALLOCATORS:
                # θ of uniform seed 0 is where gradients are measured; λ of flops seed 0 is measured there
                keep = args.checkpoints if lr == lrs[0] and (name == "flops" or name == "uniform" and seed == 0) else ()
                r = runs[name, lr, seed] = train(setup, name, seed, lr, args.steps, keep)
                progress(f"trained {name:12s} lr {lr} seed {seed}: loss {r['loss'][-WINDOW:].mean():.4f} "
                         f"acc {r['accuracy']:.3f}")
    return runs


def report_gradient_errors(setup, runs, args, budget, emit, progress) -> None:
    """Section 1: every allocator's gradient error at the uniform run's checkpoints, on fixed batches."""
    cfg, lr = config("uniform"), args.lrs[0]
    pick = np.random.default_rng(12345)
    batches = [pick.choice(len(setup.train), cfg.train.batch_size, replace=False) for _ in range(args.batches)]
    base = runs["uniform", lr, 0]
    replica = setup.replica(cfg)
    errors, oracle = {}, {}
    for t in args.checkpoints:
        replica.restore(base["snapshot"][t], t, [])
        oracle[t] = oracle_ratio(replica, setup.train, batches, budget, cfg.train.min_queries)
        for name in ALLOCATORS:
            state = runs["flops", lr, 0]["allocator_state"][t] if name == "flops" else None
            # flops is measured as flops-frozen (no optimizer: λ does not move) with its learned λ loaded
            measured = config("flops-frozen" if name == "flops" else name)
            errors[name, t] = gradient_errors(measured.train, replica, setup.train, batches, args.reps, state)
        progress(f"measured gradient errors at step {t}")

    emit(f"digits head fine-tuning, d = {replica.d}, B = {cfg.train.batch_size}, budget {budget} queries/step "
         f"for every allocator, {args.steps} steps, seeds 0..{args.seeds - 1}")
    emit()
    emit(f"1. Gradient estimate error, θ of the uniform lr {lr} seed-0 run; {args.batches} fixed batches "
         f"x {args.reps} repeats; ± jackknife over batches.")
    emit("   MSE, variance, bias²: divided by uniform's MSE. g-gain = gᵀE[ĝ]/‖g‖² (1: unbiased along g).")
    emit("   oracle = V(A*)/V(uniform) for the exact optimum on the true per-example c_j (analytic bound).")
    for t in args.checkpoints:
        unif = errors["uniform", t]
        emit(f"   after {t} steps: uniform MSE {unif[:, 0].mean():.3g} (theory {oracle[t][1]:.3g}), "
             f"‖g‖² {unif[:, 3].mean():.3g}, oracle {oracle[t][0]:.3f}")
        emit(f"   {'allocator':14s}{'MSE':>16s}{'variance':>16s}{'bias²':>16s}{'bias²/‖g‖²':>16s}{'g-gain':>16s}")
        for name in ALLOCATORS:
            e = errors[name, t]
            cells = [jackknife_ratio(e[:, k], unif[:, 0]) for k in range(3)]
            cells += [jackknife_ratio(e[:, 2], e[:, 3]), jackknife_ratio(e[:, 4], e[:, 3])]
            emit(f"   {name:14s}" + "".join(f"{m:>9.3f} ± {s:.3f}" for m, s in cells))
    emit("   flops λ of seed 0 (allocations depend only on β1/β0 and s/β0): " + "; ".join(
        f"step {t}: {show_lambda(runs['flops', lr, 0]['lam'][t])}" for t in args.checkpoints))
    emit()


def finals(runs, name, lr, seeds):
    """Per seed: the final train loss (mean of the last WINDOW steps) and the test accuracy."""
    return (np.array([runs[name, lr, s]["loss"][-WINDOW:].mean() for s in range(seeds)]),
            np.array([runs[name, lr, s]["accuracy"] for s in range(seeds)]))


def report_training(runs, args, emit) -> None:
    """Section 2: accuracy and final loss at the job's rate, and the paired difference to uniform."""
    lr, seeds = args.lrs[0], args.seeds
    emit(f"2. Training at lr {lr} (mean ± std over {seeds} seeds)")
    emit(f"   {'allocator':14s}{'test accuracy':>18s}{'train loss (last ' + str(WINDOW) + ')':>26s}"
         f"{'loss − uniform, paired':>26s}")
    for name in ALLOCATORS:
        loss, acc = finals(runs, name, lr, seeds)
        diff = loss - finals(runs, "uniform", lr, seeds)[0]  # same seed, same batches: a paired difference
        emit(f"   {name:14s}{acc.mean():>10.4f} ± {acc.std():.4f}{loss.mean():>16.4f} ± {loss.std():.4f}"
             f"{diff.mean():>+16.4f} ± {diff.std():.4f}")
    emit("   flops λ at the end, per seed: "
         + "; ".join(show_lambda(runs["flops", lr, s]["lam"][args.steps]) for s in range(seeds)))
    emit()


def report_learning_rates(runs, args, budget, emit) -> tuple[dict, float]:
    """Section 3: every allocator at every rate, and queries to uniform's final train loss. Returns
    the loss curves and that target."""
    lrs, seeds = args.lrs, args.seeds
    curves = {(name, lr): running_mean(np.mean([runs[name, lr, s]["loss"] for s in range(seeds)], 0))
              for name in ALLOCATORS for lr in lrs}
    target = curves["uniform", lrs[0]][-1]  # = uniform's final train loss, seed mean (steps ≥ WINDOW)

    def to_target(name, lr):
        hit = np.nonzero(curves[name, lr] <= target)[0]
        return (hit[0] + 1) * budget if len(hit) else None

    ref = to_target("uniform", lrs[0])
    emit(f"3. Learning rates {lrs}; queries to train loss {target:.4f} (uniform's final at lr {lrs[0]}) on the "
         f"{WINDOW}-step running mean of the seed-mean loss; ratio to uniform at lr {lrs[0]}")
    emit(f"   {'allocator':14s}{'lr':>6s}{'test accuracy':>18s}{'train loss':>18s}{'queries':>10s}{'ratio':>8s}")
    for name in ALLOCATORS:
        best = min(lrs, key=lambda lr: finals(runs, name, lr, seeds)[0].mean())
        for lr in lrs:
            loss, acc = finals(runs, name, lr, seeds)
            q = to_target(name, lr)
            mark = " (best lr)" if lr == best and len(lrs) > 1 else ""
            emit(f"   {name:14s}{lr:>6g}{acc.mean():>10.4f} ± {acc.std():.4f}{loss.mean():>10.4f} ± "
                 f"{loss.std():.4f}" + (f"{q:>10d}{q / ref:>8.2f}" if q else f"{'never':>10s}{'':>8s}") + mark)
    emit()
    return curves, target


def plot(curves, target, args, budget, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    queries = budget * np.arange(1, args.steps + 1)
    for i, name in enumerate(ALLOCATORS):
        for lr, style in zip(args.lrs, ("-", "--", ":", "-.")):
            ax.plot(queries, curves[name, lr], style, color=f"C{i}", label=f"{name}, lr {lr:g}")
    ax.axhline(target, color="gray", lw=0.5)
    ax.set(xlabel="queries", ylabel=f"train loss ({WINDOW}-step running mean, mean of {args.seeds} seeds)",
           yscale="log", title="digits head, forward-only, equal query budget")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    torch.set_num_threads(1)  # small ops on a shared machine: more threads are far slower
    report = Report()
    setup = Setup()
    cfg = config("uniform")
    budget = cfg.train.batch_size * cfg.train.queries_per_example
    out = fresh_dir("allocators_digits")
    report.progress(f"writing to {out}")
    runs = train_all(setup, args, report.progress)
    report_gradient_errors(setup, runs, args, budget, report.emit, report.progress)
    report_training(runs, args, report.emit)
    curves, target = report_learning_rates(runs, args, budget, report.emit)
    report.emit(f"runtime {time.perf_counter() - report.began:.0f} s")
    report.write(out / "allocators_digits.txt")
    plot(curves, target, args, budget, out / "allocators_digits.png")


if __name__ == "__main__":
    main()
