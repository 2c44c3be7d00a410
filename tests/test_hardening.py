"""Issue #13: a run that cannot be turned against its user. Each bad input is refused with one line
naming the field, file or step, or recovered bit-identically; nothing is written outside the run dir."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from flops_dist.config import Config, ConfigError, TrainConfig
from flops_dist.data import ArrayDataset
from flops_dist.engine import Engine, LocalExecutor, TrainingStopped
from flops_dist.replica import NonFiniteUpdate, Replica, ReplicaSpec
from flops_dist.update import UpdateMessage
from models import blobs, build_mlp, cross_entropy


def run_local(steps=4, loss=cross_entropy, data=None, **train):
    cfg = TrainConfig(**{"steps": steps, "batch_size": 24, "sigma": 0.01, "learning_rate": 0.1, "chunk_size": 8,
                         **train})
    spec = ReplicaSpec(sigma=cfg.sigma, noise=cfg.noise, optimizer=cfg.optimizer_config(), embedding_module="1")
    data = data if data is not None else blobs()
    replica = Replica(build_mlp(), loss, data, spec)
    engine = Engine(cfg, LocalExecutor([replica]), data, replica.d)
    return replica, [engine.step(t).record for t in range(steps)]


def always_nan(outputs, labels):
    return torch.full((len(labels),), float("nan"))


# -- 6. θ stays finite, and so do the settings ---------------------------------------------------

@pytest.mark.parametrize("field,value", [("learning_rate", float("inf")), ("weight_decay", float("nan")),
                                         ("sigma", float("inf")), ("allocator_learning_rate", float("inf")),
                                         ("momentum", float("nan")), ("stop_dropped_fraction", float("nan"))])
def test_a_non_finite_setting_is_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^train.{field}: must be a finite number"):
        Config.from_dict({"train": {field: value}})


def test_a_negative_seed_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"^train.seed: must be at least 0, got -1"):
        Config.from_dict({"train": {"seed": -1}})


@pytest.mark.parametrize("value,message", [(0.0, "must be positive"), (1.5, "a fraction of a step's queries, at most 1")])
def test_stop_dropped_fraction_is_a_fraction(value, message):
    with pytest.raises(ConfigError, match=f"^train.stop_dropped_fraction: {message}"):
        Config.from_dict({"train": {"stop_dropped_fraction": value}})


def test_an_update_that_makes_theta_non_finite_is_refused_naming_the_step():
    replica = Replica(build_mlp(), cross_entropy, blobs(), ReplicaSpec())
    before = replica.theta.clone()
    overflow = UpdateMessage(0, 1.0, np.array([3], np.int64), np.array([1e300]))  # inf in float32
    with pytest.raises(NonFiniteUpdate, match="^step 0: the update would make θ or the optimizer state non-finite"):
        replica.apply(overflow)
    assert torch.equal(replica.theta, before) and replica.updates_applied == 0


def test_a_learning_rate_that_overflows_theta_stops_the_run_at_that_step():
    with pytest.raises(NonFiniteUpdate, match=r"^step \d+: .*learning rate 1e\+38.*Likely causes: a learning rate"):
        run_local(steps=20, learning_rate=1e38)


def test_a_loss_that_is_always_nan_stops_the_run_at_step_0():
    with pytest.raises(TrainingStopped, match=r"^step 0: 192 of 192 queries gave a NaN or inf loss"):
        run_local(loss=always_nan)


def test_stop_dropped_fraction_stops_a_run_that_drops_less_than_all():
    from models import nan_for_class_two  # about a third of the examples
    run_local(loss=nan_for_class_two)  # the default stops only when every query is dropped
    with pytest.raises(TrainingStopped, match=r"^step 0: .*train.stop_dropped_fraction = 0.1"):
        run_local(loss=nan_for_class_two, stop_dropped_fraction=0.1)


@pytest.mark.parametrize("allocator", ["flops", "uniform", "neyman", "bernoulli"])
def test_nan_inputs_are_dropped_and_counted_and_never_reach_the_allocator(allocator):
    data = blobs()
    inputs = data.inputs.copy()
    inputs[::10] = np.nan  # 10% of the rows
    replica, records = run_local(steps=6, data=ArrayDataset(inputs, data.labels), allocator=allocator)
    assert all(r.dropped_queries > 0 for r in records) and sum(r.dropped_examples for r in records) > 0
    assert torch.isfinite(replica.theta).all()


# -- 9. every write stays inside the run dir -----------------------------------------------------

def planted_link(tmp_path, at):
    """A symlink at `at` to a file outside the run dir, and that file's content."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(victim)
    return victim


def one_step_record(step):
    from flops_dist.record import StepRecord
    return StepRecord(step=step, loss=1.0, queries=2, dropped_queries=0, dropped_examples=0, allocation_min=1,
                      allocation_mean=1.0, allocation_max=1, allocation_gini=0.0, variance_proxy=0.0,
                      lambda_beta0=0.0, lambda_beta1=0.0, lambda_s=0.0, lambda_gamma=0.0, update_bytes=16, seconds=0.0)


def test_a_planted_link_at_a_temporary_log_file_is_replaced_not_followed(tmp_path):
    from flops_dist.runlog import RunLogWriter, read_log
    run_dir = tmp_path / "run"
    victim = planted_link(tmp_path, run_dir / "run_log" / "part-00000000-00000000.parquet.tmp")
    writer = RunLogWriter(run_dir)
    writer.append(one_step_record(0), UpdateMessage(0, 0.1, np.array([1]), np.array([0.5])), np.array([1, 1]), None)
    writer.flush()
    assert victim.read_text() == "precious"
    assert read_log(run_dir, "run_log").num_rows == 1
    assert not any(p.is_symlink() for p in (run_dir / "run_log").iterdir())


def test_a_planted_link_at_a_temporary_snapshot_is_replaced_not_followed(tmp_path):
    from flops_dist.runlog import Snapshot, save_snapshot
    run_dir = tmp_path / "run"
    victim = planted_link(tmp_path, run_dir / "snapshots" / "step-00000000.safetensors.tmp")
    save_snapshot(run_dir, Snapshot(0, {"theta": np.zeros(3, np.float32)}, "0" * 64))
    assert victim.read_text() == "precious"
    assert (run_dir / "snapshots" / "step-00000000.safetensors").stat().st_size > 0


def test_a_write_through_a_linked_folder_at_any_depth_is_refused(tmp_path):
    from flops_dist.runlog import write_atomically
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "updates").symlink_to(outside)
    (tmp_path / "run" / "a" / "b").symlink_to(outside)
    for relative in ("updates/part.parquet", "a/b/part.parquet"):
        with pytest.raises(ValueError, match="^output.run_dir: .* is a symbolic link or not a directory"):
            write_atomically(tmp_path / "run", relative, b"data")
    assert list(outside.iterdir()) == []


def test_a_run_dir_that_is_a_link_is_refused(tmp_path):
    from flops_dist.runlog import check_run_dir, write_atomically
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match="^output.run_dir: .*link is a symbolic link"):
        check_run_dir(tmp_path / "link")
    with pytest.raises(ValueError, match="^output.run_dir: .*link is a symbolic link or not a directory"):
        write_atomically(tmp_path / "link", "config.json", b"{}")
    assert list(real.iterdir()) == []


# -- a tiny job on the CLI, in this process, on one shared local Ray -----------------------------

@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


JOB = """
[model]
factory = "model.py:build_mlp"
loss = "model.py:cross_entropy"
[data]
train = "train.parquet"
input_column = "input"
metric = "loss"
[target]
embedding_module = "1"
[train]
steps = 4
batch_size = 24
chunk_size = 8
sigma = 0.01
learning_rate = 0.1
hash_every = 2
[cluster]
workers = 1
gpus_per_worker = "0"
[output]
run_dir = "run"
snapshot_every = 2
log_every = 2
[metrics]
port = -1
"""


def tiny_job(tmp_path) -> Path:
    """A job dir: tests/models.py as model.py, the blobs as Parquet, and job.toml."""
    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(Path(__file__).with_name("models.py"), job / "model.py")
    data = blobs()
    pq.write_table(pa.table({"input": data.inputs.tolist(), "label": data.labels}), job / "train.parquet")
    (job / "job.toml").write_text(JOB)
    return job


def cli(capsys, *args) -> tuple[int, str]:
    """flops-dist in this process: its exit status and its stderr."""
    from flops_dist.cli import main
    status = main(list(args))
    return status, capsys.readouterr().err


def tree(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what a run must leave alone."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_started_run(job: Path, run_dir: Path) -> None:
    """The config.json and sources.json a start records, without running it."""
    from flops_dist.loading import source_hashes
    cfg = Config.load(job / "job.toml", [f"output.run_dir='{run_dir}'"])
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run_dir / "sources.json").write_text(json.dumps(source_hashes(cfg)))


# -- 7. resume is safe ---------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["train.learning_rate=0.5", "train.seed=3", "train.allocator=uniform",
                                     "output.run_dir='elsewhere'"])
def test_resume_refuses_a_setting_that_would_change_the_logged_steps(tmp_path, capsys, setting):
    job = tiny_job(tmp_path)
    fake_started_run(job, tmp_path / "run")
    before = tree(tmp_path / "run")
    status, err = cli(capsys, "train", "--resume", str(tmp_path / "run"), "--set", setting)
    field = setting.split("=")[0]
    assert status == 2 and err.startswith(f"flops-dist: error: --set {field}: cannot change when a run resumes")
    assert err.count("\n") == 1
    assert tree(tmp_path / "run") == before


def test_the_api_refuses_to_resume_with_a_changed_setting(tmp_path):
    from flops_dist.loading import check_resume
    job = tiny_job(tmp_path)
    fake_started_run(job, tmp_path / "run")
    cfg = Config.load(job / "job.toml", [f"output.run_dir='{tmp_path / 'run'}'", "train.steps=9",
                                         "cluster.workers=2", "metrics.port=0", "output.log_every=3"])
    check_resume(cfg, tmp_path / "run")  # steps, cluster, metrics and output may change
    cfg.train.learning_rate = 0.5
    with pytest.raises(ConfigError, match="^train.learning_rate: cannot change when a run resumes"):
        check_resume(cfg, tmp_path / "run")


MARKER = """
import pathlib
pathlib.Path(__file__).with_name("ran").write_text("the file ran")
"""


@pytest.mark.parametrize("how", ["changed", "foreign"])
def test_resume_refuses_a_code_file_it_did_not_start_with_and_never_runs_it(tmp_path, capsys, how):
    job = tiny_job(tmp_path)
    fake_started_run(job, tmp_path / "run")
    if how == "changed":
        with open(job / "model.py", "a") as f:
            f.write(MARKER)
        expected = f"model.factory: {job / 'model.py'} has changed since this run started"
    else:
        (tmp_path / "evil.py").write_text(MARKER + "build_mlp = None\n")
        saved = json.loads((tmp_path / "run" / "config.json").read_text())
        saved["model"]["factory"] = f"{tmp_path / 'evil.py'}:build_mlp"
        (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
        expected = f"model.factory: {tmp_path / 'evil.py'} is not the file this run started with"
    status, err = cli(capsys, "train", "--resume", str(tmp_path / "run"))
    assert status == 2 and err.startswith(f"flops-dist: error: {expected}") and err.count("\n") == 1
    assert not (job / "ran").exists() and not (tmp_path / "ran").exists()


def test_a_copied_or_moved_run_resumes_into_itself_bit_identically(tmp_path, capsys, local_ray):
    job = tiny_job(tmp_path)
    assert cli(capsys, "train", str(job / "job.toml"), "--set", "train.steps=6",
               "--set", f"output.run_dir='{tmp_path / 'straight'}'")[0] == 0
    assert cli(capsys, "train", str(job / "job.toml"), "--set", f"output.run_dir='{tmp_path / 'orig'}'")[0] == 0
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    (tmp_path / "orig").rename(tmp_path / "moved")
    for name in ("copy", "moved"):
        status, err = cli(capsys, "train", "--resume", str(tmp_path / name), "--set", "train.steps=6")
        assert status == 0, err
        assert json.loads((tmp_path / name / "config.json").read_text())["output"]["run_dir"] == str(tmp_path / name)
        # the tensors, bit for bit (safetensors orders a header's metadata as its hash map does)
        resumed, straight = (load_file(str(tmp_path / d / "model.safetensors")) for d in (name, "straight"))
        assert resumed.keys() == straight.keys() and all((resumed[k] == straight[k]).all() for k in resumed)
    assert not (tmp_path / "orig").exists()


# -- 8. starts that fail leave nothing behind ----------------------------------------------------

def test_a_busy_metrics_port_leaves_nothing_and_the_same_command_runs_again(tmp_path, capsys, local_ray):
    import socket
    job = tiny_job(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    command = ["train", str(job / "job.toml"), "--set", f"metrics.port={port}"]
    status, err = cli(capsys, *command)
    assert status == 1 and f"metrics.port: 127.0.0.1:{port} is already in use" in err
    assert err.count("\n") == 1
    assert not (job / "run").exists()
    busy.close()
    status, err = cli(capsys, *command)
    assert status == 0, err


def test_a_bad_metrics_address_is_blamed_on_the_address_and_leaves_nothing(tmp_path, capsys, local_ray):
    job = tiny_job(tmp_path)
    status, err = cli(capsys, "train", str(job / "job.toml"), "--set", "metrics.address='no-such-host.invalid'",
                      "--set", "metrics.port=0")
    assert status == 1 and "metrics.address: cannot serve metrics on 'no-such-host.invalid'" in err
    assert err.count("\n") == 1
    assert not (job / "run").exists()


# -- 10. one line per error ----------------------------------------------------------------------

@pytest.mark.parametrize("source,expected", [
    ("def build_mlp(:\n", r"model.factory: .*model.py failed on import: SyntaxError: .*line 1\)"),
    ("import no_such_module_here\n", r"model.factory: .*model.py failed on import: ModuleNotFoundError: "
                                     r"No module named 'no_such_module_here' \(at model.py:1\)"),
    ("def build_mlp():\n    raise ValueError('no weights')\n",
     r"model.factory: .*model.py:build_mlp raised ValueError: no weights \(at model.py:2\)"),
])
def test_a_users_code_that_fails_is_one_line_naming_the_field_and_file(tmp_path, capsys, source, expected):
    job = tiny_job(tmp_path)
    (job / "model.py").write_text(source)
    status, err = cli(capsys, "train", str(job / "job.toml"))
    assert status == 2 and err.count("\n") == 1
    assert re.match(f"flops-dist: error: {expected} \\(traceback in .*\\.log\\)$", err), err


def test_a_loss_file_that_fails_on_import_is_one_line_in_a_real_process(tmp_path):
    job = tiny_job(tmp_path)
    (job / "loss.py").write_text("import no_such_module_here\n")
    out = subprocess.run([sys.executable, "-m", "flops_dist.cli", "train", str(job / "job.toml"), "--set",
                          "model.loss='loss.py:cross_entropy'"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(f"flops-dist: error: model.loss: {job / 'loss.py'} failed on import: "
                           "ModuleNotFoundError: No module named 'no_such_module_here' (at loss.py:1) (traceback in ")


def test_a_run_that_stops_is_one_line_with_its_traceback_in_the_run_dir(tmp_path, capsys, local_ray):
    job = tiny_job(tmp_path)
    status, err = cli(capsys, "train", str(job / "job.toml"), "--set", "model.loss='model.py:nan_for_class_two'",
                      "--set", "train.stop_dropped_fraction=0.1")
    log = job / "run" / "flops-dist.log"
    assert status == 1 and err.startswith("flops-dist: error: TrainingStopped: step 0: ")
    assert err.endswith(f"(traceback in {log})\n") and err.count("\n") == 1
    assert "train.stop_dropped_fraction = 0.1" in err and "in _stop_if_dropped" in log.read_text()  # the frames
    assert not (job / "run" / "model.safetensors").exists()
    status, err = cli(capsys, "train", str(job / "job.toml"))
    assert status == 1 and f"output.run_dir: {job / 'run'} already holds a run" in err
    assert err.count("\n") == 1


def test_a_dead_coordinator_points_to_resume():
    import ray
    from flops_dist.api import _training_error
    cfg = Config.from_dict({"output": {"run_dir": "/runs/a"}})
    error = _training_error(ray.exceptions.ActorDiedError(), cfg)
    assert str(error) == ("the coordinator died (ActorDiedError); the run can go on from its last snapshot: "
                          "flops-dist train --resume /runs/a")


def test_a_non_finite_theta_on_a_ray_worker_stops_the_run_naming_the_step(tmp_path, capsys, local_ray):
    job = tiny_job(tmp_path)
    status, err = cli(capsys, "train", str(job / "job.toml"), "--set", "train.learning_rate=1e38",
                      "--set", "train.steps=20")
    # θ may overflow to inf (refused by the replica) or stay finite and huge (then every loss is NaN): either
    # way the run stops, naming the step
    assert status == 1 and re.match(r"flops-dist: error: (NonFiniteUpdate: step \d+: the update would make θ|"
                                    r"TrainingStopped: step \d+: \d+ of \d+ queries gave a NaN)", err), err
    assert err.count("\n") == 1
    assert not (job / "run" / "model.safetensors").exists()
