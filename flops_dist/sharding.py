"""A step's query list, cut into fixed chunks, and chunks dealt to workers by a cost model.

Batch invariance: a forward's last bits can depend on which rows share its batch, so every query
is evaluated inside a chunk of exactly C rows whose boundaries depend only on the allocation (the
last chunk is padded with copies of its last row). Whole chunks go to workers and losses are put
back by query index, so 1 worker, 2 workers or a re-sharded step compute the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXAMPLE_STRIDE = 1 << 20  # independent pairing: seed = base + j·stride + k, unique while A_j < 2**20
NAMED_BASE = 1 << 40      # a base that is a multiple of this lets a seed name its example (example_of_seed)


def seed_base_naming_examples(base: int) -> int:
    """The base with its low 40 bits cleared: then seed = base + j·stride + k gives back j."""
    return base - base % NAMED_BASE


def example_of_seed(seeds: np.ndarray) -> np.ndarray:
    """j of independent-pairing seeds drawn from a seed_base_naming_examples base (j, k < 2**20)."""
    return (np.asarray(seeds, np.int64) % NAMED_BASE) // EXAMPLE_STRIDE


@dataclass(frozen=True)
class QueryChunks:
    """Chunks of C queries: rows are chunks. `index` maps each cell to the query's position in the
    step's canonical order, −1 for padding."""
    examples: np.ndarray  # int64 [n, C]
    seeds: np.ndarray     # int64 [n, C]
    signs: np.ndarray     # int8 [n, C]
    index: np.ndarray     # int64 [n, C]
    shared: bool          # every chunk holds one perturbation applied to C examples

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, rows: np.ndarray) -> "QueryChunks":
        return QueryChunks(self.examples[rows], self.seeds[rows], self.signs[rows], self.index[rows], self.shared)

    def to_send(self, rows: np.ndarray) -> "QueryChunks":
        """These rows as a replica needs them: no index (the caller puts results back), examples as
        int32 (batch positions). Ray passes an argument over 100 KB through its object store, which
        a worker's share of 4,096 queries would otherwise cross."""
        return QueryChunks(self.examples[rows].astype(np.int32), self.seeds[rows], self.signs[rows],
                           np.zeros((len(rows), 0), np.int64), self.shared)


@dataclass(frozen=True)
class QueryPlan:
    example: np.ndarray  # int64 [Q] canonical order: by example, unit, then + before −
    seed: np.ndarray     # int64 [Q]
    sign: np.ndarray     # int8 [Q]
    chunks: QueryChunks


def _pad_to_chunks(values: list[np.ndarray], chunk: int):
    n = len(values[0])
    rows = -(-n // chunk)
    pad = rows * chunk - n
    out = []
    for v in values:
        out.append(np.concatenate([v, np.repeat(v[-1:], pad)]).reshape(rows, chunk))
    return out, pad


def chunk_examples(examples: np.ndarray, chunk: int) -> tuple[np.ndarray, int]:
    """Example indices -> [n, C] rows for the clean forward, and the number of padding cells."""
    (rows,), pad = _pad_to_chunks([np.asarray(examples, np.int64)], chunk)
    return rows, pad


def plan_queries(start: np.ndarray, stop: np.ndarray, seed_base: int, unit: int, shared: bool,
                 chunk: int) -> QueryPlan:
    """Queries for units k ∈ [start_j, stop_j) of every example j. A unit is one query (+) or a
    (+, −) pair sharing a seed. Seeds: base + k (shared) or base + j·stride + k (independent)."""
    start, stop = np.asarray(start, np.int64), np.asarray(stop, np.int64)
    counts = stop - start
    example_of_unit = np.repeat(np.arange(len(start)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + start[example_of_unit]
    seed_of_unit = seed_base + k if shared else seed_base + example_of_unit * EXAMPLE_STRIDE + k
    signs = np.array([1, -1][:unit], np.int8)
    example = np.repeat(example_of_unit, unit)
    seed = np.repeat(seed_of_unit, unit)
    sign = np.tile(signs, len(example_of_unit))
    k_of_query = np.repeat(k, unit)
    position = np.arange(len(example))
    if not len(example):
        empty = np.zeros((0, chunk), np.int64)
        return QueryPlan(example, seed, sign, QueryChunks(empty, empty, empty.astype(np.int8), empty, shared))
    if not shared:
        (ex, sd, sg, ix), pad = _pad_to_chunks([example, seed, sign, position], chunk)
        if pad:
            ix[-1, chunk - pad:] = -1
        return QueryPlan(example, seed, sign, QueryChunks(ex, sd, sg, ix, False))
    # shared: one group per (unit k, sign), each cut into its own padded chunks
    groups = []
    for kk in np.unique(k_of_query):
        for s in signs:
            sel = position[(k_of_query == kk) & (sign == s)]
            (ex, sd, sg, ix), pad = _pad_to_chunks([example[sel], seed[sel], sign[sel], sel], chunk)
            if pad:
                ix[-1, chunk - pad:] = -1
            groups.append((ex, sd, sg, ix))
    ex, sd, sg, ix = (np.concatenate(parts) for parts in zip(*groups))
    return QueryPlan(example, seed, sign, QueryChunks(ex, sd, sg, ix, True))


def chunk_costs(chunks: QueryChunks, noise_cost: float) -> np.ndarray:
    """Cost in forward-equivalents: C forwards plus noise generation per distinct seed."""
    per_chunk_seeds = 1 if chunks.shared else chunks.seeds.shape[1]
    return np.full(len(chunks), chunks.seeds.shape[1] + noise_cost * per_chunk_seeds, np.float64)


def assign_chunks(costs: np.ndarray, speeds: np.ndarray, group: np.ndarray | None = None,
                  holder: np.ndarray | None = None, group_cost: float = 0.0) -> list[np.ndarray]:
    """Longest-processing-time greedy: each chunk, largest first, goes to the worker that would
    finish it soonest given its measured speed. With groups (chunk c needs group[c], which worker
    holder[g] already has, −1 none), see `_assign_by_group`. Deterministic; any assignment gives
    the same bits."""
    speeds = np.asarray(speeds, np.float64)
    if group is not None:
        return _assign_by_group(np.asarray(costs, np.float64), speeds, np.asarray(group), np.asarray(holder), group_cost)
    finish = np.zeros(len(speeds))
    owner = np.empty(len(costs), np.int64)
    for c in np.argsort(-costs, kind="stable"):
        w = int(np.argmin(finish + costs[c] / speeds))
        owner[c] = w
        finish[w] += costs[c] / speeds[w]
    return [np.nonzero(owner == w)[0] for w in range(len(speeds))]


def _assign_by_group(costs, speeds, group, holder, group_cost) -> list[np.ndarray]:
    """Each chunk goes to the holder of its group (an unheld group's chunks, by least load); then
    the most loaded worker hands its last chunks to the least loaded while that shortens the step.
    A worker pays `group_cost` once for each group it did not hold, so groups are split rarely."""
    n = len(speeds)
    owner = np.array([holder[g] if 0 <= g < len(holder) and 0 <= holder[g] < n else -1 for g in group], np.int64)
    load = np.array([costs[owner == w].sum() / speeds[w] for w in range(n)])
    held = {(int(holder[g]), int(g)) for g in set(group.tolist()) if 0 <= g < len(holder) and 0 <= holder[g] < n}
    for c in np.nonzero(owner < 0)[0]:
        owner[c] = int(np.argmin(load + (costs[c] + group_cost) / speeds))
        load[owner[c]] += (costs[c] + group_cost * ((owner[c], group[c]) not in held)) / speeds[owner[c]]
        held.add((int(owner[c]), int(group[c])))
    while n > 1:
        hi, lo = int(np.argmax(load)), int(np.argmin(load))
        c = int(np.nonzero(owner == hi)[0][-1])
        extra = 0.0 if (lo, int(group[c])) in held else group_cost
        after_hi, after_lo = load[hi] - costs[c] / speeds[hi], load[lo] + (costs[c] + extra) / speeds[lo]
        if max(after_hi, after_lo) >= load[hi]:
            break
        owner[c], load[hi], load[lo] = lo, after_hi, after_lo
        held.add((lo, int(group[c])))
    return [np.nonzero(owner == w)[0] for w in range(n)]


def gather_rows(n_rows: int, parts: dict[tuple, np.ndarray]) -> np.ndarray:
    """Per-worker results, keyed by the row indices each worker was dealt, back in row order."""
    first = next(iter(parts.values()))
    out = np.empty((n_rows,) + first.shape[1:], first.dtype)
    for rows, values in parts.items():
        out[list(rows)] = values
    return out
