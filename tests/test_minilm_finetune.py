"""The MiniLM fine-tuning example, tiny: the real pretrained encoder, a few forward-only steps of
each job file's target on 32 short tweets, in one process (the engine's local reference step)."""
import copy
import sys

import pytest
import torch

from flops_dist.apps.minilm import MiniLM
from flops_dist.config import Config
from flops_dist.data import load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec


@pytest.fixture(scope="module")
def example(minilm_job):
    """(the example's model module, the encoder, a model built on it)"""
    sys.path.insert(0, str(minilm_job))
    try:
        import model
    finally:
        sys.path.remove(str(minilm_job))
    encoder = MiniLM("cpu")
    return model, encoder, model.build_model(encoder)


def data(job, split):
    return load_dataset(job / "data" / f"{split}.parquet", "tokens", "label")


def test_the_model_at_step_0_is_the_zero_shot_classifier(minilm_job, example):
    model, encoder, classifier = example
    test = data(minilm_job, "test")
    ids = torch.from_numpy(test.inputs)
    with torch.no_grad():  # zero-shot: cosine of MiniLM's sentence embedding to each label text's
        zero_shot = encoder.encode(ids) @ encoder.encode_texts(model.LABEL_TEXTS).T / model.TEMPERATURE
    replica = Replica(copy.deepcopy(classifier), model.per_example_cross_entropy, test, ReplicaSpec())
    logits = replica.forward.call(replica.theta, ids)
    # the same encoder weights through our own 4-D mask: equal up to float rounding (cosines × 1/τ = 20)
    torch.testing.assert_close(logits, zero_shot, atol=1e-4, rtol=0)
    expected = float((zero_shot.argmax(-1) == torch.from_numpy(test.labels)).float().mean())
    assert replica.score(test, "accuracy") == expected


@pytest.mark.parametrize("job_file, d", [("last_blocks.toml", 2 * 1_774_464 + 2 * 385),
                                          ("all_weights.toml", 22_565_376 + 2 * 385)])
def test_forward_only_steps_change_theta_identically_on_two_replicas(minilm_job, example, job_file, d):
    model, _, classifier = example
    cfg = Config.load(minilm_job / job_file, ["train.batch_size=8", "train.chunk_size=4"])
    train = data(minilm_job, "train")
    spec = ReplicaSpec.from_config(cfg, device="cpu")
    replicas = [Replica(copy.deepcopy(classifier), model.per_example_cross_entropy, train, spec) for _ in range(2)]
    start = replicas[0].theta.clone()
    engine = Engine(cfg.train, LocalExecutor(replicas), train, replicas[0].d)
    records = [engine.step(t).record for t in range(2)]
    assert replicas[0].d == d
    assert all(torch.isfinite(torch.tensor(r.loss)) and r.dropped_queries == 0 for r in records)
    assert len({r.hash() for r in replicas}) == 1  # the chunks were dealt to both, the bits agree
    assert not torch.equal(replicas[0].theta, start)
