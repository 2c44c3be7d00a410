"""Elastic workers on a multi-node Ray cluster: start short-handed, admit a worker when a node joins."""
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from test_ray import final_theta, make_config, reference_theta, start_coordinator


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024**2})
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_run_starts_short_handed_and_uses_a_node_that_joins_later(cluster, tmp_path):
    cfg = make_config(tmp_path, workers=2, steps=12)
    cfg.cluster.min_workers, cfg.cluster.rescale_every = 1, 3
    coordinator = start_coordinator(cfg)
    try:
        assert len(ray.get(coordinator.info.remote())["workers"]) == 1
        first = ray.get(coordinator.run.remote(4))
        assert first[-1]["workers_alive"] == 1
        cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
        cluster.wait_for_nodes()
        later = ray.get(coordinator.run.remote(8))
        assert later[-1]["workers_alive"] == 2 and later[-1]["worker_restarts"] == 0
        theta = final_theta(coordinator)
    finally:
        ray.kill(coordinator)
    assert torch.equal(theta, reference_theta(cfg))
