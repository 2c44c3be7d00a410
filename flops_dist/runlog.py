"""The run's durable state: the per-step run log, the seed-based update log, and θ snapshots.

Base weights plus the update log is a checkpoint. Every file is written whole to a temporary name
and renamed, so a crash mid-write leaves the previous state usable:
    run_log/part-FIRST-LAST.parquet   one row per step (metrics, allocation, allocator state)
    updates/part-FIRST-LAST.parquet   one row per step: U_t = (t, learning rate, seeds, coefficients)
    snapshots/step-T.safetensors      θ and optimizer state before step T (no pickle)
A segment or snapshot that cannot be read is set aside as *.corrupt with a warning naming it, and
the run continues from the last good state before it.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from .update import UpdateMessage

log = logging.getLogger("flops_dist")

RUN_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("loss", pa.float64()), ("queries", pa.int64()), ("dropped_queries", pa.int64()),
    ("allocation_min", pa.int64()), ("allocation_mean", pa.float64()), ("allocation_max", pa.int64()),
    ("allocation_gini", pa.float64()), ("variance_proxy", pa.float64()),
    ("lambda_beta0", pa.float64()), ("lambda_beta1", pa.float64()), ("lambda_s", pa.float64()),
    ("lambda_gamma", pa.float64()), ("update_bytes", pa.int64()), ("seconds", pa.float64()),
    ("allocation", pa.list_(pa.int32())), ("allocator_state", pa.list_(pa.float64())),
])
UPDATE_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("learning_rate", pa.float64()),
    ("seeds", pa.list_(pa.int64())), ("coefficients", pa.list_(pa.float64())),
])
_PART = re.compile(r"part-(\d{8})-(\d{8})\.parquet$")
_SNAPSHOT = re.compile(r"step-(\d{8})\.safetensors$")


class RunStateError(RuntimeError):
    """The run directory holds no usable state to resume from."""


WRITTEN = ("config.json", "model.safetensors", "run.png", "run_log", "updates", "snapshots")


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a run directory whose files would land outside it (a symlink pointing away, or a
    file where the directory should be)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"output.run_dir: {run_dir} exists and is not a directory")
    root = run_dir.resolve()
    for name in WRITTEN:
        target = (run_dir / name).resolve()
        if target != root / name:
            raise ValueError(f"output.run_dir: {run_dir / name} resolves to {target}, outside the run "
                             "directory; refusing to write there")


def write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _set_aside(path: Path, why: str) -> None:
    log.warning("%s is unreadable (%s); set aside as %s.corrupt, continuing from the state before it",
                path, why, path.name)
    os.replace(path, path.with_name(path.name + ".corrupt"))


class RunLogWriter:
    """Buffers rows and writes each flush as one new segment per log."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        for sub in ("run_log", "updates"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._run_rows: list[dict] = []
        self._update_rows: list[dict] = []

    def append(self, record: dict, msg: UpdateMessage, allocation: np.ndarray, allocator_state: list[float]) -> None:
        self._run_rows.append({**record, "allocation": allocation.astype(np.int32).tolist(),
                               "allocator_state": list(allocator_state)})
        self._update_rows.append({"step": msg.step, "learning_rate": msg.learning_rate,
                                  "seeds": msg.seeds.tolist(), "coefficients": msg.coefficients.tolist()})

    def flush(self) -> None:
        if not self._run_rows:
            return
        name = f"part-{self._run_rows[0]['step']:08d}-{self._run_rows[-1]['step']:08d}.parquet"
        # the update log first: a run-log row never exists without its update
        for sub, rows, schema in (("updates", self._update_rows, UPDATE_LOG_SCHEMA),
                                  ("run_log", self._run_rows, RUN_LOG_SCHEMA)):
            table = pa.Table.from_pylist(rows, schema)
            write_atomically(self.run_dir / sub / name, lambda tmp: pq.write_table(table, tmp))
        self._run_rows, self._update_rows = [], []


def read_log(run_dir: str | Path, sub: str) -> pa.Table:
    """All readable segments of run_log/ or updates/ in step order, stopping at a gap or a corrupt one."""
    schema = RUN_LOG_SCHEMA if sub == "run_log" else UPDATE_LOG_SCHEMA
    parts = sorted((int(m[1]), int(m[2]), p) for p in (Path(run_dir) / sub).glob("part-*.parquet")
                   if (m := _PART.search(p.name)))
    tables, expected = [], 0
    for first, last, path in parts:
        if first != expected:
            break
        try:
            table = pq.read_table(path, schema=schema)
        except (pa.ArrowInvalid, OSError) as e:
            _set_aside(path, str(e))
            break
        if table.column("step").to_pylist() != list(range(first, last + 1)):
            _set_aside(path, "its steps do not match its name")
            break
        tables.append(table)
        expected = last + 1
    for first, _, path in parts:  # segments after a gap or a corrupt one cannot be used
        if first >= expected and path.exists():
            _set_aside(path, f"it follows the last good step {expected - 1}")
    return pa.concat_tables(tables) if tables else schema.empty_table()


def truncate_log(run_dir: str | Path, sub: str, steps: int) -> None:
    """Keep steps < `steps`: later segments go, a segment that straddles is rewritten shorter."""
    for path in sorted((Path(run_dir) / sub).glob("part-*.parquet")):
        m = _PART.search(path.name)
        first, last = int(m[1]), int(m[2])
        if first >= steps:
            path.unlink()
        elif last >= steps:
            kept = pq.read_table(path).slice(0, steps - first)
            write_atomically(path.with_name(f"part-{first:08d}-{steps - 1:08d}.parquet"),
                             lambda tmp: pq.write_table(kept, tmp))
            path.unlink()


def messages(updates: pa.Table, start: int = 0) -> list[UpdateMessage]:
    rows = updates.filter(pc.greater_equal(updates.column("step"), start)).to_pylist()
    return [UpdateMessage(r["step"], r["learning_rate"], np.array(r["seeds"], np.int64),
                          np.array(r["coefficients"], np.float64)) for r in rows]


@dataclass
class Snapshot:
    step: int                      # θ before this step: updates 0..step−1 are in it
    tensors: dict[str, np.ndarray]  # "theta" and "opt.<name>"
    hash: str


def save_snapshot(run_dir: str | Path, snap: Snapshot, keep: int = 3) -> Path:
    folder = Path(run_dir) / "snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{snap.step:08d}.safetensors"
    meta = {"step": str(snap.step), "hash": snap.hash, "format": "flops_dist.snapshot.v1"}
    write_atomically(path, lambda tmp: save_file(snap.tensors, str(tmp), metadata=meta))
    for old in sorted(folder.glob("step-*.safetensors"))[:-keep]:
        old.unlink()
    return path


def latest_snapshot(run_dir: str | Path, at_most: int) -> Snapshot | None:
    """The newest readable snapshot with step ≤ at_most."""
    folder = Path(run_dir) / "snapshots"
    found = sorted(((int(m[1]), p) for p in folder.glob("step-*.safetensors") if (m := _SNAPSHOT.search(p.name))),
                   reverse=True)
    for step, path in found:
        if step > at_most:
            continue
        try:
            from safetensors import safe_open
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            if meta.get("format") != "flops_dist.snapshot.v1" or int(meta["step"]) != step or "theta" not in tensors:
                raise ValueError("not a flops_dist snapshot of that step")
        except Exception as e:  # a truncated file raises from inside safetensors
            _set_aside(path, f"{type(e).__name__}: {e}")
            continue
        return Snapshot(step, tensors, meta["hash"])
    return None
