"""The step loop's math, one process, no Ray: the spec that the distributed run must match bit for bit.

Step t (DESIGN §4): a deterministic batch, the clean forward (losses Φ and embeddings e), the
allocation (after a pilot round for neyman), the queries in fixed chunks, the estimate, the
allocator's learning, and the update message U_t applied on every replica.

An executor runs the replica verbs. `LocalExecutor` holds replicas in this process (several of
them emulate workers, sharded exactly as Ray would); the Ray runtime has its own.
"""
from __future__ import annotations

import abc
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .allocators import (BatchFeatures, make_allocator, project_to_budget, shared_variance_objective,
                         variance_objective)
from .config import TrainConfig, require_batch_fits
from .estimators import QueryLosses, estimate, shared_unit_scores
from .record import LAMBDA_NAMES, StepRecord
from .sharding import (QueryChunks, assign_chunks, chunk_costs, chunk_examples, gather_rows, plan_queries,
                       seed_base_naming_examples)
from .update import UpdateMessage


class TrainingStopped(RuntimeError):
    """A step whose result cannot be trusted: the message names the step and the likely cause."""


class ReplicaDivergence(RuntimeError):
    """Two replicas hold different θ: the run stops rather than train on inconsistent state."""


def gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum()) - (n + 1) / n)


class Executor(abc.ABC):
    """The replica verbs over a set of replicas. Each phase's items (rows of examples, chunks of
    queries) are dealt out whole and their results put back by item index, so the bits do not
    depend on the dealing; subclasses say only how replicas are called (`_scatter`).

    With frozen-prefix reuse a replica holds the prefix outputs of the clean rows it ran, so a query
    chunk is dealt, where the load allows, to the replica that ran its examples' clean forward; a
    chunk whose examples span clean rows that another replica ran is sent their prefix outputs,
    which that replica's clean forward returned, rather than have them run again."""
    noise_cost = 0.0  # noise generation per seed, in forward-equivalents: the chunk cost model's weight
    prefix_reuse = False
    sends_ahead = False  # whether it has send_clean_forward: start the next step's clean forward, on the θ
                         # after the update queued before it, for `clean_forward(..., sent)` to collect
    clean_owner = (1, np.zeros(0, np.int64))  # (rows per clean chunk, the replica that ran each)
    prefix_outputs: dict = {}  # clean chunk -> its prefix outputs, from the replica that ran it

    def clean_forward(self, rows: np.ndarray, batch, sent=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every replica takes the step's batch (an ArrayDataset); losses [n, C], embeddings
        [n, C, m] and the variance scales κ [n, C] at θ for chunks of positions in it. `sent`: what
        `send_clean_forward` returned for these rows and batch."""
        losses, kappa = np.empty(rows.shape, np.float32), np.empty(rows.shape)
        parts, self.prefix_outputs = {}, {}

        def store(items, value):
            losses[items], parts[tuple(items)], kappa[items], prefix = value
            self.prefix_outputs.update(prefix or {})

        owner = self._scatter("clean_forward", *self._clean_calls(rows, batch), store, everyone=True, sent=sent)
        self.clean_owner = (rows.shape[1], owner)
        return losses, gather_rows(len(rows), parts), kappa

    @staticmethod
    def _clean_calls(rows: np.ndarray, batch):
        """(the cost of each chunk of rows, its call's arguments by items and replica)."""
        return np.full(len(rows), float(rows.shape[1])), lambda items, w: (batch, rows[items])

    def evaluate(self, chunks: QueryChunks) -> np.ndarray:
        """Losses [n, C] of the perturbed queries."""
        losses = np.empty(chunks.examples.shape, np.float32)

        def store(items, value):
            losses[items] = value

        groups = None
        if self.prefix_reuse and len(chunks):  # a chunk needs the clean rows of its first example
            per_chunk, holder = self.clean_owner
            groups = (chunks.examples[:, 0] // per_chunk, holder, float(per_chunk))
        self._scatter("evaluate", chunk_costs(chunks, self.noise_cost),
                      lambda items, w: (chunks.to_send(items), self._prefix_not_held(chunks, items, w)), store,
                      groups=groups)
        return losses

    def _prefix_not_held(self, chunks: QueryChunks, items: np.ndarray, w: int) -> dict | None:
        """The prefix outputs that replica w needs for these chunks and did not compute itself."""
        if not self.prefix_outputs:
            return None
        per_chunk, holder = self.clean_owner
        needed = np.unique(chunks.examples[items] // per_chunk)
        return {i: self.prefix_outputs[i] for i in needed.tolist() if holder[i] != w} or None

    @abc.abstractmethod
    def _scatter(self, method: str, costs: np.ndarray, take, store, everyone: bool = False,
                 groups=None, sent=None) -> np.ndarray:
        """Call `method(*take(items, replica))` on the replicas, each with the items dealt to it (`everyone`:
        also those dealt none), and `store(items, result)` for every non-empty one. Returns the
        replica that answered for each item; `groups` = (group, holder, group_cost) steers the
        dealing (assign_chunks). `sent`: these calls, already made by a send_* verb."""

    @abc.abstractmethod
    def queue_update(self, msg: UpdateMessage) -> None:
        """Every replica applies U_t before anything else it is asked."""

    @abc.abstractmethod
    def hashes(self) -> list[str]:
        """Every replica's parameter hash."""


class LocalExecutor(Executor):
    """In-process replicas, dealt chunks like Ray workers; an update is applied at once."""

    def __init__(self, replicas):
        self.replicas = list(replicas)
        self.prefix_reuse = any(r.forward.prefix is not None for r in self.replicas)

    def _scatter(self, method, costs, take, store, everyone=False, groups=None, sent=None) -> np.ndarray:
        owner = np.zeros(len(costs), np.int64)
        dealt = assign_chunks(costs, np.ones(len(self.replicas)), *(groups or ()))
        for w, (replica, items) in enumerate(zip(self.replicas, dealt)):
            if len(items) or everyone:
                value = getattr(replica, method)(*take(items, w))
                if len(items):
                    store(items, value)
                    owner[items] = w
        return owner

    def queue_update(self, msg: UpdateMessage) -> None:
        for replica in self.replicas:
            replica.apply(msg)

    def hashes(self) -> list[str]:
        return [r.hash() for r in self.replicas]


@dataclass
class StepOutcome:
    record: StepRecord    # one row of the run log
    message: UpdateMessage
    allocation: np.ndarray


class Engine:
    def __init__(self, cfg: TrainConfig, executor: Executor, data, d: int):
        """`data` hands out rows by index (an ArrayDataset or a ParquetSource)."""
        require_batch_fits(cfg.batch_size, len(data))
        self.cfg, self.executor, self.data, self.d = cfg, executor, data, d
        self.n_examples = len(data)
        self._next_clean = None  # (step, batch, its rows, the clean forward sent for it) or None
        # the data is read in a thread of its own, the next step's batch while this one runs (a Parquet
        # source decodes row groups outside the GIL: on 100x the main job's data, ~8 ms a step)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="batch-reader")
        self._rows_ahead = None  # (step, batch, the Future of its rows) or None
        self._last_end = 0.0
        self._permutation = (-1, None)  # (epoch, its permutation)
        self.budget = cfg.batch_size * cfg.queries_per_example // cfg.unit
        self.a_min = cfg.min_queries // cfg.unit
        self.allocator = make_allocator(cfg.allocator, pilot_units=self.a_min, reuse_pilot=cfg.neyman_pilot == "reuse",
                                        learning_rate=cfg.allocator_learning_rate,
                                        **({"frozen": tuple(cfg.allocator_frozen)} if cfg.allocator_frozen else {}))

    def batch(self, t: int) -> np.ndarray:
        """Batch t: slice t of a per-epoch permutation seeded by (run seed, epoch)."""
        per_epoch = self.n_examples // self.cfg.batch_size
        epoch, i = divmod(t, per_epoch)
        if self._permutation[0] != epoch:  # one permutation of the whole set per epoch, made once
            self._permutation = (epoch, np.random.default_rng([self.cfg.seed, epoch, 2]).permutation(self.n_examples))
        return self._permutation[1][i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]

    def _evaluate(self, start, stop, seed_base) -> QueryLosses:
        cfg = self.cfg
        plan = plan_queries(start, stop, seed_base, cfg.unit, cfg.pairing == "shared", cfg.chunk_size)
        chunks = plan.chunks  # they name positions in the batch, which every replica holds
        losses = self.executor.evaluate(chunks)
        loss = np.empty(len(plan.example), np.float32)
        valid = chunks.index >= 0
        loss[chunks.index[valid]] = losses[valid]
        return QueryLosses(plan.example, plan.seed, plan.sign, loss)

    def step(self, t: int, batch: np.ndarray | None = None) -> StepOutcome:
        """Step t on batch(t), or on the given dataset indices: a benchmark pins a batch and varies t
        to draw new query seeds and allocations for the same examples."""
        cfg, began, pinned = self.cfg, time.perf_counter(), batch is not None
        batch = self.batch(t) if batch is None else np.asarray(batch, np.int64)
        if not pinned and t + 1 < cfg.steps:
            self._read_ahead(t + 1)
        sent = self._take_sent_clean_forward(t, batch)
        if sent is not None:
            began = self._last_end  # this step's work began when the last one sent its clean forward
        features = self._clean_forward(None if pinned else t, batch, sent)
        usable = np.isfinite(features.losses) & np.isfinite(features.embeddings).all(axis=1)
        seed_base = int(np.random.default_rng([cfg.seed, t, 0]).integers(0, 2**61))
        if cfg.noise_space == "outputs":  # each replica finds a seed's example from the seed alone
            seed_base = seed_base_naming_examples(seed_base)
        allocation, ask, queries, spent = self._spend_queries(features, usable, seed_base, t)
        est = self._estimate(queries, features)
        self._stop_if_dropped(t, est.dropped_queries, len(queries.loss))
        msg = UpdateMessage(t, cfg.learning_rate, est.seeds, est.coefficients)
        self.executor.queue_update(msg)  # first: Ray's replicas apply it while the allocator learns
        if self.executor.sends_ahead and not pinned and t + 1 < cfg.steps:  # then the next batch's clean forward
            self._send_clean_forward(t + 1, self.batch(t + 1))
        scores = self._shared_scores(queries, features)
        if usable.any():
            common = None if scores is None else scores[usable][:, :allocation[usable].min()]
            self.allocator.learn(ask, est.c_hat[usable], common)
        theta_hash = self.check_replicas(t) if cfg.hash_every and (t + 1) % cfg.hash_every == 0 else ""
        self._last_end = time.perf_counter()
        record = self._record(t, features, usable, allocation, spent, est, self._variance_proxy(est, scores), msg,
                              theta_hash, self._last_end - began)
        return StepOutcome(record, msg, allocation)

    @contextlib.contextmanager
    def off_the_clock(self):
        """Work between steps (held-out scoring) that the next step's seconds must not count."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._last_end += time.perf_counter() - began

    def _spend_queries(self, features: BatchFeatures, usable: np.ndarray, seed_base: int, t: int):
        """The allocation, its ask, the queries the estimate uses, and how many queries were spent:
        a pilot round first where the allocator has one, its ĉ in `features`, then the rest."""
        zeros = np.zeros(len(usable), np.int64)
        pilot = zeros + self.allocator.pilot_units
        rounds = [self._evaluate(zeros, pilot, seed_base)] if self.allocator.pilot_units else []
        if rounds:
            features.pilot_c_hat = self._estimate(rounds[0], features).c_hat
        allocation, ask = self._allocate(features, usable, np.random.default_rng([self.cfg.seed, t, 1]))
        rounds.append(self._evaluate(pilot, allocation, seed_base))
        spent = sum(len(r.loss) for r in rounds)
        if not self.allocator.reuses_pilot:
            rounds = rounds[1:]  # the pilot chose the allocation; reusing it would bias ĝ
        queries = QueryLosses(*(np.concatenate([getattr(r, f) for r in rounds])
                                for f in ("example", "seed", "sign", "loss")))
        return allocation, ask, queries, spent

    def _clean_rows(self, n: int) -> np.ndarray:
        """Positions in a batch of n, in chunks. A chunk never holds more rows than the batch:
        padding would be wasted forwards."""
        size = self.cfg.clean_chunk_size or self.cfg.chunk_size
        return chunk_examples(np.arange(n), min(size, n))[0]

    def _send_clean_forward(self, t: int, batch: np.ndarray) -> None:
        rows, data = self._clean_rows(len(batch)), self._rows(t, batch)
        self._next_clean = (t, batch, data, self.executor.send_clean_forward(rows, data))

    def _read_ahead(self, t: int) -> None:
        """Start reading batch t's rows, for `_rows` to collect."""
        batch = self.batch(t)
        if self._rows_ahead is None or self._rows_ahead[0] != t:
            self._rows_ahead = (t, batch, self._reader.submit(self.data.rows, batch))

    def _rows(self, t: int | None, batch: np.ndarray):
        """The dataset's rows of this batch: read ahead where they were (step t, the same batch)."""
        ahead = self._rows_ahead
        if ahead is not None and ahead[0] == t and np.array_equal(ahead[1], batch):
            return ahead[2].result()
        return self._reader.submit(self.data.rows, batch).result()  # one thread reads the source

    def _take_sent_clean_forward(self, t: int, batch: np.ndarray):
        """(the batch's rows, the clean forward sent for them) if one was sent for step t on this batch."""
        sent, self._next_clean = self._next_clean, None
        if sent is None or sent[0] != t or not np.array_equal(sent[1], batch):
            return None
        return sent[2], sent[3]

    def _clean_forward(self, t: int | None, batch: np.ndarray, sent=None) -> BatchFeatures:
        """Every replica takes the batch's rows; clean losses Φ and embeddings e of its examples."""
        rows = self._clean_rows(len(batch))
        data, sent = sent or (self._rows(t, batch), None)
        clean_rows, emb_rows, kappa = self.executor.clean_forward(rows, data, sent)
        return BatchFeatures(clean_rows.reshape(-1)[:len(batch)].astype(np.float64),
                             emb_rows.reshape(-1, emb_rows.shape[-1])[:len(batch)],
                             kappa=kappa.reshape(-1)[:len(batch)])

    def _estimate(self, queries: QueryLosses, features: BatchFeatures):
        cfg = self.cfg
        # the replicas' κ_j: κ(d) in weight space, the example's own in output space (outputs.py)
        return estimate(queries, features.losses, cfg.estimator, cfg.sigma, self.d, cfg.noise, features.kappa)

    def _allocate(self, features: BatchFeatures, usable: np.ndarray, rng):
        """A_j ≥ A_min with Σ A_j = N. An example with a non-finite clean loss or embedding gets
        A_min and never reaches the allocator (its kernel's linear algebra would not survive it)."""
        if usable.all():
            return self.allocator.allocate(features, self.budget, self.a_min, rng)
        if not usable.any():
            return project_to_budget(np.ones(len(usable)), self.budget, self.a_min), None
        # an example kept from the allocator still gets a unit beyond a pilot that the estimate discards
        fixed = self.a_min + (0 if self.allocator.reuses_pilot else 1)
        allocation = np.full(len(usable), fixed, np.int64)
        budget = self.budget - fixed * int((~usable).sum())
        allocation[usable], ask = self.allocator.allocate(features.subset(usable), budget, self.a_min, rng)
        return allocation, ask

    def _shared_scores(self, queries: QueryLosses, features: BatchFeatures) -> np.ndarray | None:
        """z_jk = √κ Δ_jk/σ by (example, unit) under shared pairing, whose products across examples
        estimate their estimates' covariance; None for independent pairing, which has none."""
        cfg = self.cfg
        if cfg.pairing != "shared":
            return None
        return shared_unit_scores(queries, features.losses, cfg.estimator, cfg.sigma, self.d, cfg.noise)

    @staticmethod
    def _variance_proxy(est, scores: np.ndarray | None) -> float:
        """V̂(A)/B'² over the B' examples in the estimate, A_j the units it averaged (a discarded
        pilot's and dropped ones do not count), with the pairing's objective."""
        used = est.units_used > 0
        c, units = np.nan_to_num(est.c_hat[used]), est.units_used[used]
        if scores is None or not used.any():
            return variance_objective(c, units) / max(used.sum(), 1)**2
        return float(shared_variance_objective(c, units, scores[used][:, :units.min()])) / used.sum()**2

    def _stop_if_dropped(self, t: int, dropped: int, total: int) -> None:
        if dropped and dropped >= self.cfg.stop_dropped_fraction * total:
            raise TrainingStopped(
                f"step {t}: {dropped} of {total} queries gave a NaN or inf loss (train.stop_dropped_fraction "
                f"= {self.cfg.stop_dropped_fraction}); the loss or the data produce non-finite values")

    def _record(self, t, features, usable, allocation, n_queries, est, variance_proxy, msg, theta_hash,
                seconds) -> StepRecord:
        lam = self.allocator.parameters()
        kept = allocation[usable] if usable.any() else allocation
        return StepRecord(
            step=t, loss=float(features.losses[usable].mean()) if usable.any() else float("nan"),
            queries=n_queries,
            dropped_queries=est.dropped_queries, dropped_examples=int((~usable).sum()),
            allocation_min=int(kept.min()), allocation_mean=float(kept.mean()), allocation_max=int(kept.max()),
            allocation_gini=gini(kept),
            variance_proxy=variance_proxy,
            **{f"lambda_{k}": float(lam.get(k, np.nan)) for k in LAMBDA_NAMES},
            update_bytes=msg.nbytes, seconds=seconds, theta_hash=theta_hash)

    def check_replicas(self, t: int) -> str:
        """The replicas' common θ hash after step t; stops the run if they differ."""
        hashes = self.executor.hashes()
        if len(set(hashes)) > 1:
            listing = ", ".join(f"worker {i}: {h[:12]}" for i, h in enumerate(hashes))
            raise ReplicaDivergence(f"after step {t} the replicas' parameter hashes differ ({listing}); "
                                    "stopping before an inconsistent model is trained further")
        return hashes[0]
