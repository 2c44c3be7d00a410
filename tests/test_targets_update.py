import numpy as np
import pytest
import torch

from flops_dist.noise import noise
from flops_dist.losses import as_loss
from flops_dist.targets import PerturbedForward, Target
from flops_dist.update import (OptimizerConfig, UpdateMessage, apply_update, init_optimizer_state,
                               parameter_hash, reconstruct_gradient)
from models import blobs, build_mlp, cross_entropy


def test_target_by_all_regex_and_module():
    model = build_mlp()
    assert Target.select(model, "all").names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert Target.select(model, [r".*\.bias"]).names == ("0.bias", "2.bias")
    assert Target.select(model, "2").names == ("2.weight", "2.bias")
    assert Target.select(model, "2").numel == 32 * 3 + 3


def test_target_that_selects_nothing_names_the_parameters():
    with pytest.raises(ValueError, match="selects no parameter.*0.weight"):
        Target.select(build_mlp(), ["head"])


def test_perturbed_forwards_leave_theta_and_the_module_bit_exact():
    model = build_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = Target.select(model, "all")
    theta = target.flatten(model)
    theta_copy = theta.clone()
    fwd = PerturbedForward(model, target, as_loss(cross_entropy), 0.1, "gaussian", torch.device("cpu"))
    data = blobs(16)
    x, y = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    for _ in range(3):
        fwd.shared(theta, 5, 1, x, y)
        fwd.independent(theta, np.arange(16), np.ones(16), x, y)
    assert torch.equal(theta, theta_copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_independent_queries_equal_one_forward_per_perturbation():
    model = build_mlp()
    target = Target.select(model, "2")
    theta = target.flatten(model)
    fwd = PerturbedForward(model, target, as_loss(cross_entropy), 0.05, "rademacher", torch.device("cpu"))
    data = blobs(8)
    x, y = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    seeds, signs = np.arange(100, 108), np.array([1, -1] * 4)
    batched = fwd.independent(theta, seeds, signs, x, y)
    for q in range(8):
        single = fwd.shared(theta, int(seeds[q]), int(signs[q]), x[q:q + 1], y[q:q + 1])
        assert torch.allclose(batched[q], single[0], atol=1e-6)
    # and the perturbation is θ + σ·sign·u(seed): compare with a plain module
    plain = build_mlp()
    with torch.no_grad():
        flat = theta + 0.05 * noise(100, target.numel)
        plain[2].weight.copy_(flat[:96].reshape(3, 32))
        plain[2].bias.copy_(flat[96:])
    assert torch.allclose(cross_entropy(plain(x[:1]), y[:1])[0], batched[0], atol=1e-6)


def test_sgd_update_is_theta_minus_lr_times_sum_of_c_u():
    theta = torch.zeros(50)
    msg = UpdateMessage(0, 0.5, np.array([3, 9]), np.array([2.0, -1.0]))
    new, _ = apply_update(theta, {}, msg, OptimizerConfig("sgd"), "rademacher")
    assert torch.allclose(new, -0.5 * (2.0 * noise(3, 50) - noise(9, 50)))


def test_adam_matches_torch_adam():
    theta = torch.randn(40, generator=torch.Generator().manual_seed(0))
    param = torch.nn.Parameter(theta.clone())
    reference = torch.optim.Adam([param], lr=0.01)
    state = init_optimizer_state(OptimizerConfig("adam"), 40)
    for t in range(5):
        msg = UpdateMessage(t, 0.01, np.array([t, t + 100]), np.array([0.3, -0.2]))
        param.grad = reconstruct_gradient(msg, 40, "gaussian")
        reference.step()
        theta, state = apply_update(theta, state, msg, OptimizerConfig("adam"), "gaussian")
    assert torch.allclose(theta, param.detach(), atol=1e-6)


def test_replaying_messages_reproduces_the_hash():
    cfg = OptimizerConfig("momentum")
    msgs = [UpdateMessage(t, 0.1, np.array([t * 7 + 1]), np.array([0.5])) for t in range(10)]

    def replay():
        theta, state = torch.ones(1000), init_optimizer_state(cfg, 1000)
        for m in msgs:
            theta, state = apply_update(theta, state, m, cfg, "rademacher")
        return parameter_hash(theta, state)

    assert replay() == replay()
    theta, state = torch.ones(1000), init_optimizer_state(cfg, 1000)
    assert replay() != parameter_hash(theta, state)


def test_update_message_is_small_whatever_the_model_size():
    msg = UpdateMessage(0, 0.1, np.arange(256, dtype=np.int64), np.zeros(256))
    assert msg.nbytes == 16 + 256 * 16
