"""The distributed path on a real local Ray: it must match the local reference step bit for bit."""

import numpy as np
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from flops_dist.api import ship_by_value, train
from flops_dist.config import Config
from flops_dist.coordinator import RemoteCoordinator
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec
from flops_dist.runlog import read_log
from flops_dist.targets import Target
from flops_dist.data import ParquetSource
from models import FrozenNetLoss, blobs, build_mlp, build_projection, cross_entropy, write_parquet


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # two fake GPUs: placement is tested for real, the forwards still run on the CPU
    ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


def make_config(tmp_path, workers=2, steps=12, **train_fields):
    cfg = Config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.chunk_size = steps, 24, 8
    cfg.train.sigma, cfg.train.learning_rate, cfg.train.hash_every = 0.01, 0.1, 4
    for k, v in train_fields.items():
        setattr(cfg.train, k, v)
    cfg.target.embedding_module = "1"
    cfg.cluster.workers, cfg.cluster.gpus_per_worker = workers, "0"
    cfg.output.run_dir, cfg.output.log_every = str(tmp_path / f"run{workers}"), 5
    cfg.metrics.port = 0  # any free port: tests run side by side
    return cfg.validate()


def reference_steps(cfg):
    """The local reference: its replica before the first step and after each step (one object)."""
    spec = ReplicaSpec(sigma=cfg.train.sigma, noise=cfg.train.noise, optimizer=cfg.train.optimizer_config(),
                       embedding_module=cfg.target.embedding_module)
    replica = Replica(build_mlp(), cross_entropy, blobs(), spec)
    engine = Engine(cfg.train, LocalExecutor([replica]), blobs(), replica.d)
    yield replica
    for t in range(cfg.train.steps):
        engine.step(t)
        yield replica


def reference_theta(cfg):
    *_, replica = reference_steps(cfg)
    return replica.theta


def trained_theta(model):
    return Target.select(model, "all").flatten(model)


@pytest.mark.parametrize("train_fields", [dict(allocator="flops"),
                                          dict(allocator="flops", pairing="shared", optimizer="adam")],
                         ids=["flops", "flops-shared-adam"])  # neyman refuses shared noise (config.py)
def test_two_ray_workers_match_the_local_reference_bit_for_bit(tmp_path, train_fields):
    cfg = make_config(tmp_path, **train_fields)
    result = train(build_mlp(), cross_entropy, blobs(), cfg, progress=lambda line: None)
    assert torch.equal(trained_theta(result.model), reference_theta(cfg))


def test_an_update_rides_with_the_next_clean_forward_sent_before_the_allocator_learns(tmp_path):
    """One call per worker per phase: U_t goes with step t+1's clean forward, sent before the allocator
    learns, and only the last update goes alone (to the final hash check). θ matches the local reference."""
    from flops_dist.coordinator import RayExecutor
    from flops_dist.worker import RemoteWorker
    cfg = make_config(tmp_path, steps=6, hash_every=0)
    spec = ReplicaSpec(sigma=cfg.train.sigma, noise=cfg.train.noise, optimizer=cfg.train.optimizer_config(),
                       embedding_module=cfg.target.embedding_module)
    ship_by_value(build_mlp(), cross_entropy)
    events = []

    class Recording(RayExecutor):
        def _send(self, method, *args):
            events.append(method)
            return super()._send(method, *args)

        def flush(self):
            events.extend(["apply alone"] if self.unsent is not None else [])
            super().flush()

    workers = [RemoteWorker.options(num_cpus=0).remote(build_mlp(), cross_entropy, blobs(), spec) for _ in range(2)]
    executor = Recording(workers)
    engine = Engine(cfg.train, executor, blobs(), Replica(build_mlp(), cross_entropy, blobs(), spec).d)
    learn = engine.allocator.learn
    engine.allocator.learn = lambda *args: (events.append("learn"), learn(*args))[1]
    for t in range(cfg.train.steps):
        engine.step(t)
    hashes = executor.hashes()
    for w in workers:
        ray.kill(w)
    steps = ["evaluate", "clean_forward", "learn"] * 5 + ["evaluate", "learn"]
    assert events == ["clean_forward"] + steps + ["apply alone"]
    reference = Replica(build_mlp(), cross_entropy, blobs(), spec)
    local = Engine(cfg.train, LocalExecutor([reference]), blobs(), reference.d)
    for t in range(cfg.train.steps):
        local.step(t)
    assert hashes == [reference.hash()] * 2


def test_one_and_two_workers_give_bit_identical_models(tmp_path):
    one = train(build_mlp(), cross_entropy, blobs(), make_config(tmp_path, workers=1), progress=lambda l: None)
    two = train(build_mlp(), cross_entropy, blobs(), make_config(tmp_path, workers=2), progress=lambda l: None)
    for name, value in one.model.state_dict().items():
        assert torch.equal(value, two.model.state_dict()[name]), name


def test_three_parquet_parts_one_file_and_memory_give_bit_identical_models(tmp_path):
    # parts read a step's rows at a time on 2 workers; one file on 1 worker; the reference in memory
    parts = write_parquet(blobs(), tmp_path / "parts", parts=3)
    one_file = write_parquet(blobs(), tmp_path / "one") / "part-0.parquet"
    from_parts = train(build_mlp(), cross_entropy, str(parts), make_config(tmp_path, workers=2),
                       progress=lambda line: None)
    from_file = train(build_mlp(), cross_entropy, str(one_file), make_config(tmp_path, workers=1),
                      progress=lambda line: None)
    reference = reference_theta(make_config(tmp_path))
    assert torch.equal(trained_theta(from_parts.model), reference)
    assert torch.equal(trained_theta(from_file.model), reference)


def test_a_black_box_target_on_two_workers_matches_the_local_reference(tmp_path):
    # each worker loads the frozen net itself; only the target's θ and the seeds travel
    cfg = make_config(tmp_path, steps=8)
    cfg.target.embedding_module = ""
    result = train(build_projection(), FrozenNetLoss(), blobs(), cfg, test_data=blobs(), progress=lambda line: None)
    spec = ReplicaSpec(sigma=cfg.train.sigma, noise=cfg.train.noise, optimizer=cfg.train.optimizer_config())
    replica = Replica(build_projection(), FrozenNetLoss(), blobs(), spec)
    engine = Engine(cfg.train, LocalExecutor([replica]), blobs(), replica.d)
    for t in range(cfg.train.steps):
        engine.step(t)
    assert torch.equal(trained_theta(result.model), replica.theta)
    assert result.metric_after > result.metric_before  # accuracy through the black box's scores()


def test_run_log_update_log_and_model_files(tmp_path):
    lines = []
    cfg = make_config(tmp_path, steps=10)
    result = train(build_mlp(), cross_entropy, blobs(), cfg, test_data=blobs(60, seed=1), progress=lines.append)
    log = read_log(result.run_dir, "run_log")
    assert log.num_rows == 10 and log.column("step").to_pylist() == list(range(10))
    for column in ("loss", "queries", "allocation_min", "allocation_mean", "allocation_max",
                   "lambda_beta0", "lambda_beta1", "lambda_s", "lambda_gamma", "seconds"):
        assert column in log.column_names
    assert set(log.column("queries").to_pylist()) == {24 * 8}
    updates = read_log(result.run_dir, "updates")
    assert updates.num_rows == 10 and max(log.column("update_bytes").to_pylist()) < 8 * 1024
    saved = load_file(str(result.run_dir / "model.safetensors"))  # safetensors: no unpickling
    for name, value in result.model.state_dict().items():
        assert torch.equal(saved[name], value)
    assert (result.run_dir / "run.png").stat().st_size > 0
    assert any(line.startswith("step    10/10") for line in lines)
    assert 0.0 <= result.metric_before <= 1.0 and 0.0 <= result.metric_after <= 1.0


def test_held_out_scores_every_few_steps_are_those_of_the_reference_and_reach_log_progress_and_plot(tmp_path):
    lines, test = [], blobs(60, seed=1)
    cfg = make_config(tmp_path, steps=10)
    cfg.data.metric, cfg.output.score_every = "loss", 4  # a loss moves every step, accuracy may not
    result = train(build_mlp(), cross_entropy, blobs(), cfg, test_data=test, progress=lines.append)
    log = read_log(result.run_dir, "run_log").to_pydict()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker scores: the same θ and the same ops give the same bits
    try:  # expected[t]: after step t; expected[-1]: before the first
        expected = dict(enumerate((replica.score(test, "loss") for replica in reference_steps(cfg)), start=-1))
    finally:
        torch.set_num_threads(threads)
    scored = {t: m for t, m in zip(log["step"], log["test_metric"]) if not np.isnan(m)}
    assert scored == {3: expected[3], 7: expected[7]}  # θ after steps 4 and 8
    assert (result.metric_before, result.metric_after) == (expected[-1], expected[9])
    line5, line10 = [line for line in lines if line.startswith("step")]  # log_every = 5
    assert f"test loss {expected[3]:.4f}" in line5 and f"test loss {expected[7]:.4f}" in line10
    assert (result.run_dir / "run.png").stat().st_size > 0


def test_held_out_scores_without_test_data_are_said_to_be_off_and_the_run_trains(tmp_path):
    lines, cfg = [], make_config(tmp_path, steps=4)
    cfg.output.score_every = 2
    result = train(build_mlp(), cross_entropy, blobs(), cfg, progress=lines.append)
    assert "flops_dist: output.score_every = 2, but no test data was given (data.test, or test_data=): " \
           "nothing will be scored" in lines
    assert np.isnan(read_log(result.run_dir, "run_log").column("test_metric").to_numpy()).all()
    assert result.metric_after is None


def start_coordinator(cfg, test=None, train_data=None):
    ship_by_value(build_mlp(), cross_entropy)
    refs = {"model": ray.put(build_mlp()), "loss_fn": ray.put(cross_entropy), "sample": ray.put(blobs(8)),
            "train": ray.put(blobs() if train_data is None else train_data),
            "test": None if test is None else ray.put(test)}
    return RemoteCoordinator.options(num_cpus=0).remote(cfg, refs)


def test_workers_take_one_gpu_each_when_the_cluster_has_gpus(tmp_path):
    cfg = make_config(tmp_path, steps=2)
    cfg.cluster.gpus_per_worker = "auto"
    coordinator = start_coordinator(cfg)
    try:
        info = ray.get(coordinator.info.remote())
        assert sorted(tuple(w["gpu_ids"]) for w in info["workers"]) == [("0",), ("1",)]
        assert len(ray.get(coordinator.run.remote(2))) == 2
    finally:
        ray.kill(coordinator)


def final_theta(coordinator):
    state = ray.get(coordinator.finish.remote())
    model = build_mlp()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return trained_theta(model)


@pytest.mark.parametrize("how,data", [("ray.kill", "memory"), ("SIGKILL", "parts")])
def test_a_worker_killed_mid_run_is_replaced_and_changes_nothing(tmp_path, how, data):
    cfg = make_config(tmp_path, steps=14)
    cfg.output.snapshot_every = 4
    parts = ParquetSource(str(write_parquet(blobs(), tmp_path / "parts", parts=3)), "input", "label")
    coordinator = start_coordinator(cfg, train_data=parts if data == "parts" else None)
    try:
        ray.get(coordinator.run.remote(5))
        if how == "ray.kill":
            ray.kill(ray.get(coordinator.worker_handles.remote())[1], no_restart=True)
        else:
            os.kill(ray.get(coordinator.info.remote())["workers"][1]["pid"], signal.SIGKILL)
        records = ray.get(coordinator.run.remote(9))
        assert records[-1]["workers_lost"] == 1 and records[-1]["worker_restarts"] == 1
        assert records[-1]["workers_alive"] == 2  # the replacement passed its hash check
        theta = final_theta(coordinator)
    finally:
        ray.kill(coordinator)
    assert torch.equal(theta, reference_theta(cfg))


def test_a_worker_killed_in_the_final_phase_changes_nothing(tmp_path):
    # the final hash check, snapshot, scoring and export go to whichever replica is alive
    cfg = make_config(tmp_path, steps=10)
    coordinator = start_coordinator(cfg, test=blobs(60, seed=1))
    try:
        ray.get(coordinator.run.remote(10))
        ray.kill(ray.get(coordinator.worker_handles.remote())[0], no_restart=True)
        assert 0.0 <= ray.get(coordinator.score.remote()) <= 1.0
        theta = final_theta(coordinator)
    finally:
        ray.kill(coordinator)
    assert torch.equal(theta, reference_theta(cfg))


def test_every_worker_killed_at_once_is_replaced_from_the_snapshot(tmp_path):
    cfg = make_config(tmp_path, steps=12)
    cfg.output.snapshot_every = 4
    coordinator = start_coordinator(cfg)
    try:
        ray.get(coordinator.run.remote(6))
        for worker in ray.get(coordinator.worker_handles.remote()):
            ray.kill(worker, no_restart=True)
        records = ray.get(coordinator.run.remote(6))
        assert records[-1]["workers_lost"] == 2 and records[-1]["workers_alive"] == 2
        theta = final_theta(coordinator)
    finally:
        ray.kill(coordinator)
    assert torch.equal(theta, reference_theta(cfg))


def test_a_dead_coordinator_resumes_from_snapshot_and_log_bit_identically(tmp_path):
    # a run on 3 Parquet parts, resumed from them
    steps = 200
    cfg = make_config(tmp_path, steps=steps)
    cfg.output.snapshot_every, cfg.output.log_every = 5, 3
    parts = str(write_parquet(blobs(), tmp_path / "parts", parts=3))
    coordinator = start_coordinator(cfg, train_data=ParquetSource(parts, "input", "label"))
    ray.get(coordinator.info.remote())  # started
    pending = coordinator.run.remote(steps)
    logs = Path(cfg.output.run_dir) / "run_log"
    while not list(logs.glob("part-*.parquet")):  # somewhere mid-run, once a segment is written: the
        time.sleep(0.05)                          # result must not depend on where
    ray.kill(coordinator)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(pending)
    logged = read_log(cfg.output.run_dir, "run_log").num_rows
    assert 0 < logged < steps
    result = train(build_mlp(), cross_entropy, parts, cfg, progress=lambda line: None, resume=True)
    assert torch.equal(trained_theta(result.model), reference_theta(cfg))
    assert result.run_log.column("step").to_pylist() == list(range(steps))


def test_a_corrupt_snapshot_falls_back_to_the_last_good_state(tmp_path, caplog):
    cfg = make_config(tmp_path, steps=10)
    cfg.output.snapshot_every = 4
    coordinator = start_coordinator(cfg)
    ray.get(coordinator.run.remote(10))
    ray.kill(coordinator)
    snapshots = sorted((tmp_path / "run2" / "snapshots").glob("step-*.safetensors"))
    newest = snapshots[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash outside our atomic rename
    segment = sorted((tmp_path / "run2" / "updates").glob("part-*.parquet"))[-1]
    segment.write_bytes(b"garbage")
    cfg.train.steps = 12
    result = train(build_mlp(), cross_entropy, blobs(), cfg, progress=lambda line: None, resume=True)
    assert (newest.with_name(newest.name + ".corrupt")).exists()
    assert (segment.with_name(segment.name + ".corrupt")).exists()
    assert torch.equal(trained_theta(result.model), reference_theta(cfg))


def scrape(url: str) -> dict:
    from urllib.request import urlopen
    from prometheus_client.parser import text_string_to_metric_families
    with urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_served_on_loopback_and_follow_from_the_run(tmp_path):
    cfg = make_config(tmp_path, steps=6)
    cfg.output.score_every = 4
    coordinator = start_coordinator(cfg, test=blobs(60, seed=1))
    try:
        url = ray.get(coordinator.info.remote())["metrics_url"]
        assert url.startswith("http://127.0.0.1:")
        records = ray.get(coordinator.run.remote(6))
        m = scrape(url)
    finally:
        ray.kill(coordinator)
    assert m[("flops_steps_total", ())] == 6
    assert m[("flops_queries_total", ())] == 6 * 24 * 8
    assert m[("flops_dropped_queries_total", ())] == 0
    assert m[("flops_update_bytes_total", ())] == sum(r["update_bytes"] for r in records)
    assert m[("flops_step_duration_seconds_count", ())] == 6
    assert m[("flops_workers_alive", ())] == 2
    assert m[("flops_worker_restarts_total", ())] == 0
    assert m[("flops_train_loss", ())] == pytest.approx(records[-1]["loss"])
    assert m[("flops_allocation_queries", (("stat", "max"),))] == records[-1]["allocation_max"]
    assert m[("flops_allocation_gini", ())] == pytest.approx(records[-1]["allocation_gini"])
    assert m[("flops_allocator_lambda", (("param", "gamma"),))] == pytest.approx(records[-1]["lambda_gamma"])
    assert all(m[("flops_worker_query_rate", (("worker", w),))] > 0 for w in ("0", "1"))
    scored = [r["test_metric"] for r in records]
    assert np.isnan(scored[:3] + scored[4:]).all() and 0 < scored[3] <= 1  # θ after step 4 only
    assert m[("flops_test_metric", (("metric", "accuracy"),))] == scored[3]


def test_a_second_run_into_the_same_directory_is_refused_clearly(tmp_path):
    from flops_dist.api import TrainingError
    cfg = make_config(tmp_path, steps=2)
    train(build_mlp(), cross_entropy, blobs(), cfg, progress=lambda line: None)
    with pytest.raises(TrainingError) as err:
        train(build_mlp(), cross_entropy, blobs(), cfg, progress=lambda line: None)
    assert str(err.value).startswith("RuntimeError: output.run_dir:") and "already holds a run" in str(err.value)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
