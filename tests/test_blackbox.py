"""Black-box targets: the target runs under vmap, the frozen model only forward on plain batches."""
import pickle

import numpy as np
import torch

from flops_dist.apps.targets import PromptCode, SoftPrompt
from flops_dist.config import TrainConfig
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.noise import noise_batch
from flops_dist.replica import Replica, ReplicaSpec
from models import FrozenNetLoss, SubprocessNetLoss, blobs, build_projection, frozen_network

SIGMA = 0.05


def replica(loss, data=None):
    return Replica(build_projection(), loss, data or blobs(), ReplicaSpec(sigma=SIGMA))


def test_a_chunk_of_queries_equals_the_queries_one_at_a_time():
    rep = replica(FrozenNetLoss())
    x, y = rep.inputs[:8], rep.labels[:8]
    seeds, signs = np.arange(100, 108), np.array([1, -1] * 4)
    batched = rep.forward.independent(rep.theta, seeds, signs, x, y)
    net, u = frozen_network(), noise_batch(seeds, rep.d, "rademacher")
    with torch.no_grad():
        for k in range(8):
            theta = rep.theta + SIGMA * float(signs[k]) * u[k]
            w = theta.reshape(rep.model.weight.shape)
            expected = torch.nn.functional.cross_entropy(net(x[k:k + 1] @ w.T), y[k:k + 1])
            torch.testing.assert_close(batched[k], expected, rtol=1e-5, atol=1e-6)
    shared = rep.forward.shared(rep.theta, 100, 1, x, y)
    assert shared.shape == (8,) and torch.isclose(shared[0], batched[0], rtol=1e-5)


def test_the_frozen_model_loads_once_per_replica_and_never_travels():
    loss = FrozenNetLoss()
    before = FrozenNetLoss.loads
    rep = replica(loss)
    assert FrozenNetLoss.loads == before + 1
    shipped = pickle.loads(pickle.dumps(loss))  # what Ray sends a worker: the settings only
    assert loss.frozen is not None and shipped.frozen is None
    engine = Engine(TrainConfig(batch_size=24, sigma=SIGMA, chunk_size=8), LocalExecutor([rep]), blobs(), rep.d)
    for t in range(3):
        engine.step(t)
    assert FrozenNetLoss.loads == before + 1


def train_locally(loss, steps, allocator="flops"):
    cfg = TrainConfig(batch_size=24, sigma=SIGMA, learning_rate=0.2, chunk_size=8, allocator=allocator,
                      queries_per_example=8)
    rep = replica(loss)
    engine = Engine(cfg, LocalExecutor([rep]), blobs(), rep.d)
    records = [engine.step(t).record for t in range(steps)]
    return rep, records


def test_training_through_a_black_box_lowers_the_loss_and_never_differentiates_it():
    # FrozenNetLoss asserts that autograd is off on every call
    rep, records = train_locally(FrozenNetLoss(), steps=80)
    first, last = np.mean([r.loss for r in records[:10]]), np.mean([r.loss for r in records[-10:]])
    assert last < 0.8 * first
    assert rep.score(blobs(), "accuracy") > 0.6  # three classes: chance is 1/3


def test_a_black_box_in_another_process_trains_exactly_like_the_module():
    local, _ = train_locally(FrozenNetLoss(), steps=6)
    remote, records = train_locally(SubprocessNetLoss(), steps=6)
    torch.testing.assert_close(remote.theta, local.theta, rtol=1e-5, atol=1e-6)
    assert all(r.queries == 24 * 8 for r in records)


def test_prompt_targets_map_theta_to_prompts():
    init = torch.randn(3, 5)
    soft = SoftPrompt(init)
    assert torch.equal(soft(torch.zeros(4, 2))[2], init) and soft.prompt.numel() == 15
    code = PromptCode(init, code_dim=4, seed=0)
    assert [n for n, p in code.named_parameters()] == ["code"]  # the projection is fixed
    assert torch.equal(code(torch.zeros(2, 1))[0], init)  # z = 0 starts at the initial prompt
    with torch.no_grad():
        code.code.fill_(1.0)
        moved = code(torch.zeros(1, 1))[0] - init
    # z = 1 (‖z‖ = √k) through R with entries N(0, std(P₀)²/k) moves each value by about std(P₀)
    assert 0.5 < float(moved.std() / init.std()) < 2.0
    assert torch.equal(PromptCode(init, 4, seed=0).projection, code.projection)
