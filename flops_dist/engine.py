"""The step loop's math, one process, no Ray: the spec that the distributed run must match bit for bit.

Step t (DESIGN §4): a deterministic batch, the clean forward (losses Φ and embeddings e), the
allocation (after a pilot round for neyman), the queries in fixed chunks, the estimate, the
allocator's learning, and the update message U_t applied on every replica.

An executor runs the replica verbs. `LocalExecutor` holds replicas in this process (several of
them emulate workers, sharded exactly as Ray would); the Ray runtime has its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .allocators import BatchFeatures, make_allocator, variance_objective
from .config import TrainConfig
from .estimators import QueryLosses, estimate
from .sharding import QueryChunks, assign_chunks, chunk_examples, gather_rows, plan_queries
from .update import UpdateMessage


class ReplicaDivergence(RuntimeError):
    """Two replicas hold different θ: the run stops rather than train on inconsistent state."""


def gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum()) - (n + 1) / n)


class LocalExecutor:
    """Runs the verbs on in-process replicas, dealing chunks over them like Ray workers."""

    def __init__(self, replicas):
        self.replicas = list(replicas)

    def _deal(self, n: int) -> list[np.ndarray]:
        return assign_chunks(np.ones(n), np.ones(len(self.replicas)))

    def clean_forward(self, rows: np.ndarray):
        losses = np.empty(rows.shape, np.float32)
        parts = {}
        for replica, idx in zip(self.replicas, self._deal(len(rows))):
            if len(idx):
                losses[idx], parts[tuple(idx)] = replica.clean_forward(rows[idx])
        return losses, gather_rows(len(rows), parts)

    def evaluate(self, chunks: QueryChunks) -> np.ndarray:
        losses = np.empty(chunks.examples.shape, np.float32)
        for replica, idx in zip(self.replicas, self._deal(len(chunks))):
            if len(idx):
                losses[idx] = replica.evaluate(chunks.take(idx))
        return losses

    def apply(self, msg: UpdateMessage) -> None:
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
    def __init__(self, cfg: TrainConfig, executor, n_examples: int, d: int):
        if cfg.batch_size > n_examples:
            raise ValueError(f"train.batch_size: {cfg.batch_size} exceeds the dataset's {n_examples} examples")
        self.cfg, self.executor, self.n_examples, self.d = cfg, executor, n_examples, d
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

    def _evaluate(self, start, stop, batch, seed_base) -> QueryLosses:
        cfg = self.cfg
        plan = plan_queries(start, stop, seed_base, cfg.unit, cfg.pairing == "shared", cfg.chunk_size)
        chunks = plan.chunks
        # chunks name batch positions; the replicas index the dataset
        losses = self.executor.evaluate(QueryChunks(batch[chunks.examples], chunks.seeds, chunks.signs,
                                                    chunks.index, chunks.shared))
        loss = np.empty(len(plan.example), np.float32)
        valid = chunks.index >= 0
        loss[chunks.index[valid]] = losses[valid]
        return QueryLosses(plan.example, plan.seed, plan.sign, loss)

    def step(self, t: int, batch: np.ndarray | None = None) -> StepOutcome:
        """Step t on batch(t), or on the given dataset indices: a benchmark pins a batch and varies t
        to draw new query seeds and allocations for the same examples."""
        cfg = self.cfg
        began = time.perf_counter()
        batch = self.batch(t) if batch is None else np.asarray(batch, np.int64)
        rows, pad = chunk_examples(batch, cfg.chunk_size)
        clean_rows, emb_rows = self.executor.clean_forward(rows)
        clean = clean_rows.reshape(-1)[:len(batch)].astype(np.float64)
        embeddings = emb_rows.reshape(-1, emb_rows.shape[-1])[:len(batch)]
        features = BatchFeatures(clean, embeddings)
        seed_base = int(np.random.default_rng([cfg.seed, t, 0]).integers(0, 2**61))
        alloc_rng = np.random.default_rng([cfg.seed, t, 1])
        zeros = np.zeros(len(batch), np.int64)
        rounds = []
        pilot = self.allocator.pilot_units
        if pilot:
            rounds.append(self._evaluate(zeros, zeros + pilot, batch, seed_base))
            features.pilot_c_hat = estimate(rounds[0], clean, cfg.estimator, cfg.sigma, self.d, cfg.noise).c_hat
        allocation = self.allocator.allocate(features, self.budget, self.a_min, alloc_rng)
        rounds.append(self._evaluate(zeros + pilot, allocation, batch, seed_base))
        queries = QueryLosses(*(np.concatenate([getattr(r, f) for r in rounds])
                                for f in ("example", "seed", "sign", "loss")))
        est = estimate(queries, clean, cfg.estimator, cfg.sigma, self.d, cfg.noise)
        self.allocator.learn(est.c_hat)
        msg = UpdateMessage(t, cfg.learning_rate, est.seeds, est.coefficients)
        self.executor.apply(msg)
        if cfg.hash_every and (t + 1) % cfg.hash_every == 0:
            self.check_replicas(t)
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
        }
        return StepOutcome(record, msg, allocation)

    def check_replicas(self, t: int) -> None:
        hashes = self.executor.hashes()
        if len(set(hashes)) > 1:
            listing = ", ".join(f"worker {i}: {h[:12]}" for i, h in enumerate(hashes))
            raise ReplicaDivergence(f"after step {t} the replicas' parameter hashes differ ({listing}); "
                                    "stopping before an inconsistent model is trained further")
