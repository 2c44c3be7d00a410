"""The step loop's math, one process, no Ray: the spec that the distributed run must match bit for bit.

Step t (DESIGN §4): a deterministic batch, the clean forward (losses Φ and embeddings e), the
allocation (after a pilot round for neyman), the queries in fixed chunks, the estimate, the
allocator's learning, and the update message U_t applied on every replica.

An executor runs the replica verbs. `LocalExecutor` holds replicas in this process (several of
them emulate workers, sharded exactly as Ray would); the Ray runtime has its own.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import numpy as np

from .allocators import BatchFeatures, make_allocator, variance_objective
from .config import TrainConfig
from .estimators import QueryLosses, estimate
from .sharding import QueryChunks, assign_chunks, chunk_costs, chunk_examples, gather_rows, plan_queries
from .update import UpdateMessage


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
    depend on the dealing; subclasses say only how replicas are called (`_scatter`)."""
    noise_cost = 0.0  # noise generation per seed, in forward-equivalents: the chunk cost model's weight

    def clean_forward(self, rows: np.ndarray, batch) -> tuple[np.ndarray, np.ndarray]:
        """Every replica takes the step's batch (an ArrayDataset); losses [n, C] and embeddings
        [n, C, m] at θ for chunks of positions in it."""
        losses = np.empty(rows.shape, np.float32)
        parts = {}

        def store(items, value):
            losses[items], parts[tuple(items)] = value

        self._scatter("clean_forward", np.full(len(rows), float(rows.shape[1])), lambda items: (batch, rows[items]),
                      store, everyone=True)
        return losses, gather_rows(len(rows), parts)

    def evaluate(self, chunks: QueryChunks) -> np.ndarray:
        """Losses [n, C] of the perturbed queries."""
        losses = np.empty(chunks.examples.shape, np.float32)

        def store(items, value):
            losses[items] = value

        self._scatter("evaluate", chunk_costs(chunks, self.noise_cost), lambda items: (chunks.take(items),), store)
        return losses

    @abc.abstractmethod
    def _scatter(self, method: str, costs: np.ndarray, take, store, everyone: bool = False) -> None:
        """Call `method(*take(items))` on the replicas, each with the items dealt to it (`everyone`:
        also those dealt none), and `store(items, result)` for every non-empty one."""

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

    def _scatter(self, method, costs, take, store, everyone=False) -> None:
        for replica, items in zip(self.replicas, assign_chunks(costs, np.ones(len(self.replicas)))):
            if len(items) or everyone:
                value = getattr(replica, method)(*take(items))
                if len(items):
                    store(items, value)

    def queue_update(self, msg: UpdateMessage) -> None:
        for replica in self.replicas:
            replica.apply(msg)

    def hashes(self) -> list[str]:
        return [r.hash() for r in self.replicas]


@dataclass
class StepOutcome:
    record: dict          # one row of the run log
    message: UpdateMessage
    allocation: np.ndarray


class Engine:
    def __init__(self, cfg: TrainConfig, executor: Executor, data, d: int):
        """`data` hands out rows by index (an ArrayDataset or a ParquetSource)."""
        if cfg.batch_size > len(data):
            raise ValueError(f"train.batch_size: {cfg.batch_size} exceeds the dataset's {len(data)} examples")
        self.cfg, self.executor, self.data, self.d = cfg, executor, data, d
        self.n_examples = len(data)
        self.budget = cfg.batch_size * cfg.queries_per_example // cfg.unit
        self.a_min = cfg.min_queries // cfg.unit
        self.allocator = make_allocator(cfg.allocator, pilot_units=self.a_min,
                                        learning_rate=cfg.allocator_learning_rate)

    def batch(self, t: int) -> np.ndarray:
        """Batch t: slice t of a per-epoch permutation seeded by (run seed, epoch)."""
        per_epoch = self.n_examples // self.cfg.batch_size
        epoch, i = divmod(t, per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch, 2]).permutation(self.n_examples)
        return perm[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]

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
        """Step t on batch t (or on the example indices `batch`, to pin one)."""
        cfg = self.cfg
        began = time.perf_counter()
        batch = self.batch(t) if batch is None else np.asarray(batch, np.int64)
        rows, pad = chunk_examples(np.arange(len(batch)), cfg.chunk_size)
        clean_rows, emb_rows = self.executor.clean_forward(rows, self.data.rows(batch))
        clean = clean_rows.reshape(-1)[:len(batch)].astype(np.float64)
        embeddings = emb_rows.reshape(-1, emb_rows.shape[-1])[:len(batch)]
        features = BatchFeatures(clean, embeddings)
        seed_base = int(np.random.default_rng([cfg.seed, t, 0]).integers(0, 2**61))
        alloc_rng = np.random.default_rng([cfg.seed, t, 1])
        zeros = np.zeros(len(batch), np.int64)
        rounds = []
        pilot = self.allocator.pilot_units
        if pilot:
            rounds.append(self._evaluate(zeros, zeros + pilot, seed_base))
            features.pilot_c_hat = estimate(rounds[0], clean, cfg.estimator, cfg.sigma, self.d, cfg.noise).c_hat
        allocation, ask = self.allocator.allocate(features, self.budget, self.a_min, alloc_rng)
        rounds.append(self._evaluate(zeros + pilot, allocation, seed_base))
        queries = QueryLosses(*(np.concatenate([getattr(r, f) for r in rounds])
                                for f in ("example", "seed", "sign", "loss")))
        est = estimate(queries, clean, cfg.estimator, cfg.sigma, self.d, cfg.noise)
        self.allocator.learn(ask, est.c_hat)
        msg = UpdateMessage(t, cfg.learning_rate, est.seeds, est.coefficients)
        self.executor.queue_update(msg)
        theta_hash = self.check_replicas(t) if cfg.hash_every and (t + 1) % cfg.hash_every == 0 else ""
        used = est.units_used > 0
        n_used = max(int(used.sum()), 1)
        lam = self.allocator.parameters()
        record = {
            "step": t,
            "loss": float(np.nanmean(np.where(np.isfinite(clean), clean, np.nan))) if np.isfinite(clean).any() else float("nan"),
            "queries": int(len(queries.loss)),
            "dropped_queries": est.dropped_queries,
            "allocation_min": int(allocation.min()),
            "allocation_mean": float(allocation.mean()),
            "allocation_max": int(allocation.max()),
            "allocation_gini": gini(allocation),
            "variance_proxy": variance_objective(np.nan_to_num(est.c_hat[used]), allocation[used]) / n_used**2,
            **{f"lambda_{k}": float(lam.get(k, np.nan)) for k in ("beta0", "beta1", "s", "gamma")},
            "update_bytes": msg.nbytes,
            "seconds": time.perf_counter() - began,
            "theta_hash": theta_hash,
        }
        return StepOutcome(record, msg, allocation)

    def check_replicas(self, t: int) -> str:
        """The replicas' common θ hash after step t; stops the run if they differ."""
        hashes = self.executor.hashes()
        if len(set(hashes)) > 1:
            listing = ", ".join(f"worker {i}: {h[:12]}" for i, h in enumerate(hashes))
            raise ReplicaDivergence(f"after step {t} the replicas' parameter hashes differ ({listing}); "
                                    "stopping before an inconsistent model is trained further")
        return hashes[0]
