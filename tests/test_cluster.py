"""What an operator uses: a real Ray head started with `ray start`, a job sent with `ray job submit
--working-dir`, and the cluster/ manifests, which must name the metrics the code exports."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flops_dist.metrics import RunMetrics
from flops_dist.runlog import read_log

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    """n distinct ports free now: all held open together, so none is handed out twice."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head of its own: `ray start --block` in a new session, stopped by signalling that session
    alone (`ray stop` would stop every Ray on the machine, other tests' and users' too).

    Every port is chosen here. `ray start --head` otherwise takes 10001 for its client server and
    52365 for its agent: another Ray on the machine holding 10001 makes the head exit at once, and
    one holding 52365 leaves it without the job agent that `ray job submit` needs."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, dashboard, client, agent = free_ports(4)
    output = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    with output.open("w") as log:
        head = subprocess.Popen([RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                                 "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                                 f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                                 "--num-cpus=2", "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while ray_job("list", "--address", address).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, \
                f"the Ray head did not start (exit code {head.poll()}); `ray start` printed:\n" \
                + output.read_text()[-4000:]
            time.sleep(2)
        yield address
    finally:
        stop_session(head)


def stop_session(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start` alone: it drains its node and stops what it started, in about 3 s.
    Signalling the whole session at once stopped the GCS first, and the drain waited out its 30 s
    timeout. Whatever of the session is left after is killed."""
    head.send_signal(signal.SIGTERM)  # nothing, if it has exited
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing of it is left
        pass


def ray_job(*args):
    # token authentication is on for this cluster; the client must say so (DESIGN §6)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([RAY, "job", *args], capture_output=True, text=True, env=env, timeout=300)


def submit_and_wait(address: str, job: Path, job_file: str, run_dir: Path, steps: int) -> str:
    """`ray job submit --working-dir JOB -- flops-dist train JOB_FILE`; waits, asserts success,
    returns the job's logs."""
    submission = f"flops-dist-{job_file.split('.')[0]}-{os.getpid()}"
    submit = ["submit", "--address", address, "--submission-id", submission, "--working-dir", str(job),
              "--no-wait", "--", sys.executable, "-m", "flops_dist.cli", "train", job_file,
              "--set", f"train.steps={steps}", "--set", "cluster.address=auto", "--set", "metrics.port=-1",
              "--set", "output.log_every=10", "--set", f"output.run_dir='{run_dir}'"]
    deadline = time.monotonic() + 120
    sent = ray_job(*submit)
    # the head answers before its node's job agent is up ("No available agent ... try again later")
    while sent.returncode != 0 and "No available agent" in sent.stderr and time.monotonic() < deadline:
        time.sleep(3)
        sent = ray_job(*submit)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    deadline, status = time.monotonic() + 400, ""
    while time.monotonic() < deadline:
        status = ray_job("status", "--address", address, submission).stdout
        if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
            break
        time.sleep(3)
    logs = ray_job("logs", "--address", address, submission).stdout
    assert "succeeded" in status.lower(), status + logs[-3000:]
    return logs


def test_ray_job_submit_runs_the_example_on_a_started_head(ray_head, tmp_path, digits_dir):
    job = tmp_path / "job"
    shutil.copytree(ROOT / "examples" / "digits", job, ignore=shutil.ignore_patterns("data"))
    shutil.copytree(digits_dir, job / "data")
    logs = submit_and_wait(ray_head, job, "digits.toml", tmp_path / "run", steps=20)
    assert "test accuracy after:" in logs and "step    20/20" in logs
    assert read_log(tmp_path / "run", "run_log").column("step").to_pylist() == list(range(20))


def test_ray_job_submit_runs_the_alignment_example(ray_head, tmp_path, alignment):
    # the black-box case: every worker loads the frozen MiniLM itself, on the cluster
    logs = submit_and_wait(ray_head, alignment, "alignment.toml", tmp_path / "run", steps=20)
    assert "2 workers" in logs and "test accuracy after:" in logs
    assert read_log(tmp_path / "run", "run_log").num_rows == 20


def exported_metric_names() -> set[str]:
    names = set()
    for family in RunMetrics().registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_grafana_dashboard_shows_every_exported_metric_and_nothing_else():
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"flops_[a-z_]+", target["expr"])}
    used = {re.sub(r"_bucket$", "", n) for n in used}
    assert used == exported_metric_names()


def test_manifests_parse_and_expose_the_metrics_port():
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert launcher["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert "CPU" in launcher["available_node_types"]["head"]["resources"]
    job, service = list(yaml.safe_load_all((ROOT / "cluster" / "rayjob.yaml").read_text()))
    assert job["kind"] == "RayJob"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 9500, "name": "flops-metrics"} in head["ports"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["env"]
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "metrics.port=9500" in job["spec"]["entrypoint"]
    assert service["spec"]["ports"][0]["port"] == 9500
    scrape = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    assert "127.0.0.1:9500" in scrape["scrape_configs"][0]["static_configs"][0]["targets"]
