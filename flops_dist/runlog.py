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

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save

from .record import StepRecord, record_columns
from .update import UpdateMessage, state_hash

log = logging.getLogger("flops_dist")

_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string()}
RUN_LOG_SCHEMA = pa.schema([(name, _ARROW[kind]) for name, kind in record_columns()] + [
    ("allocation", pa.list_(pa.int32())),
    ("allocator_state", pa.struct([(name, pa.float64()) for name in ("beta0", "beta1", "log_s", "log_gamma", "adam_step")]
                                  + [("adam_m", pa.list_(pa.float64())), ("adam_v", pa.list_(pa.float64()))])),
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


WRITTEN = ("config.json", "sources.json", "model.safetensors", "run.png", "flops-dist.log", "run_log", "updates",
           "snapshots")


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a run directory whose files would land outside it (a symlink pointing away, or a
    file where the directory should be). write_atomically enforces the same at every depth."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise ValueError(f"output.run_dir: {run_dir} is a symbolic link; give the directory itself")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"output.run_dir: {run_dir} exists and is not a directory")
    root = run_dir.resolve()
    for name in WRITTEN:
        target = (run_dir / name).resolve()
        if target != root / name:
            raise ValueError(f"output.run_dir: {run_dir / name} resolves to {target}, outside the run "
                             "directory; refusing to write there")


def holds_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in ("config.json", "updates", "snapshots"))


def _open_nofollow(name: str, flags: int, dir_fd: int | None, shown: Path) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ValueError(f"output.run_dir: {shown} is a symbolic link or not a directory; refusing to "
                             "write through it") from None
        raise


def _open_folder(run_dir: Path, folders: tuple[str, ...]) -> int:
    """A descriptor of run_dir/folders…, each made where missing and opened without following a link."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _open_nofollow(str(run_dir), os.O_RDONLY | os.O_DIRECTORY, None, run_dir)
    for i, name in enumerate(folders):
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, dir_fd=fd)
        try:
            inner = _open_nofollow(name, os.O_RDONLY | os.O_DIRECTORY, fd, run_dir.joinpath(*folders[:i + 1]))
        finally:
            os.close(fd)
        fd = inner
    return fd


def write_atomically(run_dir: str | Path, relative: str, data: bytes) -> Path:
    """Write run_dir/relative whole: to a temporary file created anew (O_EXCL), then renamed over
    the target. No link is followed at any depth below run_dir, so nothing lands outside it."""
    run_dir, rel = Path(run_dir), Path(relative)
    fd = _open_folder(run_dir, rel.parts[:-1])
    try:
        tmp = rel.name + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=fd)  # a stale or planted one; unlink never follows a link
        out = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, fd, run_dir / rel.parent / tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, rel.name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    return run_dir / rel


def append_text(run_dir: str | Path, name: str, text: str) -> Path:
    """Append to run_dir/name, following no link (the run's log of tracebacks)."""
    fd = _open_folder(Path(run_dir), ())
    try:
        out = _open_nofollow(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, fd, Path(run_dir) / name)
        with os.fdopen(out, "a") as f:
            f.write(text)
    finally:
        os.close(fd)
    return Path(run_dir) / name


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=False)  # seeds never repeat: trying a dictionary cost 5× the write
    return sink.getvalue().to_pybytes()


def set_aside(damage: Damage, notes: list[str] | None = None) -> None:
    """Rename a damaged file to *.corrupt, with a warning naming it (also appended to `notes`)."""
    note = (f"{damage.path} cannot be trusted ({damage.why}); set aside as {damage.path.name}.corrupt, "
            "continuing from the state before it")
    log.warning(note)
    if notes is not None:
        notes.append(note)
    os.replace(damage.path, damage.path.with_name(damage.path.name + ".corrupt"))


def row_checksums(table: pa.Table, lists_as_json: bool = False) -> list[str]:
    """SHA-256 of each row's values other than the checksum: the JSON of its values (floats
    round-trip exactly), in which each list column's value is the SHA-256 of its little-endian
    bytes, so that a step's thousands of seeds and coefficients are hashed, not printed (printing
    them cost the coordinator about 6 ms a step). `lists_as_json`: the lists printed too, as logs
    written before this change were checked."""
    table = table.drop_columns(["checksum"]) if "checksum" in table.column_names else table
    lists = [] if lists_as_json else [f.name for f in table.schema if pa.types.is_list(f.type)]
    rows = table.drop_columns(lists).to_pylist()
    for name in lists:
        column = table.column(name).combine_chunks()
        values, offsets = column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()
        values = values.astype(values.dtype.newbyteorder("<"), copy=False)
        for row, start, stop in zip(rows, offsets[:-1], offsets[1:]):
            row[name] = hashlib.sha256(values[start:stop].tobytes()).hexdigest()
    return [hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest() for row in rows]


def _list_column(arrays: list[np.ndarray], kind: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays), kind))


class RunLogWriter:
    """Buffers rows and writes each flush as one new segment per log, in the caller's thread or in
    the background (`flush(wait=False)`); either way a segment is written whole before the next."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)  # its folders are made by the first flush, not before
        self._run_rows: list[dict] = []
        self._messages: list[UpdateMessage] = []
        self._writing: Future | None = None  # the segment being written in the background
        self._thread: ThreadPoolExecutor | None = None

    def append(self, record: StepRecord, msg: UpdateMessage, allocation: np.ndarray, allocator_state) -> None:
        """One step's rows; `allocator_state` is the allocator's state dataclass after the step, or None."""
        self._run_rows.append({**asdict(record), "allocation": allocation.astype(np.int32).tolist(),
                               "allocator_state": None if allocator_state is None else asdict(allocator_state)})
        self._messages.append(msg)

    def flush(self, wait: bool = True) -> None:
        """Write the rows buffered so far. wait=False: in a background thread, so the run goes on
        (100 steps of the main job's updates took 60-350 ms to write); the next flush, or wait(),
        waits for it and raises what went wrong."""
        self.wait()
        rows, msgs, self._run_rows, self._messages = self._run_rows, self._messages, [], []
        if not rows:
            return
        if wait:
            self._write(rows, msgs)
            return
        self._thread = self._thread or ThreadPoolExecutor(1, thread_name_prefix="run-log")
        self._writing = self._thread.submit(self._write, rows, msgs)

    def wait(self) -> None:
        """Until the segment being written in the background is on disk."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _write(self, rows: list[dict], msgs: list[UpdateMessage]) -> None:
        name = f"part-{rows[0]['step']:08d}-{rows[-1]['step']:08d}.parquet"
        updates = pa.table([pa.array([m.step for m in msgs], pa.int64()),
                            pa.array([m.learning_rate for m in msgs], pa.float64()),
                            _list_column([m.seeds for m in msgs], pa.int64()),
                            _list_column([m.coefficients for m in msgs], pa.float64())],
                           schema=_without_checksum("updates"))
        runs = pa.Table.from_pylist(rows, _without_checksum("run_log"))
        # the update log first: a run-log row never exists without its update
        for sub, table in (("updates", updates), ("run_log", runs)):
            table = table.append_column("checksum", pa.array(row_checksums(table), pa.string()))
            write_atomically(self.run_dir, f"{sub}/{name}", parquet_bytes(table))


def _without_checksum(sub: str) -> pa.Schema:
    return SCHEMAS[sub].remove(SCHEMAS[sub].get_field_index("checksum"))


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
        table = pq.read_table(path, schema=schema)  # a column added since the part was written reads as nulls
        written = table.select([name for name in pq.read_schema(path).names if name in schema.names])
    except (pa.ArrowInvalid, OSError) as e:
        return None, f"unreadable: {e}"
    if table.column("step").to_pylist() != list(range(first, last + 1)):
        return None, "its steps do not match its name"
    stored, legacy = table.column("checksum").to_pylist(), None
    for i, (step, computed) in enumerate(zip(table.column("step").to_pylist(), row_checksums(written))):
        if stored[i] != computed:
            legacy = legacy or row_checksums(written, lists_as_json=True)  # a log written before lists were hashed
            if stored[i] != legacy[i]:
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
            write_atomically(run_dir, f"{sub}/part-{first:08d}-{steps - 1:08d}.parquet", parquet_bytes(kept))
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
    meta = {"step": str(snap.step), "hash": snap.hash, "format": "flops_dist.snapshot.v1"}
    path = write_atomically(run_dir, f"snapshots/step-{snap.step:08d}.safetensors", save(snap.tensors, metadata=meta))
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
    meta = {"format": "flops_dist.model.v1", "step": str(step), "hash": theta_hash,
            "content_sha256": content_hash(state)}
    return write_atomically(run_dir, "model.safetensors", save(state, metadata=meta))


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
