"""The main job's query budget: loss per second of training at 32, 128 and 256 queries per example.

    python bench/main_job_budget.py [--seeds 2] [--steps 600] [--smoke]

With frozen-prefix reuse a query runs only the head (a few µs) while a step has ~10 ms of fixed
work (the clean forward of the body, two Ray round trips, the allocator), so a larger budget per
step costs little time and lowers the variance of every step. This bench is what chose the main
job's budget (examples/digits/digits.toml): each setting below runs the whole job (600 steps, flops
allocation, 2 workers), seeds interleaved. Reported per setting, as medians over seeds: the
held-out accuracy after, the training loss over the last 100 steps, Σ step seconds, and the
training loss (mean of 50 steps) at the moment the job's former setting (32 queries, lr 0.1)
finished, so settings compare at equal time as well as at equal steps.
"""
import argparse

import numpy as np
import ray

import flops_dist
from common import Report, digits_config, fresh_dir, wait_for_idle_cluster
from flops_dist.loading import build_model, load_callable

SETTINGS = [(32, 512, 0.1), (32, 512, 0.3), (128, 2048, 0.3), (256, 2048, 0.3)]  # (A₀, chunk, lr); first: the former job
WINDOW = 50


def train(qpe: int, chunk: int, lr: float, seed: int, steps: int, run_dir) -> dict:
    cfg = digits_config(train__queries_per_example=qpe, train__chunk_size=chunk, train__learning_rate=lr,
                        train__seed=seed, train__steps=steps, output__run_dir=str(run_dir),
                        output__log_every=10**6, metrics__port=-1)
    result = flops_dist.train(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), cfg.data.train, cfg,
                              test_data=cfg.data.test, progress=lambda line: None)
    log = result.run_log.to_pydict()
    return {"accuracy": result.metric_after, "loss": np.array(log["loss"]), "elapsed": np.cumsum(log["seconds"])}


def loss_at(run: dict, seconds: float) -> float:
    """The mean training loss of the WINDOW steps that end when `seconds` of steps have passed (the
    last WINDOW, for a run that ended sooner)."""
    window = min(WINDOW, len(run["loss"]))
    smooth = np.convolve(run["loss"], np.ones(window) / window, mode="valid")
    i = np.searchsorted(run["elapsed"][window - 1:], seconds)
    return float(smooth[min(i, len(smooth) - 1)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--smoke", action="store_true", help="one seed, 12 steps, the first two settings")
    args = ap.parse_args()
    seeds, steps = (1, 12) if args.smoke else (args.seeds, args.steps)
    settings = SETTINGS[:2] if args.smoke else SETTINGS
    out, report = fresh_dir("main_job_budget"), Report()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    runs = {s: [] for s in settings}
    for seed in range(seeds):
        for qpe, chunk, lr in settings:
            report.progress(f"seed {seed}: {qpe} queries per example, lr {lr}")
            wait_for_idle_cluster(2)  # the last run's workers are gone: each run has both CPUs
            runs[(qpe, chunk, lr)].append(train(qpe, chunk, lr, seed, steps, out / f"{qpe}-{lr}-{seed}"))
    ray.shutdown()
    former = [r["elapsed"][-1] for r in runs[SETTINGS[0]]]
    report.emit(f"digits head, B = 32, {steps} steps, 2 workers, medians over {seeds} seeds; "
                f"'loss at equal time': when the former job (32 queries, lr 0.1) ended, {np.median(former):.1f} s")
    report.emit(f"{'A₀':>4} {'lr':>5} {'accuracy':>9} {'loss, last 100':>15} {'step seconds':>13} {'loss at equal time':>19}")
    for (qpe, chunk, lr), rs in runs.items():
        equal = np.median([loss_at(r, t) for r, t in zip(rs, former)])
        report.emit(f"{qpe:>4} {lr:>5} {np.median([r['accuracy'] for r in rs]):>9.4f} "
                    f"{np.median([r['loss'][-100:].mean() for r in rs]):>15.4f} "
                    f"{np.median([r['elapsed'][-1] for r in rs]):>13.1f} {equal:>19.4f}")
    report.write(out / "main_job_budget.txt")


if __name__ == "__main__":
    main()
