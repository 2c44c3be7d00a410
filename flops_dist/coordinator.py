"""The coordinator actor: owns the step loop (the Engine), the workers, and the run logs.

Its executor makes one call per worker per phase, never one per query. Chunks are dealt by a cost
model weighted by each worker's measured throughput; a worker that dies mid-phase has its
unfinished chunks dealt to the live ones, and the step's result is unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
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
from .runlog import (RunLogWriter, RunStateError, Snapshot, check_run_dir, latest_snapshot, messages, read_log,
                     save_snapshot, truncate_log, write_atomically)
from .sharding import QueryChunks, assign_chunks, chunk_costs, gather_rows
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
        return losses, gather_rows(len(rows), embeddings)

    def evaluate(self, chunks: QueryChunks) -> np.ndarray:
        losses = np.empty(chunks.examples.shape, np.float32)

        def store(items, result):
            losses[items] = result[0]

        self._scatter("evaluate", len(chunks), chunk_costs(chunks, self.noise_cost),
                      lambda items: (chunks.take(items),), store)
        return losses

    def apply(self, msg) -> None:
        self.message = msg  # delivered with the next clean forward, saving a round trip per step

    def add(self, worker) -> None:
        self.workers.append(worker)
        self.speeds = np.append(self.speeds, self.speeds.mean() if len(self.speeds) else 1.0)
        self.query_rates = np.append(self.query_rates, 0.0)

    def hashes(self) -> list[str]:
        self.deliver()
        return ray.get([w.hash.remote() for w in self.workers])


def gpus_per_worker(cfg: Config) -> int:
    if cfg.cluster.gpus_per_worker == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return int(cfg.cluster.gpus_per_worker)


class Coordinator:
    """The step loop's owner. Durable state lives in the run directory (runlog.py); a worker that
    dies is replaced by one that loads the last snapshot, replays the update log and proves by its
    parameter hash that it matches the others before it takes queries."""

    def __init__(self, cfg: Config, refs: dict, n_examples: int, resume: bool = False):
        torch.set_num_threads(1)  # the allocator's math must not depend on the host's cores
        self.cfg, self.refs = cfg, refs
        t = cfg.train
        self.spec = ReplicaSpec(include=cfg.target.include, embedding_module=cfg.target.embedding_module,
                                sigma=t.sigma, noise=t.noise, optimizer=t.optimizer_config(),
                                threads=cfg.cluster.threads_per_worker)
        self.gpus = gpus_per_worker(cfg)
        self.run_dir = Path(cfg.output.run_dir)
        check_run_dir(self.run_dir)
        if not resume and ((self.run_dir / "updates").exists() or (self.run_dir / "snapshots").exists()):
            raise RuntimeError(f"output.run_dir: {self.run_dir} already holds a run; resume it with "
                               "`flops-dist train --resume RUN_DIR` or choose another run_dir")
        deadline = time.monotonic() + 10  # resources of a previous run may still be on their way back
        while self._free_slots() < cfg.cluster.workers and time.monotonic() < deadline:
            time.sleep(0.5)
        count = min(cfg.cluster.workers, self._free_slots())
        if count < cfg.cluster.min_workers:
            raise RuntimeError(f"cluster.min_workers: the cluster has room for {count} workers with "
                               f"{'1 GPU' if self.gpus else '1 CPU'} each, fewer than the "
                               f"{cfg.cluster.min_workers} asked for")
        if count < cfg.cluster.workers:
            log.warning("starting with %d of %d workers: the cluster lacks resources; more join when it has them",
                        count, cfg.cluster.workers)
        workers = [self._new_worker() for _ in range(count)]
        self.worker_info = ray.get([w.info.remote() for w in workers])
        self.executor = RayExecutor(workers, float(np.median([w["noise_cost"] for w in self.worker_info])))
        self.engine = Engine(t, self.executor, n_examples, self.worker_info[0]["d"])
        self.writer = RunLogWriter(self.run_dir)
        self.restarts = 0
        self.step = 0
        if resume:
            self._resume()
        else:
            (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            self._take_snapshot()
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

    # -- workers ---------------------------------------------------------------------------------
    def _free_slots(self) -> int:
        free = ray.available_resources()
        return int(free.get("GPU", 0)) if self.gpus else int(free.get("CPU", 0))

    def _new_worker(self):
        return RemoteWorker.options(num_cpus=0 if self.gpus else 1, num_gpus=self.gpus).remote(
            self.refs["model"], self.refs["loss_fn"], self.refs["train"], self.spec)

    def _catch_up(self, worker, timeout: float = 120.0) -> bool:
        """Bring a new worker to the current step from the last snapshot plus the update log, and
        admit it only if its parameter hash equals a live replica's."""
        self.executor.deliver()
        try:
            new_hash = ray.get(worker.restore.remote(self.snapshot.tensors, self.snapshot.step,
                                                     self.messages_since_snapshot), timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            log.warning("a new worker could not start (%s); will retry later", type(e).__name__)
            ray.kill(worker)
            return False
        reference = ray.get(self.executor.workers[0].hash.remote()) if self.executor.workers else self.snapshot_hash
        if new_hash != reference:
            ray.kill(worker)
            raise RuntimeError(f"a new worker caught up to step {self.step} with hash {new_hash[:12]}, "
                               f"but the replicas hold {reference[:12]}: the update log does not reproduce θ")
        self.executor.add(worker)
        return True

    def _fill_workers(self) -> None:
        """Replace dead workers and admit late joiners while the cluster has room."""
        while len(self.executor.workers) < self.cfg.cluster.workers and self._free_slots() > 0:
            if not self._catch_up(self._new_worker()):
                break
            replaced = self.executor.workers_lost > self.restarts
            if replaced:
                self.restarts += 1
                self.metrics.worker_restarts.inc()
            log.warning("worker %s at step %d; %d live", "replaced" if replaced else "joined", self.step,
                        len(self.executor.workers))

    # -- durable state ---------------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        self.executor.deliver()
        tensors, step, digest = ray.get(self.executor.workers[0].snapshot.remote())
        assert step == self.step, (step, self.step)
        self.snapshot = Snapshot(step, tensors, digest)
        self.snapshot_hash = digest
        self.messages_since_snapshot = []
        save_snapshot(self.run_dir, self.snapshot)

    def _resume(self) -> None:
        runs, updates = read_log(self.run_dir, "run_log"), read_log(self.run_dir, "updates")
        # a step counts when both logs have it; the rest is recomputed, bit for bit
        steps = min(runs.num_rows, updates.num_rows)
        for sub in ("run_log", "updates"):
            truncate_log(self.run_dir, sub, steps)
        snap = latest_snapshot(self.run_dir, steps)
        if snap is None:  # base weights plus the whole log is a checkpoint too
            log.warning("%s: no readable snapshot; replaying %d updates onto the base weights", self.run_dir, steps)
            tensors, _, digest = ray.get(self.executor.workers[0].snapshot.remote())
            snap = Snapshot(0, tensors, digest)
            save_snapshot(self.run_dir, snap)
        replay = messages(updates, snap.step)[:steps - snap.step]
        hashes = ray.get([w.restore.remote(snap.tensors, snap.step, replay) for w in self.executor.workers])
        if len(set(hashes)) != 1:
            raise RunStateError("replicas disagree after replaying the update log")
        if steps:
            self.engine.allocator.load_state(runs.column("allocator_state")[steps - 1].as_py())
        self.step = steps
        self.snapshot, self.snapshot_hash, self.messages_since_snapshot = snap, snap.hash, replay
        log.warning("resumed at step %d from the snapshot of step %d plus %d logged updates",
                    steps, snap.step, len(replay))

    # -- the loop --------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"workers": ray.get([w.info.remote() for w in self.executor.workers]), "d": self.engine.d,
                "run_dir": str(self.run_dir), "metrics_url": self.metrics_url, "step": self.step,
                "pid": os.getpid()}

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
        every = self.cfg.output.snapshot_every
        for _ in range(min(steps, self.cfg.train.steps - self.step)):
            if len(self.executor.workers) < self.cfg.cluster.workers and (
                    self.executor.workers_lost > self.restarts or self.step % self.cfg.cluster.rescale_every == 0):
                self._fill_workers()
            outcome = self.engine.step(self.step)
            self.writer.append(outcome.record, outcome.message, outcome.allocation, self.engine.allocator.state())
            self.messages_since_snapshot.append(outcome.message)
            alive = len(self.executor.workers)
            self.metrics.record(outcome.record, self.executor.query_rates.tolist(), alive)
            records.append({**outcome.record, "workers_alive": alive, "workers_lost": self.executor.workers_lost,
                            "worker_restarts": self.restarts})
            self.step += 1
            if self.step % every == 0:
                self.writer.flush()
                self._take_snapshot()
        self.writer.flush()
        return records

    def finish(self) -> dict[str, np.ndarray]:
        """Check that every replica agrees, snapshot, save and return the final model."""
        self.engine.check_replicas(self.step - 1)
        self.writer.flush()
        if self.snapshot.step != self.step:
            self._take_snapshot()
        self.metrics.close()
        state = ray.get(self.executor.workers[0].state_dict.remote())
        write_atomically(self.run_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
        return state


RemoteCoordinator = ray.remote(Coordinator)
