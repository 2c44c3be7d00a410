"""The black-box applications side by side: allocators × estimators at an equal query budget.

    python bench/blackbox_apps.py [--apps alignment,prompt] [--seeds 3] [--alignment-steps 300]
                                  [--prompt-steps 80] [--smoke]

Applications (their examples' configs, with a smaller budget so that the allocators have work):
- alignment: examples/digits_alignment; W (384 × 16) learned forward-only; metric: retrieval
  accuracy on the 600 held-out digits. B = 32, A₀ = 4.
- prompt: examples/sentiment_prompt, the 32-d prompt code; metric: accuracy on 200 of the 400
  held-out balanced airline tweets (its test split). B = 8, A₀ = 4 (every query is a MiniLM
  forward, the costly case).
Every configuration spends exactly N = B·A₀ perturbed queries a step (neyman's pilot included; the
clean forward at θ, which lr uses as its baseline and every allocator uses for its features, is
the same for all and not counted). Allocators: uniform, bernoulli, neyman, flops; estimators: lr
(clean-loss baseline) and antithetic (±σu pairs; A_min = one pair).

Runs use the reference engine in this process (Engine + LocalExecutor + one Replica with the real
frozen MiniLM), which the tests prove bit-identical to the Ray path. Seeds change the batches, the
query seeds and the allocators' draws; the data, the frozen models and the initial target are fixed.

Reports, per application and for both held-out accuracy and held-out loss (the cross-entropy,
less noisy than accuracy on a small test set): the final value, mean ± std over seeds; the queries
needed to reach a target value, read off the seed-mean curve (evaluated every 2 steps for
alignment, every 10 for prompt), as a ratio against uniform with the lr estimator. The target is
fixed by a rule set before any run: 90% of the way from the start to uniform/lr's final seed-mean
value (so uniform/lr always reaches it). Per-seed ratios are printed too. Saves, in a new
directory bench/out/blackbox_apps-*, blackbox_apps.txt, blackbox_apps_curves.png (metric against
queries spent) and blackbox_apps_allocations.png (allocation histograms).
--smoke: 2 seeds, 4 alignment steps and 1 prompt step, 16 held-out examples; the examples' data is
prepared under bench/out if missing.
"""
import argparse
import time

import numpy as np
import torch

from common import APPS, Application, fresh_dir
from flops_dist.loading import build_model
from flops_dist.engine import Engine, LocalExecutor

ALLOCATORS = ("uniform", "bernoulli", "neyman", "flops")
ESTIMATORS = ("lr", "antithetic")


def run(app: Application, allocator: str, estimator: str, seed: int, steps: int) -> dict:
    """One training run: held-out accuracy and loss against queries spent, and every allocation."""
    cfg = app.config(allocator, estimator=estimator, seed=seed)
    t = cfg.train
    replica = app.replica(cfg)
    engine = Engine(t, LocalExecutor([replica]), app.train, replica.d)
    spent, queries, allocations = 0, [0], []
    scores = [evaluate(app, replica)]
    for step in range(steps):
        out = engine.step(step)
        spent += out.record.queries
        allocations.append(out.allocation * t.unit)  # in queries, for both estimators
        if (step + 1) % app.app["eval_every"] == 0 or step + 1 == steps:
            queries.append(spent)
            scores.append(evaluate(app, replica))
    accuracy, loss = np.array(scores).T
    return dict(queries=np.array(queries), metric=accuracy, loss=loss, allocations=np.concatenate(allocations))


@torch.no_grad()
def evaluate(app: Application, replica, chunk: int = 100) -> tuple[float, float]:
    """Held-out accuracy and mean loss from one pass (both losses are the cross-entropy of scores)."""
    correct = total = 0.0
    for start in range(0, len(app.test), chunk):
        x = replica.inputs.new_tensor(app.test.inputs[start:start + chunk])
        y = replica.labels.new_tensor(app.test.labels[start:start + chunk])
        logits = replica.forward.scores(replica.forward.call(replica.theta, x), x)
        correct += float((logits.argmax(-1) == y).sum())
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return correct / len(app.test), total / len(app.test)


def queries_to(curve_q: np.ndarray, curve_m: np.ndarray, target: float, lower: bool = False) -> float:
    """Queries at the first evaluation whose metric reaches the target (inf if none does)."""
    hit = np.flatnonzero(curve_m <= target if lower else curve_m >= target)
    return float(curve_q[hit[0]]) if len(hit) else float("inf")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="alignment,prompt")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alignment-steps", type=int, default=APPS["alignment"]["steps"])
    parser.add_argument("--prompt-steps", type=int, default=APPS["prompt"]["steps"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    test_size = None
    if args.smoke:
        args.seeds, args.alignment_steps, args.prompt_steps, test_size = 2, 4, 1, 16
    torch.set_num_threads(1)
    out = fresh_dir("blackbox_apps")
    lines, results = [], {}
    for name in args.apps.split(","):
        app = Application(name, test_size)
        steps = getattr(args, f"{name}_steps")
        t = app.cfg.train
        d = sum(p.numel() for p in build_model(app.cfg).parameters())
        head = (f"== {name}: d = {d}"
                f", B = {t.batch_size}, A₀ = {t.queries_per_example} (N = {t.batch_size * t.queries_per_example} "
                f"queries/step), {steps} steps, σ = {t.sigma}, lr = {t.learning_rate}, {args.seeds} seeds")
        print(head, flush=True)
        lines.append(head)
        results[name] = {}
        for estimator in ESTIMATORS:
            for allocator in ALLOCATORS:
                began = time.perf_counter()
                runs = [run(app, allocator, estimator, seed, steps) for seed in range(args.seeds)]
                results[name][(allocator, estimator)] = runs
                print(f"   {allocator}/{estimator}: {time.perf_counter() - began:.0f}s", flush=True)
        table = report(results[name], "metric") + report(results[name], "loss")
        lines += table
        print("\n".join(table), flush=True)
    (out / "blackbox_apps.txt").write_text("\n".join(lines) + "\n")
    plot(results, out)
    print(f"wrote {out / 'blackbox_apps.txt'}, blackbox_apps_curves.png, blackbox_apps_allocations.png")


def target_for(runs: dict, key: str) -> float:
    """The rule: 90% of the way from the start to uniform/lr's final seed-mean value."""
    base = np.mean([r[key] for r in runs[("uniform", "lr")]], 0)
    return round(float(base[0] + 0.9 * (base[-1] - base[0])), 4)


def report(runs: dict, key: str) -> list[str]:
    lower = key == "loss"
    target = target_for(runs, key)
    base = runs[("uniform", "lr")]
    base_q = queries_to(base[0]["queries"], np.mean([r[key] for r in base], 0), target, lower)
    per_seed_base = [queries_to(r["queries"], r[key], target, lower) for r in base]
    label = f"queries to {'≤' if lower else '≥'} {target}"
    out = [f"held-out {'loss' if lower else 'accuracy'}:",
           f"{'allocator/estimator':<22} {'start':>6} {'final (mean ± std)':>20} {label:>18} "
           f"{'÷ uniform/lr':>13} {'per-seed ÷':>18}"]
    for (allocator, estimator), rs in runs.items():
        finals = np.array([r[key][-1] for r in rs])
        q = queries_to(rs[0]["queries"], np.mean([r[key] for r in rs], 0), target, lower)
        # a base of 0 queries means uniform/lr made no progress: the target held at the start
        per_seed = [queries_to(r["queries"], r[key], target, lower) / b if b > 0 else float("nan")
                    for r, b in zip(rs, per_seed_base)]
        ratio = q / base_q if np.isfinite(q) and np.isfinite(base_q) and base_q > 0 else float("nan")
        out.append(f"{allocator + '/' + estimator:<22} {rs[0][key][0]:6.3f} "
                   f"{finals.mean():12.3f} ± {finals.std(ddof=1):.3f} "
                   f"{q:18,.0f} {ratio:13.2f} {' '.join(f'{p:.2f}' for p in per_seed):>18}")
    return out


def plot(results: dict, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items()):
        for (allocator, estimator), rs in runs.items():
            m = np.array([r["metric"] for r in rs])
            style = "-" if estimator == "lr" else "--"
            line, = ax.plot(rs[0]["queries"], m.mean(0), style, label=f"{allocator}/{estimator}")
            ax.fill_between(rs[0]["queries"], m.min(0), m.max(0), color=line.get_color(), alpha=0.08)
        ax.axhline(target_for(runs, "metric"), color="grey", lw=0.8, ls=":")
        ax.set(title=f"{name}: held-out accuracy (mean of seeds, band = min..max)", xlabel="queries spent",
               ylabel="accuracy")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "blackbox_apps_curves.png", dpi=120)

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items()):
        top = max(int(runs[(a, "lr")][0]["allocations"].max()) for a in ALLOCATORS)
        bins = np.arange(0, top + 2) - 0.5
        for allocator in ALLOCATORS:
            ax.hist(runs[(allocator, "lr")][0]["allocations"], bins=bins, histtype="step", lw=1.5,
                    label=allocator, density=True)
        ax.set(title=f"{name}: queries per example (lr, seed 0, all steps)", xlabel="queries", ylabel="share")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "blackbox_apps_allocations.png", dpi=120)


if __name__ == "__main__":
    main()
