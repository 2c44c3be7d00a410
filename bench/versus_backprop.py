"""Every weight fine-tuned four ways, side by side: backprop, MeZO, flops_dist uniform, flops_dist flops.

    python bench/versus_backprop.py [--seeds 3] [--smoke]

Two tasks, every weight the target (target.include = ["all"]):
- digits: the main job's ViT (pretrained on digits 0-4, d = 18,154) on all ten digits; held-out:
  the 600 test digits.
- minilm: examples/minilm_finetune/all_weights.toml, the whole MiniLM (d = 22.6M) as a tweet
  sentiment classifier from its zero-shot start; held-out: the 400 test tweets.

Methods, each on one local Ray of 2 CPUs, with the same training set, batch size and batch order
(slice t of the engine's per-epoch permutation), plain SGD everywhere (the examples' optimizer):
- backprop: torch autograd in a Ray actor of its own, one torch thread (with two, a digits step
  took 4× longer on the shared 2-core machine), eval mode (no dropout), every weight trainable.
- MeZO: flops_dist with the antithetic estimator, Rademacher noise shared by the batch, one ±σu
  pair per step (2 queries per example), uniform.
- flops_dist uniform / flops: the task's own flops_dist settings with A₀ queries per example per
  step (A_min = 2), uniform or the learned FLOPS allocator. digits: the main job's `lr` estimator,
  independent pairing, A₀ = 8; minilm: the job's antithetic estimator, shared pairing, A₀ = 4
  (2 pairs). MeZO runs A₀/2 times as many steps, so the three forward-only methods spend the same
  queries. flops_dist runs 2 workers of one thread each (backprop has one core, they have two).
- steps: digits 200 (backprop, flops_dist) and 800 (MeZO); minilm 60 and 120.

Measured per run:
- peak memory per worker: VmHWM of the process that does the work: the backprop actor's, and the
  largest a flops_dist worker reports (TrainResult.peak_memory, as bench/memory.py reads it).
- wall-clock: seconds of training steps only (the run log's per-step seconds; backprop's timed
  steps), without start-up and held-out scoring.
- queries: a query is one example's forward at one perturbation (the run log's count; the clean
  forward at θ, one per example per step, is not counted). A backprop step on B examples counts 3B:
  a forward and a backward, which costs about two forwards.
- held-out accuracy EVALS times per run: flops_dist scores θ itself (output.score_every), and the
  scoring is not in the run log's step seconds; snapshots only at the start and the end.
- target, per task: start accuracy + TARGET_FRACTION × (backprop's mean final − start); the time
  and queries to it are those of the first scored point at or above it (no interpolation). 0.2,
  because on digits no forward-only run of the learning-rate grid came near half way.

Learning rates (SGD), each the best of a grid of about 3× steps on a separate seed (101):
- digits, by training loss over the run's last tenth (`--tune --tasks digits`): backprop 0.1
  (0.03 ties, 0.3 and 0.01 worse); MeZO 3e-4 (1e-4 slower, 9e-4 worse); flops_dist uniform 1e-3
  (3e-4 slower, 3e-3 worse, 3e-2 diverges); flops_dist flops 1e-3 (same grid).
- minilm, by validation loss and accuracy (the example's tune.py and backprop.py, steps as here):
  backprop 0.01 (0.03 is unstable by step 60, 0.1 collapses to chance); MeZO 1e-4 (3e-4 degrades
  the validation loss by step 120, 3e-5 is slower); flops_dist 2e-4 with A₀ = 4 (better than
  1e-4); σ = 1e-3 as the job has.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch

import flops_dist
from common import EXAMPLES, example_job, fresh_dir, wait_for_idle_cluster
from flops_dist.config import Config
from flops_dist.data import load_dataset
from flops_dist.engine import Engine
from flops_dist.loading import build_model, load_callable
from flops_dist.metrics import peak_rss_bytes

CPUS = 2
EVALS = 8              # held-out scores per run after the start
TARGET_FRACTION = 0.2  # of the way from the start accuracy to backprop's final
MB = 1024**2


@dataclass(frozen=True)
class Task:
    name: str
    example: str
    toml: str
    steps: int            # flops_dist steps at A₀ = qpe; MeZO runs qpe/2 times as many
    qpe: int              # flops_dist queries per example per step
    flops_dist: dict      # the task's flops_dist [train] settings
    backprop_steps: int
    lrs: dict             # method -> SGD learning rate
    mezo_chunk: int       # rows per shared-noise chunk for MeZO
    test_size: int = 0    # 0: the whole test split


TASKS = [
    Task("digits", "digits", "digits.toml", steps=200, qpe=8,
         flops_dist=dict(estimator="lr", pairing="independent", chunk_size=128), backprop_steps=200,
         lrs={"backprop": 0.1, "MeZO": 3e-4, "flops_dist uniform": 1e-3, "flops_dist flops": 1e-3},
         mezo_chunk=16),
    Task("minilm", "minilm_finetune", "all_weights.toml", steps=60, qpe=4,
         flops_dist=dict(estimator="antithetic", pairing="shared", chunk_size=16), backprop_steps=60,
         lrs={"backprop": 0.01, "MeZO": 1e-4, "flops_dist uniform": 2e-4, "flops_dist flops": 2e-4},
         mezo_chunk=16),
]
METHODS = ["backprop", "MeZO", "flops_dist uniform", "flops_dist flops"]


@dataclass
class Curve:
    """One run: held-out accuracy at cumulative training seconds and queries."""
    task: str
    method: str
    seed: int
    peak_bytes: int
    seconds: list = field(default_factory=list)
    queries: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)

    def add(self, seconds: float, queries: float, accuracy: float) -> None:
        self.seconds.append(float(seconds))
        self.queries.append(float(queries))
        self.accuracy.append(float(accuracy))

    def to_target(self, target: float):
        """(seconds, queries) at the first point after the start at or above the target, or None."""
        hit = next((i for i, a in enumerate(self.accuracy) if i and a >= target), None)
        return None if hit is None else (self.seconds[hit], self.queries[hit])


BEGAN = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - BEGAN:5.0f} s] {message}", file=sys.stderr, flush=True)


# --- configs

def run_steps(task: Task, method: str) -> int:
    if method == "backprop":
        return task.backprop_steps
    return task.steps * task.qpe // 2 if method == "MeZO" else task.steps


def method_train(task: Task, method: str) -> dict:
    """The [train] fields that make a flops_dist run one of the methods."""
    if method == "MeZO":
        return dict(estimator="antithetic", pairing="shared", noise="rademacher", queries_per_example=2,
                    min_queries=2, allocator="uniform", chunk_size=task.mezo_chunk)
    allocator = "flops" if method == "flops_dist flops" else "uniform"
    return dict(task.flops_dist, queries_per_example=task.qpe, min_queries=2, allocator=allocator)


def method_config(task: Task, method: str, seed: int, run_dir: Path, lr: float | None = None) -> Config:
    raw = example_job(task.example, task.toml)
    raw["target"]["include"] = ["all"]
    steps = run_steps(task, method)
    every = max(1, steps // EVALS)
    lr = task.lrs[method] if lr is None else lr
    raw["train"].update(method_train(task, method) if method != "backprop" else {},
                        seed=seed, steps=steps, learning_rate=lr, optimizer="sgd")
    raw["cluster"] = {"workers": 2, "min_workers": 2, "num_cpus": CPUS}
    raw["output"] = {"run_dir": str(run_dir), "log_every": every, "score_every": every, "snapshot_every": 10**6}
    raw["metrics"] = {"port": -1}
    return Config.from_dict(raw, EXAMPLES / task.example)


# --- held-out accuracy

@torch.no_grad()
def accuracy(model, test) -> float:
    """Argmax accuracy on the test set, 200 examples at a time."""
    correct = 0
    for batch in test.batches(200):
        out = model(torch.from_numpy(batch.inputs))
        correct += int((out.argmax(-1).numpy() == batch.labels).sum())
    return correct / len(test)


# --- the runs

def flops_dist_run(task: Task, method: str, seed: int, cfg: Config, setup: dict) -> tuple[Curve, list]:
    """A forward-only run through flops_dist.train, scored on the held-out set every log_every steps
    (output.score_every: the run log holds each score, and its seconds leave the scoring out).
    Returns the curve and the batch losses."""
    def progress(line: str) -> None:
        if line.startswith("step"):
            log(f"  {task.name} {method} seed {seed}: {line}")

    result = flops_dist.train(copy.deepcopy(setup["scorer"]), setup["loss_fn"], setup["train"], cfg,
                              test_data=setup["test"], progress=progress)
    run = result.run_log.to_pydict()
    seconds, queries = np.cumsum([0.0] + run["seconds"]), np.cumsum([0] + run["queries"])
    scores = {0: setup["start"], len(run["step"]): result.metric_after}  # the end's, where steps % every != 0
    scores.update({t + 1: m for t, m in zip(run["step"], run["test_metric"]) if not np.isnan(m)})
    curve = Curve(task.name, method, seed, max(result.peak_memory["workers"]))
    for step, acc in sorted(scores.items()):
        curve.add(seconds[step], queries[step], acc)
    return curve, run["loss"]


@ray.remote(num_cpus=1)
class Backprop:
    """Autograd fine-tuning in a process of its own, so its VmHWM is the run's alone. One torch
    thread: with two, a digits step took 4× longer on the shared 2-core machine (spinning threads)."""

    def run(self, cfg: Config, train, test, every: int) -> tuple[list, list, int]:
        torch.set_num_threads(1)
        model = build_model(cfg)
        loss_fn = load_callable(cfg.model.loss, "model.loss")
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.learning_rate)
        order = Engine(cfg.train, None, train, 1)  # the engine's batch order, so the batches are the same
        points, losses, elapsed = [(0.0, 0, accuracy(model, test))], [], 0.0
        for t in range(cfg.train.steps):
            rows = train.rows(order.batch(t))
            began = time.perf_counter()
            loss = loss_fn(model(torch.from_numpy(rows.inputs)), torch.from_numpy(rows.labels)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            elapsed += time.perf_counter() - began
            losses.append(loss.item())
            if (t + 1) % every == 0 or t + 1 == cfg.train.steps:  # forward + backward: 3 queries an example
                points.append((elapsed, 3 * len(rows) * (t + 1), accuracy(model, test)))
        return points, losses, peak_rss_bytes()


def backprop_run(task: Task, seed: int, cfg: Config, setup: dict) -> tuple[Curve, list]:
    actor = Backprop.remote()
    points, losses, peak = ray.get(actor.run.remote(cfg, setup["train"], setup["test"], cfg.output.log_every))
    ray.kill(actor)
    curve = Curve(task.name, "backprop", seed, peak)
    for point in points:
        curve.add(*point)
    log(f"  {task.name} backprop seed {seed}: held-out accuracy {curve.accuracy[-1]:.4f}")
    return curve, losses


def run_method(task: Task, method: str, seed: int, out: Path, setup: dict, lr=None) -> tuple[Curve, list]:
    wait_for_idle_cluster(CPUS)
    name = f"{task.name}-{method.replace(' ', '_')}-{seed}" + (f"-lr{lr:g}" if lr else "")
    tries = sum(1 for _ in out.glob(name + "*"))  # a run cut short by a lost Ray leaves its directory
    cfg = method_config(task, method, seed, out / (name + (f"-again{tries}" if tries else "")), lr)
    log(f"{task.name}: {method}, seed {seed}, lr {cfg.train.learning_rate:g}, {cfg.train.steps} steps")
    if method == "backprop":
        return backprop_run(task, seed, cfg, setup)
    return flops_dist_run(task, method, seed, cfg, setup)


def task_setup(task: Task) -> dict:
    """What every run of a task shares: data, loss, the scorer model and the start accuracy."""
    cfg = method_config(task, "backprop", 0, Path("unused"))
    d = cfg.data
    train = load_dataset(d.train, d.input_column, d.label_column)
    test = load_dataset(example_job(task.example, task.toml)["data"]["test"], d.input_column, d.label_column)
    if task.test_size:
        test = test.rows(np.arange(min(task.test_size, len(test))))
    scorer = build_model(cfg)
    return dict(train=train, test=test, scorer=scorer, start=accuracy(scorer, test),
                loss_fn=load_callable(cfg.model.loss, "model.loss"))


# --- the report

def target_accuracy(curves: list[Curve]) -> tuple[float, float, float]:
    """(start, backprop's mean final, target) of one task's curves."""
    start = curves[0].accuracy[0]
    final = statistics.mean(c.accuracy[-1] for c in curves if c.method == "backprop")
    return start, final, start + TARGET_FRACTION * (final - start)


def to_target_cell(curves: list[Curve], target: float, which: int, fmt: str) -> str:
    hits = [hit[which] for c in curves if (hit := c.to_target(target)) is not None]
    if not hits:
        return f"not reached (0/{len(curves)})"
    return f"{format(statistics.mean(hits), fmt)} ({len(hits)}/{len(curves)})"


def table_rows(task: Task, curves: list[Curve]) -> list[str]:
    _, _, target = target_accuracy(curves)
    rows = []
    for method in METHODS:
        mine = [c for c in curves if c.method == method]
        finals = [c.accuracy[-1] for c in mine]
        spread = f" ± {statistics.stdev(finals):.3f}" if len(finals) > 1 else ""
        rows.append(f"| {task.name} | {method} | {task.lrs[method]:g} | {run_steps(task, method)} | "
                    f"{statistics.mean(c.peak_bytes for c in mine) / MB:,.0f} | "
                    f"{to_target_cell(mine, target, 0, '.1f')} | {to_target_cell(mine, target, 1, ',.0f')} | "
                    f"{mine[0].queries[-1]:,.0f} | {statistics.mean(finals):.3f}{spread} |")
    return rows


def report(tasks: list[Task], curves: list[Curve]) -> None:
    lines = ["| task | method | SGD lr | steps | peak MB per worker | s to target | queries to target | "
             "queries in all | final held-out accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        mine = [c for c in curves if c.task == task.name]
        start, final, target = target_accuracy(mine)
        print(f"{task.name}: held-out accuracy at the start {start:.4f}, backprop's final {final:.4f}, "
              f"target {target:.4f} ({TARGET_FRACTION:g} of the way); {len({c.seed for c in mine})} seeds")
        lines += table_rows(task, mine)
    print("\n".join(lines))


def plot(tasks: list[Task], curves: list[Curve], path: Path) -> None:
    """Held-out accuracy against training seconds and against queries, per task; one thin line per
    seed, log x (so the start, at 0, is the dotted line with the target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    colours = dict(zip(METHODS, ("black", "tab:blue", "tab:orange", "tab:green")))
    for row, task in zip(axes, tasks):
        mine = [c for c in curves if c.task == task.name]
        start, _, target = target_accuracy(mine)
        for ax, x, label in zip(row, ("seconds", "queries"), ("training seconds", "queries")):
            for c in mine:
                ax.plot(getattr(c, x)[1:], c.accuracy[1:], color=colours[c.method], alpha=0.7,
                        marker=".", label=c.method if c.seed == mine[0].seed else None)
            ax.axhline(start, color="grey", linestyle=":", label="start")
            ax.axhline(target, color="red", linestyle="--", label="target")
            ax.set(xscale="log", xlabel=label, ylabel="held-out accuracy", title=f"{task.name}: every weight")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tune(task: Task, methods: list[str], out: Path, seed: int = 101) -> None:
    """Each method at its learning rate × 1/3, 1 and 3 on a separate seed; prints the mean training
    batch loss over the run's last tenth (a run that diverges prints nan or fails)."""
    setup = task_setup(task)
    for method in methods:
        for lr in (task.lrs[method] / 3, task.lrs[method], task.lrs[method] * 3):
            try:
                _, losses = run_method(task, method, seed, out, setup, lr)
                tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
            except Exception as e:  # a diverging run is stopped by the engine: that is a result here
                tail = f"failed: {type(e).__name__}"
            print(f"{task.name} {method} lr {lr:g}: final train loss {tail}", flush=True)


def run_all(tasks: list[Task], seeds: int, out: Path) -> list[Curve]:
    """Every task × seed × method, methods interleaved so drifts in machine load hit all alike.
    Each finished run is saved at once: a `ray stop` elsewhere on the machine kills this process
    (its Ray goes with it), and --resume then runs only what is missing."""
    saved = out / "curves.json"
    curves = [Curve(**c) for c in json.loads(saved.read_text())] if saved.exists() else []
    done = {(c.task, c.method, c.seed) for c in curves}
    for task in tasks:
        setup = None
        for seed in range(seeds):
            for method in [m for m in METHODS if (task.name, m, seed) not in done]:
                setup = setup or task_setup(task)
                curves.append(run_method(task, method, seed, out, setup)[0])
                saved.write_text(json.dumps([asdict(c) for c in curves], indent=1))
    return curves


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS], choices=[t.name for t in TASKS])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="for --tune")
    parser.add_argument("--tune", action="store_true", help="the learning-rate grid on seed 101 instead")
    parser.add_argument("--resume", metavar="DIR", help="continue a run whose Ray was killed: runs recorded in "
                        "DIR/curves.json are kept, the others run again")
    parser.add_argument("--smoke", action="store_true",
                        help="digits only, tiny runs, 1 seed: proves the bench still runs")
    args = parser.parse_args()
    tasks = [t for t in TASKS if t.name in args.tasks]
    if args.smoke:
        global EVALS
        EVALS, args.seeds = 2, 1  # digits only: each MiniLM run starts in ~15 s, too slow for CI
        tasks = [replace(t, steps=4, backprop_steps=4, test_size=64) for t in tasks if t.name == "digits"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = Path(args.resume) if args.resume else fresh_dir("versus_backprop")
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, logging_level="WARNING")
    if args.tune:
        for task in tasks:
            tune(task, args.methods, out)
        return
    curves = run_all(tasks, args.seeds, out)
    ray.shutdown()
    plot(tasks, curves, out / "versus_backprop.png")
    print(f"curves and plot in {out}")
    report(tasks, curves)


if __name__ == "__main__":
    main()
