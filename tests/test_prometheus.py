"""A real Prometheus server scrapes a live run; promtool lints the exposition.

CI installs Debian's `prometheus` package (see .ci/run); elsewhere these tests skip without it.
"""
import os
import shutil
import socket
import subprocess
import time
from urllib.parse import quote
from urllib.request import urlopen

import json
import pytest
import ray

from test_ray import local_ray, make_config, start_coordinator  # noqa: F401  (the module's Ray)

needs = pytest.mark.skipif(shutil.which("prometheus") is None and os.environ.get("CI") != "true",
                           reason="Debian's prometheus is not installed (CI installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs
def test_promtool_finds_nothing_to_report(tmp_path):
    coordinator = start_coordinator(make_config(tmp_path, steps=3))
    try:
        url = ray.get(coordinator.info.remote())["metrics_url"]
        ray.get(coordinator.run.remote(3))
        with urlopen(url, timeout=10) as r:
            text = r.read()
    finally:
        ray.kill(coordinator)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert lint.returncode == 0 and lint.stdout == b"" and lint.stderr == b"", lint


@needs
def test_a_real_prometheus_scrapes_a_live_run(tmp_path):
    coordinator = start_coordinator(make_config(tmp_path, steps=5))
    prom = None
    try:
        target = ray.get(coordinator.info.remote())["metrics_url"].split("//")[1].split("/")[0]
        ray.get(coordinator.run.remote(5))
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n"
            f"  - job_name: flops_dist\n    static_configs:\n      - targets: ['{target}']\n")
        port = free_port()
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        query = f"http://127.0.0.1:{port}/api/v1/query?query=" + quote('flops_queries_total{job="flops_dist"}')
        deadline, value = time.monotonic() + 60, None
        while time.monotonic() < deadline and value is None:
            time.sleep(1)
            try:
                with urlopen(query, timeout=5) as r:
                    result = json.load(r)["data"]["result"]
                value = float(result[0]["value"][1]) if result else None
            except OSError:
                continue  # the server is still starting
        assert value == 5 * 24 * 8
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        ray.kill(coordinator)
