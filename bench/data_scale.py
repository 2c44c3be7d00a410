"""Data beyond one worker's memory: the digits main job on its training set copied 1× and 100×.

    python bench/data_scale.py [--steps 200] [--rounds 2] [--copies 100] [--smoke]

Each copy is a Parquet part on disk (row groups of 64 rows: a step reads the row groups that hold
its batch, so small groups keep a random batch cheap). The coordinator reads a step's rows and sends
them with the clean forward, so a worker holds a batch, never the dataset. The two sizes run in
turn, `rounds` times, in one Ray instance; the figures are medians over rounds. Printed per size:
the workers' and the coordinator's peak resident memory, and steps per second (1 / the median step
time in the run log). The last line is read by a program:

    worker memory growth 1x -> 100x data: G, step rate ratio: S
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

import flops_dist
from flops_dist.loading import build_model, load_callable

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


def prepared_digits(work: Path) -> Path:
    """The digits example's data, prepared in `work` (never in the user's examples/ folder)."""
    data = work / "digits-data"
    subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), str(data)], check=True, capture_output=True)
    return data


def write_copies(train_file: Path, copies: int, folder: Path) -> Path:
    table = pq.read_table(train_file)
    folder.mkdir(parents=True)
    for i in range(copies):
        pq.write_table(table, folder / f"part-{i:04d}.parquet", row_group_size=64)
    return folder


def run_once(data: Path, train_dir: Path, steps: int, run_dir: Path) -> dict:
    cfg = flops_dist.Config.load(EXAMPLE / "digits.toml")
    cfg.model.weights = str(data / "digits_vit_pretrained.safetensors")
    cfg.data.train, cfg.data.test = str(train_dir), ""
    cfg.train.steps, cfg.output.log_every = steps, steps
    cfg.output.run_dir, cfg.metrics.port = str(run_dir), -1
    result = flops_dist.train(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), cfg.data.train, cfg,
                              progress=lambda line: None)
    seconds = np.median(result.run_log.column("seconds").to_numpy()[1:])  # step 0 warms up
    return {"worker": max(result.peak_memory["workers"]), "coordinator": result.peak_memory["coordinator"],
            "rate": 1.0 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--copies", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.copies = 8, 1, 3
    work = Path(tempfile.mkdtemp(prefix="flops-data-scale-"))
    data = prepared_digits(work)
    sizes = {1: write_copies(data / "digits_train.parquet", 1, work / "x1"),
             args.copies: write_copies(data / "digits_train.parquet", args.copies, work / f"x{args.copies}")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    runs = {size: [] for size in sizes}
    for r in range(args.rounds):
        for size, folder in sizes.items():
            runs[size].append(run_once(data, folder, args.steps, work / f"run-{size}-{r}"))
    ray.shutdown()
    median = {size: {k: float(np.median([run[k] for run in rs])) for k in rs[0]} for size, rs in runs.items()}
    print(f"{'data':>6} {'examples':>9} {'worker peak MB':>15} {'coordinator peak MB':>20} {'steps/s':>8}")
    for size, m in median.items():
        print(f"{size:>5}x {size * 1197:>9} {m['worker'] / 2**20:>15.0f} {m['coordinator'] / 2**20:>20.0f} "
              f"{m['rate']:>8.1f}")
    growth = median[args.copies]["worker"] / median[1]["worker"]
    ratio = median[args.copies]["rate"] / median[1]["rate"]
    print(f"worker memory growth 1x -> {args.copies}x data: {growth:.2f}, step rate ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
