"""The run's durable state: the per-step run log, the seed-based update log, and θ snapshots.

Base weights plus the update log is a checkpoint. Every file is written whole to a temporary name
and renamed, so a crash mid-write leaves the previous state usable:
    run_log/part-FIRST-LAST.parquet   one row per step (metrics, allocation, allocator state)
    updates/part-FIRST-LAST.parquet   one row per step: U_t = (t, learning rate, seeds, coefficients)
    snapshots/step-T.safetensors      θ and optimizer state before step T (no pickle)
Nothing damaged is trusted. Every log row carries a SHA-256 checksum of its values, every snapshot
the hash of its θ and optimizer state, and the run log records θ's hash at every replica check, so
a replay of the update log can be checked against it. A segment or snapshot that fails any check is
set aside as *.corrupt with a warning naming it, and the run continues from the last good state
before it. `scan_log` and `scan_snapshots` only read: `flops-dist verify` uses them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from .update import UpdateMessage, state_hash

log = logging.getLogger("flops_dist")

RUN_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("loss", pa.float64()), ("queries", pa.int64()), ("dropped_queries", pa.int64()),
    ("allocation_min", pa.int64()), ("allocation_mean", pa.float64()), ("allocation_max", pa.int64()),
    ("allocation_gini", pa.float64()), ("variance_proxy", pa.float64()),
    ("lambda_beta0", pa.float64()), ("lambda_beta1", pa.float64()), ("lambda_s", pa.float64()),
    ("lambda_gamma", pa.float64()), ("update_bytes", pa.int64()), ("seconds", pa.float64()),
    ("allocation", pa.list_(pa.int32())),
    ("allocator_state", pa.struct([(name, pa.float64()) for name in ("beta0", "beta1", "log_s", "log_gamma", "adam_step")]
                                  + [("adam_m", pa.list_(pa.float64())), ("adam_v", pa.list_(pa.float64()))])),
    ("theta_hash", pa.string()),  # θ after this step's update, where the replicas were compared; else ""
    ("checksum", pa.string()),
])
UPDATE_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("learning_rate", pa.float64()),
    ("seeds", pa.list_(pa.int64())), ("coefficients", pa.list_(pa.float64())),
    ("checksum", pa.string()),
])
SCHEMAS = {"run_log": RUN_LOG_SCHEMA, "updates": UPDATE_LOG_SCHEMA}
_PART = re.compile(r"part-(\d{8})-(\d{8})\.parquet$")
_SNAPSHOT = re.compile(r"step-(\d{8})\.safetensors$")


class RunStateError(RuntimeError):
    """The run directory holds no usable state to resume from."""


@dataclass(frozen=True)
class Damage:
    path: Path
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


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


def set_aside(damage: Damage, notes: list[str] | None = None) -> None:
    """Rename a damaged file to *.corrupt, with a warning naming it (also appended to `notes`)."""
    note = (f"{damage.path} cannot be trusted ({damage.why}); set aside as {damage.path.name}.corrupt, "
            "continuing from the state before it")
    log.warning(note)
    if notes is not None:
        notes.append(note)
    os.replace(damage.path, damage.path.with_name(damage.path.name + ".corrupt"))


def row_checksums(table: pa.Table) -> list[str]:
    """SHA-256 of each row's values other than the checksum (JSON: floats round-trip exactly)."""
    rows = table.drop_columns(["checksum"]).to_pylist() if "checksum" in table.column_names else table.to_pylist()
    return [hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest() for row in rows]


class RunLogWriter:
    """Buffers rows and writes each flush as one new segment per log."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        for sub in ("run_log", "updates"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._run_rows: list[dict] = []
        self._update_rows: list[dict] = []

    def append(self, record: dict, msg: UpdateMessage, allocation: np.ndarray, allocator_state) -> None:
        """One step's rows; `allocator_state` is the allocator's state dataclass after the step, or None."""
        self._run_rows.append({**record, "allocation": allocation.astype(np.int32).tolist(),
                               "allocator_state": None if allocator_state is None else asdict(allocator_state),
                               "theta_hash": record.get("theta_hash", "")})
        self._update_rows.append({"step": msg.step, "learning_rate": msg.learning_rate,
                                  "seeds": msg.seeds.tolist(), "coefficients": msg.coefficients.tolist()})

    def flush(self) -> None:
        if not self._run_rows:
            return
        name = f"part-{self._run_rows[0]['step']:08d}-{self._run_rows[-1]['step']:08d}.parquet"
        # the update log first: a run-log row never exists without its update
        for sub, rows in (("updates", self._update_rows), ("run_log", self._run_rows)):
            table = pa.Table.from_pylist(rows, SCHEMAS[sub].remove(SCHEMAS[sub].get_field_index("checksum")))
            table = table.append_column("checksum", pa.array(row_checksums(table), pa.string()))
            write_atomically(self.run_dir / sub / name, lambda tmp: pq.write_table(table, tmp))
        self._run_rows, self._update_rows = [], []


def scan_log(run_dir: str | Path, sub: str) -> tuple[pa.Table, list[Damage]]:
    """The good prefix of run_log/ or updates/ in step order, and every segment past it with the
    reason it cannot be used (unreadable, a row failing its checksum, a gap before it). Reads only."""
    parts = sorted((int(m[1]), int(m[2]), p) for p in (Path(run_dir) / sub).glob("part-*.parquet")
                   if (m := _PART.search(p.name)))
    tables, damage, expected = [], [], 0
    for first, last, path in parts:
        if damage or first != expected:
            damage.append(Damage(path, f"it follows the last good step {expected - 1}"))
            continue
        table, why = _read_part(path, first, last, SCHEMAS[sub])
        if why:
            damage.append(Damage(path, why))
            continue
        tables.append(table)
        expected = last + 1
    return (pa.concat_tables(tables) if tables else SCHEMAS[sub].empty_table()), damage


def _read_part(path: Path, first: int, last: int, schema: pa.Schema) -> tuple[pa.Table | None, str]:
    try:
        table = pq.read_table(path, schema=schema)
    except (pa.ArrowInvalid, OSError) as e:
        return None, f"unreadable: {e}"
    if table.column("step").to_pylist() != list(range(first, last + 1)):
        return None, "its steps do not match its name"
    for step, stored, computed in zip(table.column("step").to_pylist(), table.column("checksum").to_pylist(),
                                      row_checksums(table)):
        if stored != computed:
            return None, f"the row of step {step} fails its checksum"
    return table, ""


def parts_holding(run_dir: str | Path, sub: str, first: int, last: int) -> str:
    """The names of a log's segments that hold any step in [first, last], for messages."""
    parts = [p for p in sorted((Path(run_dir) / sub).glob("part-*.parquet"))
             if (m := _PART.search(p.name)) and int(m[1]) <= last and int(m[2]) >= first]
    return ", ".join(str(p) for p in parts) or str(Path(run_dir) / sub)


def read_log(run_dir: str | Path, sub: str, notes: list[str] | None = None) -> pa.Table:
    """The good prefix of a log; segments that cannot be trusted are set aside (scan_log)."""
    table, damage = scan_log(run_dir, sub)
    for d in damage:
        set_aside(d, notes)
    return table


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


def recorded_hashes(runs: pa.Table) -> dict[int, str]:
    """θ hashes the run log recorded, keyed by the step they precede (θ before step t + 1)."""
    return {step + 1: h for step, h in zip(runs.column("step").to_pylist(), runs.column("theta_hash").to_pylist())
            if h}


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


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot whose tensors hash to the hash stored with them; ValueError says why not."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # a truncated or garbled file raises from inside safetensors
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
    m = _SNAPSHOT.search(path.name)
    if meta.get("format") != "flops_dist.snapshot.v1" or not m or meta.get("step") != str(int(m[1])) \
            or "theta" not in tensors:
        raise ValueError("not a flops_dist snapshot of the step in its name")
    found = state_hash(tensors["theta"], {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")})
    if found != meta.get("hash"):
        raise ValueError(f"its θ and optimizer state hash to {found[:12]}, not the {meta.get('hash', '')[:12]} "
                         "stored with them")
    return Snapshot(int(m[1]), tensors, meta["hash"])


def scan_snapshots(run_dir: str | Path) -> tuple[list[Snapshot], list[Damage]]:
    """Every snapshot that passes its hash check, newest first, and the damaged ones. Reads only."""
    good, damage = [], []
    for path in sorted((Path(run_dir) / "snapshots").glob("step-*.safetensors"), reverse=True):
        try:
            good.append(read_snapshot(path))
        except ValueError as e:
            damage.append(Damage(path, str(e)))
    return good, damage


def latest_snapshot(run_dir: str | Path, at_most: int, notes: list[str] | None = None) -> Snapshot | None:
    """The newest snapshot with step ≤ at_most that passes its hash check; damaged ones are set aside."""
    good, damage = scan_snapshots(run_dir)
    for d in damage:
        set_aside(d, notes)
    return next((snap for snap in good if snap.step <= at_most), None)


@dataclass
class Recovery:
    """What a resume starts from: the steps both logs hold intact, and the newest verified snapshot
    at or before them (None: the base weights, replayed from step 0)."""
    steps: int
    snapshot: Snapshot | None
    runs: pa.Table
    updates: pa.Table
    notes: list[str] = field(default_factory=list)  # what was set aside, for the user

    def replay(self, start: int, stop: int) -> list[UpdateMessage]:
        """U_start … U_(stop−1)."""
        return messages(self.updates, start)[:stop - start]

    def expected_hashes(self) -> dict[int, str]:
        """θ hashes that a replay must meet, keyed by the step they precede."""
        return recorded_hashes(self.runs)

    def allocator_state(self, step: int) -> dict | None:
        """The allocator's state before `step`, as logged (None at 0: a fresh allocator)."""
        return self.runs.column("allocator_state")[step - 1].as_py() if step else None


def recover(run_dir: str | Path) -> Recovery:
    """Read both logs, set aside what cannot be trusted, and cut them to the steps both hold."""
    notes: list[str] = []
    runs, updates = read_log(run_dir, "run_log", notes), read_log(run_dir, "updates", notes)
    steps = min(runs.num_rows, updates.num_rows)  # a step counts when both logs have it
    for sub in SCHEMAS:
        truncate_log(run_dir, sub, steps)
    snapshot = latest_snapshot(run_dir, steps, notes)
    return Recovery(steps, snapshot, runs.slice(0, steps), updates.slice(0, steps), notes)


def content_hash(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def save_model(run_dir: str | Path, state: dict[str, np.ndarray], step: int, theta_hash: str) -> Path:
    """model.safetensors, carrying θ's hash (the last snapshot's and run log's) and its own content hash."""
    path = Path(run_dir) / "model.safetensors"
    meta = {"format": "flops_dist.model.v1", "step": str(step), "hash": theta_hash,
            "content_sha256": content_hash(state)}
    write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return path


def check_model(path: Path) -> tuple[dict[str, str], str]:
    """The final model's metadata, and what is wrong with it ("" when nothing)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:
        return {}, f"unreadable: {type(e).__name__}: {e}"
    if meta.get("format") != "flops_dist.model.v1":
        return meta, "not a flops_dist model (no format, step and hash in its metadata)"
    if content_hash(tensors) != meta.get("content_sha256"):
        return meta, "its tensors do not match the content hash stored with them"
    return meta, ""
