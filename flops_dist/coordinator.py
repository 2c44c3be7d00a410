"""The coordinator actor: owns the step loop (the Engine), the workers, and the run logs.

Its executor makes one call per worker per phase, never one per query. Chunks are dealt by a cost
model weighted by each worker's measured throughput; a worker that dies mid-phase has its
unfinished chunks dealt to the live ones, and the step's result is unchanged.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from safetensors.numpy import save_file

from .config import Config
from .engine import Engine
from .metrics import RunMetrics
from .replica import ReplicaSpec
from .runlog import RunLogWriter
from .sharding import QueryChunks, assign_chunks, chunk_costs
from .worker import RemoteWorker

log = logging.getLogger("flops_dist")


class AllWorkersLost(RuntimeError):
    """No live worker is left to evaluate a step's queries."""


class RayExecutor:
    def __init__(self, workers: list, noise_cost: float = 0.0):
        self.workers = list(workers)
        self.speeds = np.ones(len(workers))
        self.noise_cost = noise_cost
        self.message = None
        self.workers_lost = 0
        self.query_rates = np.zeros(len(workers))  # queries per second in each worker's last evaluate

    def _scatter(self, method: str, n_items: int, costs: np.ndarray, take, on_result, called=None) -> None:
        """Deal items over live workers, call `method(*take(items))` once per worker, and re-deal the
        items of any worker that died until every item has a result. `called` collects the workers
        that were sent something."""
        remaining = np.arange(n_items)
        while len(remaining):
            if not self.workers:
                raise AllWorkersLost("every worker has died; no replica is left to evaluate queries")
            calls = []
            for w, idx in enumerate(assign_chunks(costs[remaining], self.speeds)):
                if len(idx):
                    items = remaining[idx]
                    calls.append((w, items, getattr(self.workers[w], method).remote(*take(items))))
                    if called is not None:
                        called.add(id(self.workers[w]))
            failed, dead = [], set()
            for w, items, ref in calls:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("worker %d died during %s (%s); re-dealing its %d items",
                                w, method, type(e).__name__, len(items))
                    failed.append(items)
                    dead.add(w)
                    continue
                on_result(items, result)
                seconds = result[-1]
                if seconds > 0:  # throughput in cost units per second, smoothed
                    rate = costs[items].sum() / seconds
                    self.speeds[w] = rate if self.speeds[w] == 1.0 else 0.7 * self.speeds[w] + 0.3 * rate
                    if method == "evaluate":
                        self.query_rates[w] = result[0].size / seconds
            if dead:
                keep = [w for w in range(len(self.workers)) if w not in dead]
                self.workers = [self.workers[w] for w in keep]
                self.speeds = self.speeds[keep]
                self.query_rates = self.query_rates[keep]
                self.workers_lost += len(dead)
            remaining = np.concatenate(failed) if failed else remaining[:0]

    @staticmethod
    def _send_update(workers: list, msg) -> None:
        for ref in [w.apply.remote(msg) for w in workers]:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # a dead worker is removed when its next call fails

    def deliver(self) -> None:
        """Send the pending update to every worker now (it normally rides on the next clean forward)."""
        if self.message is not None:
            msg, self.message = self.message, None
            self._send_update(self.workers, msg)

    def clean_forward(self, rows: np.ndarray):
        losses = np.empty(rows.shape, np.float32)
        embeddings = {}
        msg, self.message = self.message, None
        called = set()

        def store(items, result):
            losses[items] = result[0]
            embeddings[tuple(items)] = result[1]

        self._scatter("clean_forward", len(rows), np.full(len(rows), float(rows.shape[1])),
                      lambda items: (rows[items], msg), store, called)
        if msg is not None:  # workers that got no rows still need the update
            self._send_update([w for w in self.workers if id(w) not in called], msg)
        width = next(iter(embeddings.values())).shape[-1]
        out = np.empty(rows.shape + (width,), np.float32)
        for items, emb in embeddings.items():
            out[list(items)] = emb
        return losses, out

    def evaluate(self, chunks: QueryChunks) -> np.ndarray:
        losses = np.empty(chunks.examples.shape, np.float32)

        def store(items, result):
            losses[items] = result[0]

        self._scatter("evaluate", len(chunks), chunk_costs(chunks, self.noise_cost),
                      lambda items: (chunks.take(items),), store)
        return losses

    def apply(self, msg) -> None:
        self.message = msg  # delivered with the next clean forward, saving a round trip per step

    def hashes(self) -> list[str]:
        self.deliver()
        return ray.get([w.hash.remote() for w in self.workers])


def gpus_per_worker(cfg: Config) -> int:
    if cfg.cluster.gpus_per_worker == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return int(cfg.cluster.gpus_per_worker)


def placeable_workers(cfg: Config, gpus: int) -> int:
    resources = ray.cluster_resources()
    limit = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 0))
    return min(cfg.cluster.workers, limit)


class Coordinator:
    def __init__(self, cfg: Config, refs: dict, n_examples: int):
        torch.set_num_threads(1)  # the allocator's math must not depend on the host's cores
        self.cfg = cfg
        self.refs = refs
        t = cfg.train
        spec = ReplicaSpec(include=cfg.target.include, embedding_module=cfg.target.embedding_module,
                           sigma=t.sigma, noise=t.noise, optimizer=t.optimizer_config(),
                           threads=cfg.cluster.threads_per_worker)
        gpus = gpus_per_worker(cfg)
        count = placeable_workers(cfg, gpus)
        if count < cfg.cluster.min_workers:
            raise RuntimeError(f"cluster.min_workers: the cluster can place {count} workers with "
                               f"{'1 GPU' if gpus else '1 CPU'} each, fewer than the {cfg.cluster.min_workers} asked for")
        if count < cfg.cluster.workers:
            log.warning("starting with %d of %d workers: the cluster lacks resources", count, cfg.cluster.workers)
        workers = [RemoteWorker.options(num_cpus=0 if gpus else 1, num_gpus=gpus).remote(
            refs["model"], refs["loss_fn"], refs["train"], spec) for _ in range(count)]
        self.worker_info = ray.get([w.info.remote() for w in workers])
        self.executor = RayExecutor(workers)
        self.engine = Engine(t, self.executor, n_examples, self.worker_info[0]["d"])
        self.run_dir = Path(cfg.output.run_dir)
        self.writer = RunLogWriter(self.run_dir)
        self.step = 0
        self.metrics = RunMetrics()
        self.metrics_url = None
        if cfg.metrics.port >= 0:
            try:
                port = self.metrics.serve(cfg.metrics.address, cfg.metrics.port)
            except OSError as e:
                raise RuntimeError(f"metrics.port: cannot serve metrics on {cfg.metrics.address}:"
                                   f"{cfg.metrics.port} ({e.strerror}); choose another port, 0 for any "
                                   "free one, or -1 for none") from None
            self.metrics_url = f"http://{cfg.metrics.address}:{port}/metrics"
        self.metrics.workers_alive.set(len(workers))

    def info(self) -> dict:
        return {"workers": self.worker_info, "d": self.engine.d, "run_dir": str(self.run_dir),
                "metrics_url": self.metrics_url}

    def worker_handles(self) -> list:
        """The live workers' actor handles, for operators (and tests) to inspect or stop."""
        return list(self.executor.workers)

    def score(self) -> float | None:
        if self.refs.get("test") is None:
            return None
        self.executor.deliver()
        return ray.get(self.executor.workers[0].score.remote(self.refs["test"], self.cfg.data.metric))

    def run(self, steps: int) -> list[dict]:
        """Run up to `steps` more steps; returns their run-log rows."""
        records = []
        began = time.perf_counter()
        for _ in range(min(steps, self.cfg.train.steps - self.step)):
            outcome = self.engine.step(self.step)
            self.writer.append(outcome.record, outcome.message, outcome.allocation)
            alive = len(self.executor.workers)
            self.metrics.record(outcome.record, self.executor.query_rates.tolist(), alive)
            records.append({**outcome.record, "workers_alive": alive, "workers_lost": self.executor.workers_lost})
            self.step += 1
        self.writer.flush()
        if records:
            records[-1]["chunk_seconds"] = time.perf_counter() - began
        return records

    def finish(self) -> dict[str, np.ndarray]:
        """Check that every replica agrees, close the logs, save and return the final model."""
        self.engine.check_replicas(self.step - 1)
        self.writer.close()
        self.metrics.close()
        self.executor.deliver()
        state = ray.get(self.executor.workers[0].state_dict.remote())
        tmp = self.run_dir / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(self.run_dir / "model.safetensors")
        return state


RemoteCoordinator = ray.remote(Coordinator)
