"""Soak: a long run of a tiny model with 2 workers, one killed every few hundred steps.

    python bench/soak.py [--steps 2000 --kill-every 300] [--smoke]

Kills alternate between ray.kill and SIGKILL of the worker's process. Prints the updates lost
(steps missing from the update log, plus 1 if replaying the whole log onto the base weights does
not give the final replicas' hash), replica-hash mismatches (the run compares replica hashes every
50 steps and stops on any difference), restarts, and the coordinator's resident memory after
warm-up (100 steps, or a third of a shorter run) and at the end. The run directory is new under
bench/out/soak-*. --smoke: 90 steps, a kill every 30.
"""
import argparse
import os
import signal
import time
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn

from common import fresh_dir
from flops_dist.config import Config
from flops_dist.coordinator import RemoteCoordinator
from flops_dist.data import ArrayDataset
from flops_dist.replica import Replica, ReplicaSpec
from flops_dist.runlog import messages, read_log


def build_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def cross_entropy(outputs, labels):
    return nn.functional.cross_entropy(outputs, labels, reduction="none")


def blobs(n=240, seed=0) -> ArrayDataset:
    """Three Gaussian blobs in 10 dimensions: small enough that the soak exercises the system, not the model."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    centres = rng.normal(size=(3, 10)) * 2
    inputs = centres[labels] + rng.normal(size=(n, 10))
    return ArrayDataset(inputs.astype(np.float32), labels.astype(np.int64))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak_config(steps: int, run_dir: Path) -> Config:
    cfg = Config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.queries_per_example = steps, 16, 4
    cfg.train.chunk_size, cfg.train.sigma, cfg.train.learning_rate, cfg.train.hash_every = 8, 0.01, 0.05, 50
    cfg.target.embedding_module = "1"
    cfg.cluster.workers, cfg.cluster.gpus_per_worker = 2, "0"
    cfg.output.run_dir, cfg.output.snapshot_every = str(run_dir), 100
    cfg.metrics.port = 0
    cfg.validate()
    return cfg


def kill_a_worker(coordinator, kills: int) -> None:
    """The newest worker: by ray.kill, and every other time by SIGKILL of its process."""
    if kills % 2:
        os.kill(ray.get(coordinator.info.remote())["workers"][-1]["pid"], signal.SIGKILL)
    else:
        ray.kill(ray.get(coordinator.worker_handles.remote())[-1], no_restart=True)


def run_with_kills(coordinator, steps: int, kill_every: int, warm_up: int) -> dict:
    """Run to the end, a worker killed every `kill_every` steps: the kills, the last step's
    record, the coordinator's RSS after warm-up and at the end, and the replicas' final hash. A
    replica-hash mismatch stops the run (ReplicaDivergence), so a finished run had none."""
    pid = ray.get(coordinator.info.remote())["pid"]
    kills, rss_start = 0, None
    try:
        while chunk := ray.get(coordinator.run.remote(kill_every // 3 or 1)):
            step, last = chunk[-1]["step"] + 1, chunk[-1]
            if rss_start is None and step >= warm_up:
                rss_start = rss_mib(pid)  # after warm-up: imports, first traces, first snapshot
            if step < steps and step // kill_every > kills:
                kill_a_worker(coordinator, kills)
                kills += 1
        rss_end = rss_mib(pid)
        ray.get(coordinator.finish.remote())
        final_hash = ray.get(ray.get(coordinator.worker_handles.remote())[0].hash.remote())
    finally:
        ray.kill(coordinator)
    return dict(kills=kills, last=last, rss_start=rss_start, rss_end=rss_end, final_hash=final_hash)


def replayed_hash(cfg: Config, run_dir: Path) -> tuple[int, str]:
    """(steps missing from the update log, the hash of the whole log replayed onto the base weights
    in this process)."""
    updates = read_log(run_dir, "updates")
    missing = len(set(range(cfg.train.steps)) - set(updates.column("step").to_pylist()))
    spec = ReplicaSpec(sigma=cfg.train.sigma, noise=cfg.train.noise, optimizer=cfg.train.optimizer_config(),
                       embedding_module="1")
    replica = Replica(build_mlp(), cross_entropy, blobs(), spec)
    return missing, replica.restore(replica.snapshot_tensors(), 0, messages(updates, 0))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--kill-every", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.kill_every = 90, 30
    warm_up = min(100, args.steps // 3)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)
    run_dir = fresh_dir("soak") / "run"
    cfg = soak_config(args.steps, run_dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    refs = {"model": ray.put(build_mlp()), "loss_fn": ray.put(cross_entropy), "sample": ray.put(blobs()),
            "train": ray.put(blobs()), "test": None}
    began = time.perf_counter()
    run = run_with_kills(RemoteCoordinator.options(num_cpus=0).remote(cfg, refs), args.steps, args.kill_every, warm_up)
    seconds = time.perf_counter() - began
    missing, replayed = replayed_hash(cfg, run_dir)
    last, rss_start, rss_end = run["last"], run["rss_start"], run["rss_end"]
    print(f"steps {args.steps} in {seconds:.0f} s, workers killed {run['kills']}, restarts {last['worker_restarts']}, "
          f"workers alive at the end {last['workers_alive']}")
    print(f"updates lost: {missing + int(replayed != run['final_hash'])}  (missing from the log {missing}; "
          f"full-log replay matches final hash: {replayed == run['final_hash']})")
    print(f"replica-hash mismatches: 0  ({args.steps // cfg.train.hash_every} checks; one would have stopped the run)")
    print(f"coordinator RSS: {rss_start:.1f} MiB after {warm_up} steps, {rss_end:.1f} MiB at the end "
          f"(growth {100 * (rss_end / rss_start - 1):+.1f}%)")
    ray.shutdown()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
