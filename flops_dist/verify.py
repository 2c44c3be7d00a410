"""`flops-dist verify RUN_DIR`: check a run directory without changing it.

It checks every log segment (row checksums, no gaps), every snapshot (its tensors against its
stored hash), the final model (its content hash, and θ's hash against the last snapshot's), and
then replays the whole update log onto the base weights, comparing θ with every hash that a
snapshot, the run log or the model recorded. No Ray: the replay runs in this process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import Config
from .data import ArrayDataset
from .losses import PerExampleLoss
from .runlog import check_model, messages, parts_holding, recorded_hashes, scan_log, scan_snapshots


@dataclass(frozen=True)
class Mark:
    """A θ hash recorded at some point of the run: `hash` is θ before step `step`."""
    step: int
    hash: str
    source: str


def verify_run(run_dir: str | Path) -> tuple[list[str], str]:
    """Problems found (one line each), and a one-line summary of what was checked."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        return [f"{run_dir}: no config.json, so not a flops_dist run directory"], ""
    runs, run_damage = scan_log(run_dir, "run_log")
    updates, update_damage = scan_log(run_dir, "updates")
    snapshots, snapshot_damage = scan_snapshots(run_dir)
    problems = [str(d) for d in run_damage + update_damage + snapshot_damage]
    if runs.num_rows > updates.num_rows:
        problems.append(f"{run_dir / 'updates'}: holds {updates.num_rows} steps, but the run log holds "
                        f"{runs.num_rows}; the updates of the rest are missing")
    marks = [Mark(step, h, str(run_dir / "run_log")) for step, h in recorded_hashes(runs).items()]
    marks += [Mark(s.step, s.hash, str(run_dir / "snapshots" / f"step-{s.step:08d}.safetensors")) for s in snapshots]
    model_path = run_dir / "model.safetensors"
    if model_path.exists():
        meta, why = check_model(model_path)
        if why:
            problems.append(f"{model_path}: {why}")
        elif meta.get("hash"):
            marks.append(Mark(int(meta["step"]), meta["hash"], str(model_path)))
    problems += replay_problems(run_dir, updates, marks)
    summary = (f"{runs.num_rows} logged steps, {len(snapshots)} snapshots, "
               f"{'a final model' if model_path.exists() else 'no final model yet'}; the replay of the update "
               f"log met {sum(m.step <= updates.num_rows for m in marks)} recorded θ hashes")
    return problems, summary


def replay_problems(run_dir: Path, updates: pa.Table, marks: list[Mark]) -> list[str]:
    """Replay the update log onto the base weights; the first recorded hash it misses, if any."""
    try:
        replica = base_replica(run_dir)
    except Exception as e:  # the user's factory or weights no longer load: say so, do not crash
        return [f"{run_dir / 'config.json'}: cannot rebuild the base weights to replay the log "
                f"({type(e).__name__}: {e})"]
    pending = sorted((m for m in marks if m.step <= updates.num_rows), key=lambda m: m.step)
    logged = messages(updates)
    reached = 0
    for mark in pending:
        found = replica.replay(logged[reached:mark.step])
        if found != mark.hash:
            return [f"{parts_holding(run_dir, 'updates', reached, mark.step - 1)}: replaying steps {reached}-"
                    f"{mark.step - 1} gives θ hash {found[:12]}, but {mark.source} records {mark.hash[:12]} "
                    f"before step {mark.step}"]
        reached = mark.step
    return []


def base_replica(run_dir: Path):
    """A data-less replica of the run's model at its base weights, on the CPU."""
    from .api import build_model
    from .replica import Replica, ReplicaSpec
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    empty = ArrayDataset(np.zeros((0,), np.float32), np.zeros((0,), np.int64))
    replay_only = PerExampleLoss(lambda outputs, labels: None)  # no forward runs: replay and hash only
    return Replica(build_model(cfg), replay_only, empty, ReplicaSpec.from_config(cfg, device="cpu"))
