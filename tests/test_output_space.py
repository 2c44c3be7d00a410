"""Output-space noise (flops_dist/outputs.py): unbiased against backprop, ĉ_j matching the spread it
predicts, bit-identical replicas, and config errors for what it cannot do."""
import functools

import numpy as np
import pytest
import torch
from torch import nn

from flops_dist.config import Config, ConfigError, TrainConfig
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec
from models import blobs, build_mlp, cross_entropy


class TokenMLP(nn.Module):
    """A sequence model in miniature: 10 features as 5 tokens of 2, a per-token Linear, mean-pooled."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.mix, self.head = nn.Linear(2, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x.reshape(*x.shape[:-1], 5, 2))).mean(-2))


class Capture(LocalExecutor):
    """Keeps the update instead of applying it."""

    def queue_update(self, msg):
        self.message = msg


def output_replica(model, sigma=0.01, noise="rademacher", layer_sigma="rms", **spec):
    return Replica(model, cross_entropy, blobs(), ReplicaSpec(sigma=sigma, noise=noise, noise_space="outputs",
                                                              layer_sigma=layer_sigma, **spec))


def backprop_gradient(replica, example: int) -> torch.Tensor:
    theta = replica.theta.clone().requires_grad_(True)
    rows = blobs().rows(np.array([example]))
    x, y = torch.from_numpy(rows.inputs), torch.from_numpy(rows.labels)
    loss = replica.forward.losses(replica.forward.call(theta, x), x, y)[0].sum()
    return torch.autograd.grad(loss, theta)[0].double()


def single_unit_estimates(model, estimator, units=8192, example=7, **spec):
    """One step on a batch of one example with `units` queries (or pairs): the unit estimates ĝ_k
    [units, d], their mean (the step's ĝ), the step's ĉ and backprop's g."""
    unit = 2 if estimator == "antithetic" else 1
    cfg = TrainConfig(batch_size=1, queries_per_example=unit * units, min_queries=unit, allocator="uniform",
                      estimator=estimator, sigma=spec.get("sigma", 0.01), noise_space="outputs", chunk_size=256)
    replica = output_replica(model, **spec)
    executor = Capture([replica])
    engine = Engine(cfg, executor, blobs(), replica.d)
    outcome = engine.step(0, batch=np.array([example]))
    msg = executor.message
    held = replica.layer_inputs
    each = torch.stack([units * replica.outputs.gradient([s], [c], held) for s, c in zip(msg.seeds, msg.coefficients)])
    c_hat = outcome.record.variance_proxy * units  # V̂(A)/B² = ĉ/A for one example
    return each.double(), replica.gradient(msg).double(), backprop_gradient(replica, example), c_hat


CASES = [("lr", build_mlp, {}), ("antithetic", build_mlp, {"layer_sigma": "one"}), ("antithetic", TokenMLP, {}),
         ("lr", TokenMLP, {"noise": "gaussian"})]


@functools.cache
def case_estimates(case: int):
    estimator, model, spec = CASES[case]
    return single_unit_estimates(model(), estimator, **spec)


CASE_IDS = ["lr-mlp", "antithetic-mlp-one_sigma", "antithetic-tokens", "lr-tokens-gaussian"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_the_estimate_is_unbiased_against_backprop(case):
    each, mean, g, _ = case_estimates(case)
    n = len(each)
    assert torch.allclose(each.mean(0), mean, rtol=1e-4, atol=1e-7)
    # For n independent unit estimates, E‖ĝ − g‖² = Tr Cov / n + ‖bias‖². Tr Cov / n is estimated from
    # the sample; ‖ĝ − g‖² is a sum of d squared near-Gaussian errors, whose spread is well within 2×
    # its mean at d in the hundreds, so a ratio above 2 means a bias comparable to the noise.
    tr_cov = ((each - each.mean(0)) ** 2).sum() / (n - 1)
    ratio = ((mean - g) ** 2).sum() / (tr_cov / n)
    assert ratio < 2.0, f"‖ĝ − g‖² is {ratio:.2f}× its variance"
    # and the noise is small enough that a 20% scale error would show
    assert (0.2 * g).pow(2).sum() > 3 * tr_cov / n


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_c_hat_predicts_the_spread_of_one_unit_estimate(case):
    each, _, _, c_hat = case_estimates(case)
    tr_cov = ((each - each.mean(0)) ** 2).sum() / (len(each) - 1)
    # κ_j drops Tr Cov's −‖g_j‖² and the correlation of (Δ/σ)² with ε, terms of relative size up to 1/out
    # (outputs.py), a few % here; the sample trace of 8,192 units adds about 2%.
    assert 0.85 < c_hat / tr_cov < 1.15


def run_local(replicas: int, steps=6, model=build_mlp, **train):
    cfg = TrainConfig(steps=steps, batch_size=24, sigma=0.01, learning_rate=0.1, chunk_size=8,
                      noise_space="outputs", **train)
    spec = dict(optimizer=cfg.optimizer_config(), embedding_module="1" if model is build_mlp else "")
    reps = [output_replica(model(), cfg.sigma, cfg.noise, cfg.layer_sigma, **spec) for _ in range(replicas)]
    engine = Engine(cfg, LocalExecutor(reps), blobs(), reps[0].d)
    return reps, [engine.step(t) for t in range(steps)]


CONFIGS = [dict(allocator="uniform"), dict(allocator="flops"), dict(allocator="neyman", neyman_pilot="discard"),
           dict(allocator="bernoulli", estimator="antithetic", noise="gaussian", optimizer="adam"),
           dict(allocator="flops", estimator="antithetic", layer_sigma="one", optimizer="momentum")]


@pytest.mark.parametrize("train", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_one_and_three_replicas_give_bit_identical_parameters(train):
    one, _ = run_local(1, **train)
    three, outcomes = run_local(3, **train)
    assert torch.equal(one[0].theta, three[0].theta)
    assert len({r.hash() for r in three}) == 1
    assert not torch.equal(one[0].theta, output_replica(build_mlp()).theta)  # it moved


def test_a_sequence_model_trains_bit_identically_on_three_replicas():
    one, outcomes = run_local(1, steps=4, model=TokenMLP, allocator="flops")
    three, _ = run_local(3, steps=4, model=TokenMLP, allocator="flops")
    assert torch.equal(one[0].theta, three[0].theta)


def test_only_seeds_and_coefficients_are_broadcast():
    _, outcomes = run_local(1, steps=1, allocator="flops")
    msg = outcomes[0].message
    assert msg.nbytes == 16 + 16 * len(msg.seeds)
    assert len(msg.seeds) == 24 * 8  # one seed per query: the budget B·A₀


def test_training_lowers_the_loss():
    _, outcomes = run_local(1, steps=40, allocator="flops")
    losses = [o.record.loss for o in outcomes]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_shared_pairing_is_a_config_error():
    with pytest.raises(ConfigError, match="train.noise_space / train.pairing"):
        Config.from_dict({"train": {"noise_space": "outputs", "pairing": "shared"}})


def test_unknown_space_and_layer_sigma_are_config_errors():
    with pytest.raises(ConfigError, match="train.noise_space: unknown value 'activations'"):
        Config.from_dict({"train": {"noise_space": "activations"}})
    with pytest.raises(ConfigError, match="train.layer_sigma"):
        Config.from_dict({"train": {"noise_space": "outputs", "layer_sigma": "max"}})


def test_a_target_module_that_is_not_linear_is_a_config_error():
    model = nn.Sequential(nn.Linear(10, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="'1' is a LayerNorm"):
        output_replica(model, include=["1"])
    assert output_replica(model, include=["0", "2"]).d == 10 * 8 + 8 + 8 * 3 + 3


def test_a_linear_called_twice_per_forward_is_a_config_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(10, 10)
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.layer(self.layer(x)))

    replica = output_replica(Twice())
    with pytest.raises(ConfigError, match="'layer' runs more than once"):
        run_on(replica)


def run_on(replica):
    cfg = TrainConfig(batch_size=8, chunk_size=8, allocator="uniform", noise_space="outputs")
    Engine(cfg, LocalExecutor([replica]), blobs(), replica.d).step(0)


def test_replaying_an_output_space_update_without_its_batch_is_refused():
    trained, outcomes = run_local(1, steps=1, allocator="uniform")
    fresh = output_replica(build_mlp())
    with pytest.raises(RuntimeError, match="replaying an output-space update log"):
        fresh.replay([outcomes[0].message])


def test_two_ray_workers_match_the_local_reference_bit_for_bit(tmp_path):
    ray = pytest.importorskip("ray")
    from flops_dist.api import train
    from flops_dist.targets import Target

    cfg = Config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.chunk_size, cfg.train.hash_every = 6, 24, 8, 3
    cfg.train.sigma, cfg.train.learning_rate, cfg.train.noise_space = 0.01, 0.1, "outputs"
    cfg.target.embedding_module = "1"
    cfg.cluster.workers, cfg.cluster.gpus_per_worker = 2, "0"
    cfg.output.run_dir, cfg.metrics.port = str(tmp_path / "run"), -1
    cfg.validate()
    reference = Replica(build_mlp(), cross_entropy, blobs(), ReplicaSpec.from_config(cfg, threads=1))
    engine = Engine(cfg.train, LocalExecutor([reference]), blobs(), reference.d)
    for t in range(cfg.train.steps):
        engine.step(t)
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             logging_level="WARNING")
    try:
        model = train(build_mlp(), cross_entropy, blobs(), cfg, progress=lambda line: None).model
    finally:
        ray.shutdown()
    assert torch.equal(Target.select(model, "all").flatten(model), reference.theta)
