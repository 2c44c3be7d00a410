"""The black-box applications side by side: allocators × estimators at an equal query budget.

    python bench/blackbox_apps.py [--apps alignment,prompt] [--seeds 3] [--alignment-steps 300]
                                  [--prompt-steps 80]

Applications (their examples' configs, with a smaller budget so that the allocators have work):
- alignment: examples/digits_alignment; W (384 × 16) learned forward-only; metric: retrieval
  accuracy on the 600 held-out digits. B = 32, A₀ = 4.
- prompt: examples/sentiment_prompt, the 32-d prompt code; metric: accuracy on 200 of the
  held-out balanced tweets. B = 8, A₀ = 4 (every query is a MiniLM forward, the costly case).
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
value (so uniform/lr always reaches it). Per-seed ratios are printed too. Saves
bench/out/blackbox_apps.txt, blackbox_apps_curves.png (metric against queries spent) and
blackbox_apps_allocations.png (allocation histograms).
"""
import argparse
import copy
import subprocess
import sys
import time
import tomllib

import numpy as np
import torch

from common import OUT, ROOT
from flops_dist.api import build_model, load_callable
from flops_dist.config import Config
from flops_dist.data import ArrayDataset, load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec

APPS = {
    "alignment": dict(example="digits_alignment", toml="alignment.toml", data_file="align_train.parquet",
                      train=dict(batch_size=32, queries_per_example=4, min_queries=2, chunk_size=64),
                      steps=300, eval_every=2, test_size=600),
    "prompt": dict(example="sentiment_prompt", toml="prompt_code.toml", data_file="tweets_train.parquet",
                   train=dict(batch_size=8, queries_per_example=4, min_queries=2, chunk_size=16),
                   steps=80, eval_every=10, test_size=200),
}
ALLOCATORS = ("uniform", "bernoulli", "neyman", "flops")
ESTIMATORS = ("lr", "antithetic")


def prepared(app: dict):
    """The example's data under bench/out (made once), and its config with the bench budget."""
    example = ROOT / "examples" / app["example"]
    data = OUT / app["example"]
    if not (data / app["data_file"]).exists():
        subprocess.run([sys.executable, str(example / "prepare.py"), str(data)], check=True)
    raw = tomllib.loads((example / app["toml"]).read_text())
    for split in ("train", "test"):
        raw["data"][split] = str(data / (raw["data"][split].split("/")[-1]))
    raw["train"].update(app["train"], hash_every=0)
    return Config.from_dict(raw, example)


class Application:
    def __init__(self, name: str):
        self.name, self.app = name, APPS[name]
        self.cfg = prepared(self.app)
        d = self.cfg.data
        self.loss_fn = load_callable(self.cfg.model.loss, "model.loss")
        self.loss_fn.ensure_loaded(torch.device("cpu"))  # one frozen model for every run here
        self.train = load_dataset(d.train, d.input_column, d.label_column)
        test = load_dataset(d.test, d.input_column, d.label_column)
        n = self.app["test_size"]
        self.test = ArrayDataset(test.inputs[:n], test.labels[:n])

    def config(self, allocator: str, **train) -> Config:
        """The application's config with another allocator and `train` fields."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.allocator = allocator
        for name, value in train.items():
            setattr(cfg.train, name, value)
        return cfg.validate()

    def replica(self, cfg: Config) -> Replica:
        t = cfg.train
        spec = ReplicaSpec(include=cfg.target.include, sigma=t.sigma, noise=t.noise,
                           optimizer=t.optimizer_config(), threads=1, device="cpu")
        return Replica(build_model(cfg), self.loss_fn, self.train, spec)

    def run(self, allocator: str, estimator: str, seed: int, steps: int) -> dict:
        cfg = self.config(allocator, estimator=estimator, seed=seed)
        t = cfg.train
        replica = self.replica(cfg)
        engine = Engine(t, LocalExecutor([replica]), len(self.train), replica.d)
        spent, queries, allocations = 0, [0], []
        scores = [self.evaluate(replica)]
        for step in range(steps):
            out = engine.step(step)
            spent += out.record["queries"]
            allocations.append(out.allocation * t.unit)  # in queries, for both estimators
            if (step + 1) % self.app["eval_every"] == 0 or step + 1 == steps:
                queries.append(spent)
                scores.append(self.evaluate(replica))
        accuracy, loss = np.array(scores).T
        return dict(queries=np.array(queries), metric=accuracy, loss=loss, allocations=np.concatenate(allocations))

    @torch.no_grad()
    def evaluate(self, replica, chunk: int = 100) -> tuple[float, float]:
        """Held-out accuracy and mean loss from one pass (both losses are the cross-entropy of scores)."""
        correct = total = 0.0
        for start in range(0, len(self.test), chunk):
            x = replica.inputs.new_tensor(self.test.inputs[start:start + chunk])
            y = replica.labels.new_tensor(self.test.labels[start:start + chunk])
            logits = replica.forward.scores(replica.forward.call(replica.theta, x), x)
            correct += float((logits.argmax(-1) == y).sum())
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        return correct / len(self.test), total / len(self.test)


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
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    lines, results = [], {}
    for name in args.apps.split(","):
        app = Application(name)
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
                runs = [app.run(allocator, estimator, seed, steps) for seed in range(args.seeds)]
                results[name][(allocator, estimator)] = runs
                print(f"   {allocator}/{estimator}: {time.perf_counter() - began:.0f}s", flush=True)
        table = report(results[name], "metric") + report(results[name], "loss")
        lines += table
        print("\n".join(table), flush=True)
    (OUT / "blackbox_apps.txt").write_text("\n".join(lines) + "\n")
    plot(results)
    print(f"wrote {OUT / 'blackbox_apps.txt'}, blackbox_apps_curves.png, blackbox_apps_allocations.png")


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
        per_seed = [queries_to(r["queries"], r[key], target, lower) / b for r, b in zip(rs, per_seed_base)]
        ratio = q / base_q if np.isfinite(q) and np.isfinite(base_q) else float("nan")
        out.append(f"{allocator + '/' + estimator:<22} {rs[0][key][0]:6.3f} "
                   f"{finals.mean():12.3f} ± {finals.std(ddof=1):.3f} "
                   f"{q:18,.0f} {ratio:13.2f} {' '.join(f'{p:.2f}' for p in per_seed):>18}")
    return out


def plot(results: dict) -> None:
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
    fig.savefig(OUT / "blackbox_apps_curves.png", dpi=120)

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
    fig.savefig(OUT / "blackbox_apps_allocations.png", dpi=120)


if __name__ == "__main__":
    main()
