"""The coordinator actor: owns the step loop (the Engine), the workers, and the run logs.

Its executor makes one call per worker per phase, never one per query. Chunks are dealt by a cost
model weighted by each worker's measured throughput; a worker that dies mid-phase has its
unfinished chunks dealt to the live ones, and the step's result is unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import traceback
import logging
import operator
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch

from .config import Config
from .engine import Engine, Executor
from .metrics import RunMetrics, peak_rss_bytes
from .replica import ReplicaSpec
from .loading import source_hashes
from .runlog import (SCHEMAS, Recovery, RunLogWriter, RunStateError, Snapshot, check_run_dir, holds_run, parts_holding,
                     recover, save_model, save_snapshot, truncate_log, write_atomically)
from .sharding import assign_chunks
from .worker import RemoteWorker

log = logging.getLogger("flops_dist")


class AllWorkersLost(RuntimeError):
    """No live worker is left to evaluate a step's queries."""


class RayExecutor(Executor):
    """Replicas in worker actors: one call per worker per phase, never one per query. Items are dealt
    by cost and each worker's measured speed, and a worker that dies mid-phase has its items re-dealt
    to the live ones. An update is not waited for: it rides with the next step's clean forward,
    sent at once, so the workers apply it and run the next batch while this actor finishes the
    step (the allocator's learning, the logs). Before any other call it goes alone, and an actor
    runs one caller's calls in the order sent, so each worker's next call finds θ_{t+1}."""

    sends_ahead = True

    def __init__(self, workers: list, noise_cost: float = 0.0, prefix_reuse: bool = False):
        self.workers = list(workers)
        self.prefix_reuse = prefix_reuse
        self.speeds = np.ones(len(workers))
        self.noise_cost = noise_cost
        self.unsent = None   # the last update, while no call has carried it yet
        self.in_flight = []  # the replies of the last update's apply calls, not yet checked
        self.workers_lost = 0
        self.query_rates = np.zeros(len(workers))  # queries per second in each worker's last evaluate

    def _scatter(self, method: str, costs: np.ndarray, take, store, everyone: bool = False,
                 groups=None, sent=None) -> np.ndarray:
        if self._sent_to_these(sent):
            self.in_flight = []  # the calls that carry the update: their replies are read below
        self.flush()
        owner = np.zeros(len(costs), np.int64)
        remaining = np.arange(len(costs))
        while len(remaining):
            if not self.workers:
                raise AllWorkersLost("every worker has died; no replica is left to evaluate queries")
            if self._sent_to_these(sent):
                calls = sent[1]
            else:
                calls = self._send(method, costs, remaining, take, everyone, groups)
            sent = None
            failed, dead = [], set()
            for w, items, ref in calls:
                try:
                    value, seconds = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("worker %d died during %s (%s); re-dealing its %d items",
                                w, method, type(e).__name__, len(items))
                    failed.append(items)
                    dead.add(w)
                    continue
                if len(items):
                    store(items, value)
                    owner[items] = w
                    self._measure(w, method, costs[items].sum(), value, seconds)
            self._drop(dead)
            owner -= (np.array(sorted(dead))[:, None] < owner).sum(axis=0)  # the survivors' new positions
            remaining = np.concatenate(failed) if failed else remaining[:0]
            groups = None  # after a death the indices moved: deal the rest by load alone
        return owner

    def _send(self, method: str, costs: np.ndarray, items: np.ndarray, take, everyone: bool, groups) -> list:
        """[(worker, its items, the call's reply)] for `items` dealt by cost and speed."""
        hint = () if groups is None else (groups[0][items], *groups[1:])
        return [(w, items[idx], getattr(self.workers[w], method).remote(*take(items[idx], w)))
                for w, idx in enumerate(assign_chunks(costs[items], self.speeds, *hint)) if len(idx) or everyone]

    def _sent_to_these(self, sent) -> bool:
        """Whether calls made by a send_* verb went to the live workers as they are now."""
        return sent is not None and len(sent[0]) == len(self.workers) and all(map(operator.is_, sent[0],
                                                                                   self.workers))

    def send_clean_forward(self, rows: np.ndarray, batch):
        """Sent right after the update, without waiting: each worker applies it, then runs its rows
        while this actor's allocator learns. The same workers, still all alive, collect it."""
        costs, take = self._clean_calls(rows, batch)
        update, self.unsent = self.unsent, None  # every worker gets a call (everyone), so every one applies it
        calls = self._send("clean_forward", costs, np.arange(len(rows)), lambda items, w: (*take(items, w), update), True,
                           None)
        self.in_flight = [ref for _, _, ref in calls] if update is not None else []  # flush() waits for them
        return list(self.workers), calls

    def _measure(self, w: int, method: str, cost: float, value, seconds: float) -> None:
        """Throughput in cost units per second, smoothed: it steers the dealing, never the bits."""
        if seconds > 0:
            rate = cost / seconds
            self.speeds[w] = rate if self.speeds[w] == 1.0 else 0.7 * self.speeds[w] + 0.3 * rate
            if method == "evaluate":
                self.query_rates[w] = value.size / seconds

    def _drop(self, dead: set[int]) -> None:
        if dead:
            keep = [w for w in range(len(self.workers)) if w not in dead]
            self.workers = [self.workers[w] for w in keep]
            self.speeds = self.speeds[keep]
            self.query_rates = self.query_rates[keep]
            self.workers_lost += len(dead)

    def call_all(self, method: str, *args) -> list:
        """`method` on every live worker; the dead are dropped, and at least one must answer."""
        self.flush()
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        results, dead = [], set()
        for w, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                log.warning("worker %d died during %s", w, method)
                dead.add(w)
        self._drop(dead)
        if not results:
            raise AllWorkersLost(f"every worker died during {method}")
        return results

    def call_any(self, method: str, *args):
        """`method` on one live worker, falling back to the next when one dies."""
        self.flush()
        while self.workers:
            try:
                return ray.get(getattr(self.workers[0], method).remote(*args))
            except ray.exceptions.RayActorError:
                log.warning("worker 0 died during %s; asking another", method)
                self._drop({0})
        raise AllWorkersLost(f"every worker has died; none is left for {method}")

    def queue_update(self, msg) -> None:
        self.flush()
        self.unsent = msg.to_send()

    def flush(self) -> None:
        """Send an update no call has carried, and wait for the calls that carry it. A worker that died
        applying it is dropped at its next call; any other failure (an update that would make θ
        non-finite) is raised here, before any call that reads θ."""
        if self.unsent is not None:
            self.in_flight, self.unsent = [w.apply.remote(self.unsent) for w in self.workers], None
        in_flight, self.in_flight = self.in_flight, []
        for ref in in_flight:
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(ref)

    def add(self, worker) -> None:
        self.workers.append(worker)
        self.speeds = np.append(self.speeds, self.speeds.mean() if len(self.speeds) else 1.0)
        self.query_rates = np.append(self.query_rates, 0.0)

    def hashes(self) -> list[str]:
        return self.call_all("hash")


def gpus_per_worker(cfg: Config) -> int:
    if cfg.cluster.gpus_per_worker == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return int(cfg.cluster.gpus_per_worker)


class Coordinator:
    """The step loop's owner. Durable state lives in the run directory (runlog.py); a worker that
    dies is replaced by one that loads the last snapshot, replays the update log and proves by its
    parameter hash that it matches the others before it takes queries."""

    def __init__(self, cfg: Config, refs: dict, resume: bool = False):
        """`refs`: object refs of the model, the loss, a few sample rows for the workers, and the
        train and test data (ArrayDataset or ParquetSource: this actor reads each step's rows).
        A start that fails is reported by info(), not raised: Ray would print the traceback of an
        actor that fails to start, and the user is owed one line."""
        self.start_error = None
        try:
            self._start(cfg, refs, resume)
        except Exception as e:
            self.start_error = (f"{type(e).__name__}: {e}", traceback.format_exc())

    def _start(self, cfg: Config, refs: dict, resume: bool) -> None:
        """Workers ready and metrics served before anything is written: a start that fails leaves
        a new run directory as it found it."""
        torch.set_num_threads(1)  # the allocator's math must not depend on the host's cores
        self.cfg, self.refs, self.run_dir = cfg, refs, Path(cfg.output.run_dir)
        check_run_dir(self.run_dir)
        if not resume and holds_run(self.run_dir):
            raise RuntimeError(f"output.run_dir: {self.run_dir} already holds a run; resume it with "
                               "`flops-dist train --resume RUN_DIR` or choose another run_dir")
        self.train_data = ray.get(refs["train"])
        self.test_data = None if refs.get("test") is None else ray.get(refs["test"])
        self.spec, self.gpus = ReplicaSpec.from_config(cfg), gpus_per_worker(cfg)
        workers = self._start_workers()
        self.executor = RayExecutor(workers, float(np.median([w["noise_cost"] for w in self.worker_info])),
                                    any(w["frozen_prefix"] for w in self.worker_info))
        self.engine = Engine(cfg.train, self.executor, self.train_data, self.worker_info[0]["d"])
        self.writer = RunLogWriter(self.run_dir)
        self.restarts, self.step = 0, 0
        self.scored = (-1, float("nan"))  # (step, held-out metric at θ after it)
        self.notes: list[str] = []  # what recovery set aside or rolled back, for the user
        self.metrics = RunMetrics()
        self.metrics_url = self._serve_metrics()
        # config.json says what the run is now: where it lives, how many steps it is to have
        write_atomically(self.run_dir, "config.json", json.dumps(dataclasses.asdict(cfg), indent=2).encode())
        if resume:
            self._resume()
        else:
            write_atomically(self.run_dir, "sources.json", json.dumps(source_hashes(cfg), indent=2).encode())
            self._take_snapshot()
        self.metrics.workers_alive.set(len(workers))

    def _start_workers(self) -> list:
        deadline = time.monotonic() + 10  # resources of a previous run may still be on their way back
        while self._free_slots() < self.cfg.cluster.workers and time.monotonic() < deadline:
            time.sleep(0.5)
        count, wanted = min(self.cfg.cluster.workers, self._free_slots()), self.cfg.cluster
        if count < wanted.min_workers:
            raise RuntimeError(f"cluster.min_workers: the cluster has room for {count} workers with "
                               f"{'1 GPU' if self.gpus else '1 CPU'} each, fewer than the "
                               f"{wanted.min_workers} asked for")
        if count < wanted.workers:
            log.warning("starting with %d of %d workers: the cluster lacks resources; more join when it has them",
                        count, wanted.workers)
        workers = [self._new_worker() for _ in range(count)]
        self.worker_info = ray.get([w.info.remote() for w in workers])
        return workers

    def _serve_metrics(self) -> str | None:
        m = self.cfg.metrics
        if m.port < 0:
            return None
        try:
            port = self.metrics.serve(m.address, m.port)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RuntimeError(f"metrics.port: {m.address}:{m.port} is already in use (another run on the "
                                   "same port?); choose another port, 0 for any free one, or -1 for none") from None
            raise RuntimeError(f"metrics.address: cannot serve metrics on {m.address!r} ({e.strerror or e}); "
                               "give an address of this machine, such as 127.0.0.1 or 0.0.0.0") from None
        return f"http://{m.address}:{port}/metrics"

    # -- workers ---------------------------------------------------------------------------------
    def _free_slots(self) -> int:
        free = ray.available_resources()
        return int(free.get("GPU", 0)) if self.gpus else int(free.get("CPU", 0))

    def _new_worker(self):
        return RemoteWorker.options(num_cpus=0 if self.gpus else 1, num_gpus=self.gpus).remote(
            self.refs["model"], self.refs["loss_fn"], self.refs["sample"], self.spec)

    def _catch_up(self, worker, timeout: float = 120.0) -> bool:
        """Bring a new worker to the current step from the last snapshot plus the update log, and
        admit it only if its parameter hash equals a live replica's (with none alive: the hash the
        replicas last agreed on, where that was at this step)."""
        try:
            new_hash = ray.get(worker.restore.remote(self.snapshot.tensors, self.snapshot.step,
                                                     self.messages_since_snapshot), timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            log.warning("a new worker could not start (%s); will retry later", type(e).__name__)
            ray.kill(worker)
            return False
        try:
            reference = self.executor.call_any("hash")
        except AllWorkersLost:
            reference = self.agreed[1] if self.agreed[0] == self.step else new_hash
        if new_hash != reference:
            ray.kill(worker)
            raise RuntimeError(f"a new worker caught up to step {self.step} with hash {new_hash[:12]}, "
                               f"but the replicas hold {reference[:12]}: the update log does not reproduce θ")
        self.executor.add(worker)
        return True

    def _fill_workers(self, wait: float = 0.0) -> None:
        """Replace dead workers and admit late joiners while the cluster has room. With no live
        worker, wait up to `wait` seconds for the dead ones' resources to come back."""
        deadline = time.monotonic() + wait
        while len(self.executor.workers) < self.cfg.cluster.workers:
            if self._free_slots() == 0:
                if self.executor.workers or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
                continue
            if not self._catch_up(self._new_worker()):
                break
            replaced = self.executor.workers_lost > self.restarts
            if replaced:
                self.restarts += 1
                self.metrics.worker_restarts.inc()
            log.warning("worker %s at step %d; %d live", "replaced" if replaced else "joined", self.step,
                        len(self.executor.workers))

    def _replace_all(self) -> None:
        log.warning("every worker has died at step %d; replacing them from the snapshot of step %d",
                    self.step, self.snapshot.step)
        self._fill_workers(wait=30.0)
        if not self.executor.workers:
            raise AllWorkersLost(f"every worker died at step {self.step} and the cluster has no room for new "
                                 f"ones; resume with `flops-dist train --resume {self.run_dir}` once it has")

    def _surviving(self, phase, *args):
        """`phase(*args)`, once more on workers made from the snapshot if every worker died in it."""
        try:
            return phase(*args)
        except AllWorkersLost:
            self._replace_all()
            return phase(*args)

    # -- durable state ---------------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        tensors, step, digest = self.executor.call_any("snapshot")
        assert step == self.step, (step, self.step)
        self.snapshot = Snapshot(step, tensors, digest)
        self.agreed = (step, digest)
        self.messages_since_snapshot = []
        save_snapshot(self.run_dir, self.snapshot)

    def _resume(self) -> None:
        """Continue from the newest verified snapshot plus the update log, checked on the way
        against every θ hash the run log recorded; from the last verified step if one fails."""
        rec = recover(self.run_dir)
        self.notes.extend(rec.notes)
        snap = rec.snapshot or self._base_snapshot(rec.steps)
        reached = self._replay(rec, snap)
        if reached < rec.steps:
            for sub in SCHEMAS:
                truncate_log(self.run_dir, sub, reached)
        if reached:
            self.engine.allocator.load_state(rec.allocator_state(reached))
        self.step = reached
        self.snapshot, self.messages_since_snapshot = snap, rec.replay(snap.step, reached)
        self.agreed = (reached, self.executor.call_any("hash"))
        log.warning("resumed at step %d from the snapshot of step %d plus %d logged updates",
                    reached, snap.step, reached - snap.step)

    def _base_snapshot(self, steps: int) -> Snapshot:
        """Base weights plus the whole update log is a checkpoint too."""
        self.notes.append(f"{self.run_dir}: no verified snapshot; replaying {steps} updates onto the base weights")
        log.warning(self.notes[-1])
        tensors, _, digest = self.executor.call_any("snapshot")
        snap = Snapshot(0, tensors, digest)
        save_snapshot(self.run_dir, snap)
        return snap

    def _replay(self, rec: Recovery, snap: Snapshot) -> int:
        """Load `snap` on every replica and replay the update log, stopping at each step whose θ
        hash the run log recorded; returns the last step whose θ can be trusted."""
        expected = {s: h for s, h in rec.expected_hashes().items() if snap.step < s <= rec.steps}
        self.executor.call_all("restore", snap.tensors, snap.step, [])
        reached = snap.step
        for mark in sorted(expected) + [rec.steps]:
            hashes = self.executor.call_all("replay", rec.replay(reached, mark))
            if len(set(hashes)) != 1:
                raise RunStateError(f"replicas disagree after replaying the update log to step {mark}")
            if mark in expected and hashes[0] != expected[mark]:
                self.notes.append(f"{parts_holding(self.run_dir, 'updates', reached, mark - 1)}: replaying steps "
                                  f"{reached}-{mark - 1} gives θ hash "
                                  f"{hashes[0][:12]}, but the run log recorded {expected[mark][:12]}; resuming from "
                                  f"step {reached}, the last verified one")
                log.warning(self.notes[-1])
                self.executor.call_all("restore", snap.tensors, snap.step, rec.replay(snap.step, reached))
                return reached
            reached = mark
        return reached

    # -- the loop --------------------------------------------------------------------------------
    def info(self) -> dict:
        if self.start_error:
            return {"error": self.start_error[0], "details": self.start_error[1]}
        return {"workers": self.executor.call_all("info"), "d": self.engine.d,
                "run_dir": str(self.run_dir), "metrics_url": self.metrics_url, "step": self.step,
                "pid": os.getpid(), "notes": list(self.notes)}

    def peak_memory(self) -> dict:
        """Peak resident bytes of this actor and of each live worker."""
        return {"coordinator": peak_rss_bytes(), "workers": self.executor.call_all("peak_memory")}

    def worker_handles(self) -> list:
        """The live workers' actor handles, for operators (and tests) to inspect or stop."""
        return list(self.executor.workers)

    def score(self) -> float | None:
        """The test metric at θ, streamed through any live replica a batch at a time, and set on
        /metrics. At most once per step: a score taken in the run serves the driver's final call."""
        if self.test_data is None:
            return None
        if self.scored[0] != self.step:
            total = sum(self._surviving(self.executor.call_any, "score_sum", batch, self.cfg.data.metric)
                        for batch in self.test_data.batches(256))
            self.scored = (self.step, total / max(len(self.test_data), 1))
            self.metrics.test_metric.labels(self.cfg.data.metric).set(self.scored[1])
        return self.scored[1]

    def run(self, steps: int) -> list[dict]:
        """Run up to `steps` more steps; returns their run-log rows."""
        records = []
        try:
            for _ in range(min(steps, self.cfg.train.steps - self.step)):
                records.append(self._run_step())
        finally:
            self.writer.wait()  # a segment written in the background is on disk before the caller reads on
        self.writer.flush()
        return records

    def _run_step(self) -> dict:
        """One step, its logs and metrics, its held-out score and the snapshot where either is due."""
        if len(self.executor.workers) < self.cfg.cluster.workers and (
                self.executor.workers_lost > self.restarts or self.step % self.cfg.cluster.rescale_every == 0):
            self._fill_workers()
        outcome = self._step()
        self.messages_since_snapshot.append(outcome.message)  # first: a worker replaced while scoring needs it
        self.step += 1
        if outcome.record.theta_hash:
            self.agreed = (self.step, outcome.record.theta_hash)
        record, every = outcome.record, self.cfg.output.score_every
        if every and self.test_data is not None and self.step % every == 0:
            with self.engine.off_the_clock():
                record = dataclasses.replace(record, test_metric=self.score())
        self.writer.append(record, outcome.message, outcome.allocation, self.engine.allocator.state)
        alive = len(self.executor.workers)
        self.metrics.record(record, self.executor.query_rates.tolist(), alive)
        row = {**dataclasses.asdict(record), "workers_alive": alive,
               "workers_lost": self.executor.workers_lost, "worker_restarts": self.restarts}
        if self.step % self.cfg.output.snapshot_every == 0:
            self.writer.flush(wait=False)  # written while the run goes on; a snapshot ahead of the logs is
            self._take_snapshot()          # not used by a resume (recover), so the order cannot lose a step
        return row

    def _step(self):
        """Engine.step; if every worker dies in it, once more from the same allocator state on new
        workers made from the snapshot (the step's result does not depend on who computes it)."""
        state = self.engine.allocator.state
        try:
            return self.engine.step(self.step)
        except AllWorkersLost:
            self.engine.allocator.state = state
            self._replace_all()
            return self.engine.step(self.step)

    def finish(self) -> dict[str, np.ndarray]:
        """Check that every replica agrees, snapshot, save and return the final model. Each phase
        goes to any live replica, and to new ones made from the snapshot if all have died."""
        self._surviving(self.engine.check_replicas, self.step - 1)
        self.writer.flush()
        if self.snapshot.step != self.step:
            self._surviving(self._take_snapshot)
        self.metrics.close()
        state = self._surviving(self.executor.call_any, "state_dict")
        save_model(self.run_dir, state, self.step, self.snapshot.hash)
        return state


RemoteCoordinator = ray.remote(Coordinator)
