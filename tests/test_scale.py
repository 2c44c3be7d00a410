"""Scale: noise made a block at a time (same bits as whole vectors), and frozen-prefix reuse (same
bits as running the whole network per query)."""
import numpy as np
import pytest
import torch
from torch import nn

from flops_dist.config import TrainConfig
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.noise import BLOCK, accumulate, noise_batch
from flops_dist.replica import Replica, ReplicaSpec
from flops_dist.targets import Target
from models import blobs, build_chain, build_gated_chain, build_skip_chain, build_tower, cross_entropy


def wide_model() -> nn.Module:
    """Two tensors, one larger than a noise block: the per-tensor, per-block path is taken."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1100, 1000), nn.Linear(1000, 3))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blockwise_perturbation_equals_whole_noise_vectors(kind):
    model = wide_model()
    target = Target.select(model, "all")
    assert target.numel > BLOCK and model[0].weight.numel() > BLOCK
    theta = target.flatten(model)
    seeds = np.array([3, 11])
    scale = torch.tensor([[0.01], [-0.01]])
    blockwise = target.perturbed(theta, seeds, scale, kind)
    whole = target.unflatten(theta + scale * noise_batch(seeds, target.numel, kind))
    assert all(torch.equal(blockwise[n], whole[n]) for n in target.names)


@pytest.mark.parametrize("scale", [0.0123456, torch.tensor([[0.0123456], [-3.3e-5], [7.77]])], ids=["float", "rows"])
def test_fused_rademacher_perturbation_has_the_bits_of_theta_plus_scale_times_u(scale):
    target = Target.select(nn.Linear(7, 5), "all")
    theta = torch.randn(target.numel) * 10.0 ** torch.randint(-4, 3, (target.numel,))
    seeds = np.array([4, 8, 15])
    fused = target.perturbed(theta, seeds, scale, "rademacher")
    plain = target.unflatten(theta + scale * noise_batch(seeds, target.numel, "rademacher"))
    assert all(torch.equal(fused[n], plain[n]) for n in target.names)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blockwise_update_equals_adding_whole_noise_vectors(kind):
    d, seeds, coefficients = BLOCK + 12345, np.array([5, 9, 2]), [0.5, -1.25, 3.0]
    expected = torch.zeros(d)
    for seed, c in zip(seeds, coefficients):
        expected.add_(noise_batch([seed], d, kind)[0], alpha=c)
    assert torch.equal(accumulate(torch.zeros(d), seeds, coefficients, kind), expected)


@pytest.mark.parametrize("width", [1, 2, 3, 330, 4097])
def test_the_update_adds_its_terms_in_message_order(width):
    """ĝ's bits are those of adding c_s·u_s one by one, onto what the vector held, at any width:
    with coefficients spread over eight orders of magnitude, any other order of the sum (pairwise,
    a matrix product) changes the last bits."""
    rng = np.random.default_rng(width)
    seeds = rng.integers(0, 2**62, 300)
    coefficients = torch.tensor(rng.standard_normal(300) * 10.0**rng.integers(-6, 3, 300), dtype=torch.float32)
    start = torch.tensor(rng.standard_normal(width), dtype=torch.float32)
    one_by_one = start.clone()
    for seed, c in zip(seeds, coefficients.tolist()):
        one_by_one.add_(noise_batch([seed], width, "rademacher", 77)[0], alpha=c)
    assert torch.equal(accumulate(start.clone(), seeds, coefficients.tolist(), "rademacher", 77), one_by_one)
    reordered = start + coefficients @ noise_batch(seeds, width, "rademacher", 77)
    assert width < 4 or not torch.equal(reordered, one_by_one)  # the test can tell orders apart


def tower_run(frozen_prefix, replicas=1, steps=4, leak=False, build=build_tower, **train):
    cfg = TrainConfig(steps=steps, batch_size=24, sigma=0.01, learning_rate=0.1, chunk_size=8, **train)
    spec = ReplicaSpec(include=["head"], sigma=cfg.sigma, noise=cfg.noise, optimizer=cfg.optimizer_config(),
                       frozen_prefix=frozen_prefix)
    data = blobs()
    reps = [Replica(build(leak), cross_entropy, data, spec) for _ in range(replicas)]
    engine = Engine(cfg, LocalExecutor(reps), data, reps[0].d)
    for t in range(steps):
        engine.step(t)
    return reps


def test_the_prefix_is_the_outermost_frozen_modules_before_the_target():
    rep = tower_run("auto", steps=0)[0]
    assert rep.forward.prefix.names == ["embed", "blocks.0", "blocks.1"]
    assert tower_run("blocks.1", steps=0)[0].forward.prefix.names == ["embed", "blocks.0"]
    assert tower_run("off", steps=0)[0].forward.prefix is None


def test_a_module_whose_output_moves_with_the_target_is_not_reused():
    # the head's weights reach the blocks' input through the parent's glue: only embed is frozen
    leaky = tower_run("auto", steps=0, leak=True)[0]
    assert leaky.forward.prefix.names == ["embed"]


@pytest.mark.parametrize("train", [dict(allocator="flops"), dict(allocator="uniform", pairing="shared"),
                                   dict(allocator="neyman", estimator="antithetic", noise="gaussian")],
                         ids=lambda c: "-".join(c.values()))
def test_prefix_reuse_gives_the_bits_of_the_whole_network(train):
    whole = tower_run("off", **train)[0]
    reused = tower_run("auto", replicas=2, **train)
    assert reused[0].forward.prefix is not None
    assert {r.hash() for r in reused} == {whole.hash()}
    assert {r.hash() for r in tower_run("auto", leak=True, **train)} == {tower_run("off", leak=True, **train)[0].hash()}


def test_prefix_outputs_the_output_does_not_depend_on_are_found_dead():
    """In a chain whose last frozen module is replayed, the earlier outputs are dead: a query gets
    them for one example only. In the tower, the residual sums carry every block's output on."""
    chain = tower_run("auto", steps=0, build=build_chain)[0].forward.prefix
    assert chain.names == ["embed", "body", "norm"] and chain.dead == {"embed", "body"}
    assert tower_run("auto", steps=0)[0].forward.prefix.dead == set()


@pytest.mark.parametrize("train", [dict(allocator="flops"), dict(allocator="uniform", pairing="shared")],
                         ids=lambda c: "-".join(c.values()))
def test_dead_prefix_outputs_replayed_as_one_example_give_the_bits_of_the_whole_network(train):
    whole = tower_run("off", build=build_chain, **train)[0]
    reused = tower_run("auto", replicas=2, build=build_chain, **train)
    assert {r.hash() for r in reused} == {whole.hash()}
    held = reused[0].forward.prefix_values
    assert held["embed"].shape[0] == 1 and held["norm"].shape[0] > 1  # the dead kept for one example


def test_an_input_used_only_by_the_prefix_is_found_dead():
    """Replayed, the tower's and the chain's prefixes are the only users of the input: a vmapped query
    gets one example's, unbatched. The skip chain's head adds the input, and the gated chain masks
    its output by the input being non-zero (which no example's is, so only zeros show it): there it
    stays live."""
    assert tower_run("auto", steps=0)[0].forward.prefix.input_dead
    assert tower_run("auto", steps=0, build=build_chain)[0].forward.prefix.input_dead
    assert not tower_run("auto", steps=0, build=build_skip_chain)[0].forward.prefix.input_dead
    assert not tower_run("auto", steps=0, build=build_gated_chain)[0].forward.prefix.input_dead


@pytest.mark.parametrize("build", [build_chain, build_skip_chain, build_gated_chain],
                         ids=["input-dead", "input-live", "input-gates"])
def test_a_dead_input_passed_once_gives_the_bits_of_the_whole_network(build):
    whole = tower_run("off", build=build)[0]
    reused = tower_run("auto", replicas=2, build=build)
    assert {r.hash() for r in reused} == {whole.hash()}


def test_a_boundary_that_is_not_a_module_is_refused():
    with pytest.raises(ValueError, match="frozen_prefix 'neck' is not a submodule"):
        tower_run("neck", steps=0)


def test_queries_do_not_run_the_prefix():
    calls = {}
    for mode in ("off", "auto"):
        rep = tower_run(mode, steps=0)[0]
        inner = rep.model.blocks[0][1]  # inside the prefix: it runs only when the prefix runs
        handle = inner.register_forward_pre_hook(lambda m, a, mode=mode: calls.__setitem__(mode, calls.get(mode, 0) + 1))
        cfg = TrainConfig(batch_size=24, sigma=0.01, chunk_size=8)
        Engine(cfg, LocalExecutor([rep]), blobs(), rep.d).step(0)
        handle.remove()
    assert calls["auto"] == 3  # the clean forward: 24 examples in chunks of 8
    assert calls["off"] == 3 + 24 * 8 // 8  # and one forward per chunk of 8 queries


@pytest.mark.parametrize("allocator", ["uniform", "flops"])
def test_with_two_replicas_the_prefix_runs_once_per_example(allocator):
    """3 clean chunks of 8 between two replicas. A query chunk whose examples span clean chunks
    that the other replica ran is sent their prefix outputs: no clean chunk is run twice, though
    some query chunk straddles the two replicas' rows (checked, so the test can fail)."""
    reps = tower_run("auto", replicas=2, steps=0)
    calls, given = [], []
    for rep in reps:
        rep.model.blocks[0][1].register_forward_pre_hook(lambda m, a: calls.append(1))
        evaluate = rep.evaluate
        rep.evaluate = lambda chunks, prefix=None, evaluate=evaluate: given.append(prefix) or evaluate(chunks, prefix)
    cfg = TrainConfig(batch_size=24, sigma=0.01, chunk_size=8, queries_per_example=3, allocator=allocator)
    engine = Engine(cfg, LocalExecutor(reps), blobs(), reps[0].d)
    for t in range(3):
        engine.step(t)
    assert len(calls) == 3 * 3
    assert any(given)


class HalfPrecision(nn.Module):
    """A model whose weights are stored in bf16 or fp16: inputs are cast to them, logits back."""

    def __init__(self, dtype):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype)).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_train_on_an_fp32_master(dtype):
    cfg = TrainConfig(batch_size=24, sigma=0.01, learning_rate=0.02, chunk_size=8)
    spec = ReplicaSpec(sigma=cfg.sigma)
    data = blobs()
    runs = []
    for replicas in (1, 2):
        reps = [Replica(HalfPrecision(dtype), cross_entropy, data, spec) for _ in range(replicas)]
        engine = Engine(cfg, LocalExecutor(reps), data, reps[0].d)
        losses = [engine.step(t).record.loss for t in range(30)]
        runs.append((reps, losses))
    (one, losses), (two, _) = runs
    assert one[0].theta.dtype == torch.float32 and one[0].model.net[0].weight.dtype == dtype
    assert {r.hash() for r in two} == {one[0].hash()}  # deterministic across replica counts
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns
    start = Target.select(HalfPrecision(dtype), "all").flatten(HalfPrecision(dtype))
    exported = one[0].state_dict()["net.0.weight"]  # numpy has no bf16: written as float32, exactly
    assert exported.dtype == (np.float32 if dtype == torch.bfloat16 else np.float16)
    assert torch.equal(torch.from_numpy(exported).to(dtype), one[0].theta[:320].reshape(32, 10).to(dtype))
    # the master keeps steps finer than the weights' own precision: θ moved where the cast did not
    moved = one[0].theta != start
    recast = one[0].theta.to(dtype).float() != start
    assert moved.sum() > recast.sum()


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_the_blockwise_optimizer_step_equals_the_whole_vector_formulas(kind):
    from flops_dist.update import OptimizerConfig, UpdateMessage, apply_update, init_optimizer_state, reconstruct_gradient
    d, rng = 2 * BLOCK + 777, np.random.default_rng(0)
    theta = torch.tensor(rng.normal(size=d).astype(np.float32))
    msg = UpdateMessage(3, 0.05, np.array([7, 8, 9]), np.array([0.3, -1.2, 2.5]))
    cfg = OptimizerConfig(kind=kind, weight_decay=0.01)
    state = {k: torch.tensor(rng.normal(size=d).astype(np.float32)).abs() for k in init_optimizer_state(cfg, 1)}
    blockwise, new_state = apply_update(theta, state, msg, cfg, "gaussian")
    grad, lr = reconstruct_gradient(msg, d, "gaussian") + cfg.weight_decay * theta, msg.learning_rate
    if kind == "sgd":
        whole, whole_state = theta - lr * grad, {}
    elif kind == "momentum":
        velocity = cfg.momentum * state["velocity"] + grad
        whole, whole_state = theta - lr * velocity, {"velocity": velocity}
    else:
        m = cfg.beta1 * state["m"] + (1 - cfg.beta1) * grad
        v = cfg.beta2 * state["v"] + (1 - cfg.beta2) * grad * grad
        whole = theta - lr * (m / (1 - cfg.beta1**4)) / (torch.sqrt(v / (1 - cfg.beta2**4)) + cfg.eps)
        whole_state = {"m": m, "v": v}
    assert torch.equal(blockwise, whole)
    assert new_state.keys() == whole_state.keys() and all(torch.equal(new_state[k], whole_state[k]) for k in whole_state)


def test_the_models_own_target_weights_are_views_of_theta_after_every_update():
    # the module's copy is never read (forwards take θ), so it shares θ's memory instead of doubling it
    reps = tower_run("off", steps=2)
    rep = reps[0]
    storage = rep.theta.untyped_storage().data_ptr()
    head = dict(rep.model.named_parameters())
    for name, value in rep.target.unflatten(rep.theta).items():
        assert head[name].untyped_storage().data_ptr() == storage and torch.equal(head[name], value)


def test_all_finite_finds_one_non_finite_element_in_any_block():
    from flops_dist.update import all_finite
    x = torch.zeros(2 * BLOCK + 5)
    assert all_finite(x, torch.zeros(3))
    for where, value in [(0, float("nan")), (BLOCK + 1, float("inf")), (2 * BLOCK + 4, -float("inf"))]:
        y = x.clone()
        y[where] = value
        assert not all_finite(torch.zeros(3), y)
