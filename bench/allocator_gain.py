"""Where allocation matters: a strong checkpoint fine-tuned on real digits, where a minority of the
examples carries the gradient. flops against uniform, each at its own tuned learning rate, in weight
and in output space.

    python bench/allocator_gain.py [--seeds 5] [--steps 600] [--lrs 0.003,0.01,0.03,0.1] [--smoke]

The problem. The digits TinyViT (examples/digits/model.py) is trained by backprop on the digits 0-7
of the training split (about 97% held-out accuracy on those), then fine-tuned forward-only on all
ten: the Linear layers of its last transformer block and the head (d = 8,810). Digits 0-7 already
fit; 8 and 9 (a fifth of the examples) carry most of the gradient. That is the regime where the
FLOPS paper reports its gains: a strong model, a hard minority. B = 32, A₀ = 8 (256 queries a step),
A_min = 2, the lr estimator, Rademacher noise, SGD. Weight space: θ + σu with σ = 1e-3. Output
space: noise on each target Linear's outputs, σ = 1% of their RMS.

Method. Everything runs in this process on the reference engine (Engine + LocalExecutor + Replica,
bit-identical to the Ray path), one thread.
1. Learning rates: for each space and allocator, the rate of --lrs with the lowest training loss over
   the last quarter of a run with seed 100. That seed is used for nothing else.
2. Seeds 0 .. --seeds-1 at those rates. Every --every steps, the loss on the whole training set
   (1,197 digits) and on the held-out set (600) is recorded.
3. Targets, per space: uniform's seed-mean loss over its last 4 evaluations, on the training set and
   on the held-out set. Queries to a target: 256 × the first step whose seed-mean loss is at or below
   it. The ratio flops / uniform, and its 90% interval from resampling the seeds (both allocators
   resampled alike, targets recomputed).
4. Oracle bound B: at uniform seed 0's θ after 0, T/4, .., T steps, on 4 fixed batches,
   V(A*) / V(uniform) for the exact integer optimum A* on each example's c_j, measured as the
   estimator's own ĉ_j with 128 queries per example. It is the most any unbiased allocation could
   cut the variance there (mean over the checkpoints). Beside it, flops' measured gradient error
   E‖ĝ − g‖² (against backprop's g) over uniform's, at its own learned λ.

Last line: `flops / uniform queries to target: R (oracle bound B)`, R being the larger of the two
spaces' training-loss ratios and B the larger of their bounds. Writes allocator_gain.txt and
allocator_gain.png (loss against queries) to a new bench/out/allocator_gain-*. --smoke: 1 seed,
20 steps, one rate: proves it runs.
"""
import argparse
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

from common import Report, EXAMPLES, digits_config, fresh_dir, gradient_errors
from flops_dist.allocators import UniformAllocator, optimal_integer_allocation, variance_objective
from flops_dist.data import load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.loading import build_model, load_callable
from flops_dist.replica import Replica, ReplicaSpec

sys.path.insert(0, str(EXAMPLES / "digits"))
from prepare import pretrain  # noqa: E402  (the example's own backprop pretraining)

KNOWN_DIGITS = 8       # the checkpoint knows 0-7; 8 and 9 are the hard minority
LAST_BLOCK = [r"blocks\.1\.(attn\.(qkv|proj)|mlp\.[02])\.(weight|bias)", r"head\.(weight|bias)"]
SPACES = {"weights": dict(train__sigma=1e-3), "outputs": dict(train__sigma=1e-2, train__layer_sigma="rms")}
ALLOCATORS = ("uniform", "flops")
TUNING_SEED = 100
TAIL = 4               # evaluations averaged into a target
ORACLE_QUERIES = 128   # per example, to measure c_j


class Problem:
    """The checkpoint, the data and the loss, shared by every run."""

    def __init__(self, out):
        cfg = digits_config()
        self.train = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
        self.test = load_dataset(cfg.data.test, cfg.data.input_column, cfg.data.label_column)
        self.loss_fn = load_callable(cfg.model.loss, "model.loss")
        x, y = torch.from_numpy(self.train.inputs), torch.from_numpy(self.train.labels)
        known = y < KNOWN_DIGITS
        model = pretrain(x[known], y[known])
        self.weights = str(out / "digits_0-7.safetensors")
        save_file(model.state_dict(), self.weights)

    def config(self, space, allocator, lr=0.01, seed=0, steps=1, **train):
        train = dict(noise_space=space, allocator=allocator, learning_rate=lr, seed=seed, steps=steps,
                     queries_per_example=8, min_queries=2, chunk_size=256, hash_every=0) | train
        return digits_config(model__weights=self.weights, target__include=LAST_BLOCK, **SPACES[space],
                             **{f"train__{k}": v for k, v in train.items()})

    def replica(self, cfg) -> Replica:
        return Replica(build_model(cfg), self.loss_fn, self.train, ReplicaSpec.from_config(cfg, device="cpu"))

    def known_accuracy(self) -> tuple[float, float]:
        """Held-out accuracy of the checkpoint on the digits it knows, and on all ten."""
        replica = self.replica(self.config("weights", "uniform"))
        outputs = replica.forward.call(replica.theta, torch.from_numpy(self.test.inputs)).argmax(-1).numpy()
        right, known = outputs == self.test.labels, self.test.labels < KNOWN_DIGITS
        return right[known].mean(), right.mean()


def train(problem, cfg, every, checkpoints=()):
    """Training and held-out loss every `every` steps; θ and the allocator's state at the checkpoints."""
    replica = problem.replica(cfg)
    engine = Engine(cfg.train, LocalExecutor([replica]), problem.train, replica.d)
    curves, snapshots, states = [], {}, {}
    for t in range(cfg.train.steps + 1):
        if t in checkpoints:
            snapshots[t], states[t] = replica.snapshot_tensors(), engine.allocator.state
        if t % every == 0:
            curves.append((replica.score(problem.train, "loss"), replica.score(problem.test, "loss")))
        if t < cfg.train.steps:
            engine.step(t)
    return dict(curves=np.array(curves), snapshots=snapshots, states=states)


def queries_to(curve, target, every, budget):
    """Queries until the curve is first at or below the target (None: never)."""
    hit = np.flatnonzero(curve <= target)
    return int(hit[0]) * every * budget if len(hit) else None


def gain(curves, every, budget):
    """Per loss (0 train, 1 held-out): uniform's target, queries of each allocator, and the ratio,
    from seed-mean curves. curves[allocator] is [seeds, evaluations, 2]."""
    out = []
    for k in range(2):
        mean = {a: curves[a][:, :, k].mean(0) for a in ALLOCATORS}
        target = mean["uniform"][-TAIL:].mean()
        q = {a: queries_to(mean[a], target, every, budget) for a in ALLOCATORS}
        if not q["uniform"]:  # uniform at its target from the start: no ratio
            ratio = float("nan")
        else:
            ratio = float("inf") if q["flops"] is None else q["flops"] / q["uniform"]
        out.append((target, q, ratio))
    return out


def seed_interval(curves, every, budget, draws=2000):
    """90% interval of each loss's ratio over resampled seeds (flops never at the target: ∞)."""
    rng, seeds = np.random.default_rng(0), len(curves["uniform"])
    ratios = []
    for _ in range(draws):
        pick = rng.integers(0, seeds, seeds)
        ratios.append([r for _, _, r in gain({a: c[pick] for a, c in curves.items()}, every, budget)])
    return np.quantile(np.array(ratios), [0.05, 0.95], axis=0).T


class CHatRecorder(UniformAllocator):
    """Uniform allocation that keeps the ĉ_j its learn() is told."""

    def learn(self, ask, c_hat, shared_scores=None):
        self.c_hat = np.asarray(c_hat, np.float64)


def oracle_bound(problem, space, snapshot, t, batches, reps):
    """V(A*) / V(uniform) at θ, summed over the batches, on c_j measured as the mean ĉ_j of `reps`
    uniform steps of ORACLE_QUERIES queries per example."""
    cfg = problem.config(space, "uniform", queries_per_example=ORACLE_QUERIES)
    replica = problem.replica(cfg)
    replica.restore(snapshot, t, [])
    engine = Engine(cfg.train, LocalExecutor([replica]), problem.train, replica.d)
    engine.allocator = recorder = CHatRecorder()
    v_best = v_uniform = 0.0
    budget, a_min = len(batches[0]) * 8, 2  # the runs' budget, not the measurement's
    for b, batch in enumerate(batches):
        c_hats = []
        for r in range(reps):
            engine.step(b * reps + r, batch=batch)
            c_hats.append(recorder.c_hat)
        c = np.mean(c_hats, axis=0)
        v_best += variance_objective(c, optimal_integer_allocation(c, budget, a_min))
        v_uniform += variance_objective(c, np.full(len(c), budget // len(c)))
    return v_best / v_uniform


def measured_ratio(problem, space, snapshot, t, state, batches, reps):
    """flops' gradient error over uniform's at θ, flops at its learned λ (learning switched off)."""
    errors = {}
    for allocator in ALLOCATORS:
        cfg = problem.config(space, allocator, allocator_learning_rate=0.0)
        replica = problem.replica(cfg)
        replica.restore(snapshot, t, [])
        errors[allocator] = gradient_errors(cfg.train, replica, problem.train, batches, reps,
                                            state if allocator == "flops" else None)[:, 0].sum()
    return errors["flops"] / errors["uniform"]


def plot(path, results, budget, every):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, (space, r) in enumerate(results.items()):
        for col, name in enumerate(("training loss", "held-out loss")):
            ax = axes[row, col]
            for allocator in ALLOCATORS:
                c = r["curves"][allocator][:, :, col]
                queries = np.arange(c.shape[1]) * every * budget
                ax.plot(queries, c.mean(0), label=f"{allocator}, lr {r['lrs'][allocator]:g}")
                ax.fill_between(queries, c.min(0), c.max(0), alpha=0.15)
            ax.axhline(r["gains"][col][0], color="gray", lw=0.7, ls="--", label="target")
            ax.set(title=f"{space} space: {name}", yscale="log", ylabel=f"{name} (mean, min-max of seeds)")
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("queries")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class Sizes:
    """How much each part measures (--smoke makes every part tiny)."""

    def __init__(self, args):
        self.seeds, self.steps, self.every = args.seeds, args.steps, args.every
        self.grid = [float(x) for x in args.lrs.split(",")]
        self.oracle_batches, self.oracle_reps, self.error_reps = (1, 1, 2) if args.smoke else (4, 4, 8)
        self.checkpoints = sorted({round(self.steps * k / 4) for k in range(5)})


def tune_rate(problem, space, allocator, sizes, progress):
    """The grid's rate with the lowest training loss over the last quarter of a tuning-seed run."""
    tail = {}
    for lr in sizes.grid:
        curves = train(problem, problem.config(space, allocator, lr, TUNING_SEED, sizes.steps), sizes.every)["curves"]
        tail[lr] = curves[-(len(curves) // 4 or 1):, 0].mean()
    progress(f"{space} {allocator}: tuning-seed loss " + ", ".join(f"lr {lr:g} {v:.4f}" for lr, v in tail.items()))
    return min(sizes.grid, key=tail.get), tail


def measure_space(problem, space, sizes, budget, batches, progress) -> dict:
    """Tuned rates, every seed's curves, the gains, and the oracle bound and flops' measured error
    at uniform seed 0's checkpoints, for one noise space."""
    tuned = {a: tune_rate(problem, space, a, sizes, progress) for a in ALLOCATORS}
    runs = {(a, s): train(problem, problem.config(space, a, tuned[a][0], s, sizes.steps), sizes.every,
                          sizes.checkpoints if s == 0 else ())
            for a in ALLOCATORS for s in range(sizes.seeds)}
    curves = {a: np.stack([runs[a, s]["curves"] for s in range(sizes.seeds)]) for a in ALLOCATORS}
    uniform0, flops0 = runs["uniform", 0], runs["flops", 0]
    bounds = [oracle_bound(problem, space, uniform0["snapshots"][t], t, batches, sizes.oracle_reps)
              for t in sizes.checkpoints]
    measured = [measured_ratio(problem, space, uniform0["snapshots"][t], t, flops0["states"][t], batches,
                               sizes.error_reps) for t in sizes.checkpoints]
    progress(f"{space}: seeds trained, oracle {np.round(bounds, 3)}, flops measured {np.round(measured, 3)}")
    return dict(lrs={a: tuned[a][0] for a in ALLOCATORS}, tuning={a: tuned[a][1] for a in ALLOCATORS},
                curves=curves, gains=gain(curves, sizes.every, budget), bounds=bounds, measured=measured)


def report_tables(emit, problem, results, sizes, budget) -> None:
    known, every_digit = problem.known_accuracy()
    d = problem.replica(problem.config("weights", "uniform")).d
    emit(f"digits TinyViT trained by backprop on digits 0-{KNOWN_DIGITS - 1} (held-out accuracy {known:.3f} on "
         f"those, {every_digit:.3f} on all ten); its last block's Linear layers and head (d = {d:,}) "
         f"fine-tuned forward-only on all ten")
    emit(f"B = 32, A0 = 8 ({budget} queries/step), A_min = 2, lr estimator, {sizes.steps} steps, seeds "
         f"0..{sizes.seeds - 1}; learning rates from {sizes.grid} picked on seed {TUNING_SEED}; losses on the "
         f"whole training set (1,197) and held-out set (600) every {sizes.every} steps")
    emit()
    emit(f"{'space':8s}{'allocator':10s}{'lr':>7s}{'final train':>13s}{'final held-out':>16s}"
         f"{'q to train':>12s}{'q to held-out':>15s}")
    for space, r in results.items():
        for allocator in ALLOCATORS:
            c, q = r["curves"][allocator], [g[1][allocator] for g in r["gains"]]
            emit(f"{space:8s}{allocator:10s}{r['lrs'][allocator]:>7g}{c[:, -TAIL:, 0].mean():>13.4f}"
                 f"{c[:, -TAIL:, 1].mean():>16.4f}" + "".join(f"{v if v is not None else 'never':>{w}}"
                                                             for v, w in zip(q, (12, 15))))
    emit()
    emit("flops / uniform queries to uniform's final loss (seed-mean curves; 90% interval over resampled seeds);")
    emit("oracle bound: V(A*)/V(uniform) on measured c_j at uniform's θ, mean over checkpoints; flops measured:")
    emit("its gradient error over uniform's at the same θ and batches")
    emit(f"{'space':8s}{'train target':>14s}{'ratio':>8s}{'interval':>16s}{'held-out target':>17s}{'ratio':>8s}"
         f"{'interval':>16s}{'oracle':>8s}{'flops measured':>16s}")
    for space, r in results.items():
        (t_train, _, r_train), (t_test, _, r_test) = r["gains"]
        (lo_train, hi_train), (lo_test, hi_test) = seed_interval(r["curves"], sizes.every, budget)
        emit(f"{space:8s}{t_train:>14.4f}{r_train:>8.2f}{f'{lo_train:.2f}-{hi_train:.2f}':>16s}{t_test:>17.4f}"
             f"{r_test:>8.2f}{f'{lo_test:.2f}-{hi_test:.2f}':>16s}{np.mean(r['bounds']):>8.3f}"
             f"{np.mean(r['measured']):>16.3f}")
    emit(f"per checkpoint {sizes.checkpoints}: " + "; ".join(
        f"{space} oracle {' '.join(f'{v:.2f}' for v in r['bounds'])}, flops measured "
        f"{' '.join(f'{v:.2f}' for v in r['measured'])}" for space, r in results.items()))
    emit("tuning seed, training loss over the last quarter: " + "; ".join(
        f"{space} {a}: " + " ".join(f"{lr:g}→{v:.4f}" for lr, v in r["tuning"][a].items())
        for space, r in results.items() for a in ALLOCATORS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=25, help="steps between loss evaluations")
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1", help="SGD learning rates tried per method")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.every, args.lrs = 1, 20, 5, "0.01"
    sizes = Sizes(args)
    torch.set_num_threads(1)  # small ops on a shared machine: more threads are slower
    out = fresh_dir("allocator_gain")
    report = Report()
    report.progress(f"writing to {out}")
    problem = Problem(out)
    budget = problem.config("weights", "uniform").train.batch_size * 8
    pick = np.random.default_rng(12345)
    batches = [pick.choice(len(problem.train), 32, replace=False) for _ in range(sizes.oracle_batches)]
    results = {space: measure_space(problem, space, sizes, budget, batches, report.progress) for space in SPACES}
    report_tables(report.emit, problem, results, sizes, budget)
    report.emit(f"runtime {time.perf_counter() - report.began:.0f} s")
    plot(out / "allocator_gain.png", results, budget, sizes.every)
    ratio = np.nanmax([r["gains"][0][2] for r in results.values()])
    bound = max(np.mean(r["bounds"]) for r in results.values())
    report.emit(f"flops / uniform queries to target: {ratio:.2f} (oracle bound {bound:.2f})")
    report.write(out / "allocator_gain.txt")


if __name__ == "__main__":
    main()
