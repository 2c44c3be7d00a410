"""`flops-dist train` as a user runs it: a subprocess, a TOML file, a real local Ray."""
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

from flops_dist.runlog import read_log

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


def flops_dist(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flops_dist.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def job_dir(tmp_path, digits_dir):
    """The digits example with its data, as a user would lay it out."""
    shutil.copytree(EXAMPLE, tmp_path / "digits", ignore=shutil.ignore_patterns("data"))
    shutil.copytree(digits_dir, tmp_path / "digits" / "data")
    return tmp_path / "digits"


def test_digits_job_trains_and_reports_accuracy(tmp_path, digits_dir):
    job = job_dir(tmp_path, digits_dir)
    out = flops_dist("train", str(job / "digits.toml"), "--set", "train.steps=30", "--set",
                     f"output.run_dir='{tmp_path / 'run'}'", "--set", "output.log_every=10",
                     "--set", "metrics.port=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test accuracy before: 0." in out.stdout and "test accuracy after:  0." in out.stdout
    assert "step    30/30" in out.stdout
    assert "metrics at http://127.0.0.1:" in out.stdout
    assert read_log(tmp_path / "run", "run_log").num_rows == 30


def test_bad_config_is_one_clear_line(tmp_path, digits_dir):
    job = job_dir(tmp_path, digits_dir)
    out = flops_dist("train", str(job / "digits.toml"), "--set", "train.allocator=magic")
    assert out.returncode == 2
    assert out.stderr.strip() == ("flops-dist: error: train.allocator: unknown value 'magic'; "
                                  "choose one of uniform, neyman, bernoulli, flops")
    out = flops_dist("train", str(job / "digits.toml"), "--set", "data.label_column='digit'")
    assert out.returncode == 2 and "missing label column 'digit'" in out.stderr
    assert "Traceback" not in out.stderr
    out = flops_dist("train", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_resume_extends_a_run_bit_identically(tmp_path, digits_dir):
    job = job_dir(tmp_path, digits_dir)
    common = ["--set", "output.snapshot_every=4", "--set", "metrics.port=-1", "--set", "cluster.workers=1"]
    straight = flops_dist("train", str(job / "digits.toml"), "--set", "train.steps=10",
                          "--set", f"output.run_dir='{tmp_path / 'straight'}'", *common)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = flops_dist("train", str(job / "digits.toml"), "--set", "train.steps=6",
                       "--set", f"output.run_dir='{tmp_path / 'resumed'}'", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    again = flops_dist("train", str(job / "digits.toml"), "--set", f"output.run_dir='{tmp_path / 'resumed'}'", *common)
    assert again.returncode == 1 and "already holds a run" in again.stderr
    resumed = flops_dist("train", "--resume", str(tmp_path / "resumed"), "--set", "train.steps=10")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 6" in resumed.stdout
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert read_log(tmp_path / "resumed", "run_log").column("step").to_pylist() == list(range(10))
