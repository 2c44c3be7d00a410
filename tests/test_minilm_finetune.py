"""The MiniLM fine-tuning example, tiny: the real pretrained encoder, one forward-only step of each
job file's target on 32 short tweets, in one process (the engine's local reference step)."""
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


# d: 2 of MiniLM's 6 blocks (1,774,464 each) or all of its 22,565,376 weights but the unused pooler,
# plus the classifier (2 × 384 + 2); a tail target lets the frozen prefix (embeddings, blocks 0-3) run once
@pytest.mark.parametrize("job_file, d, prefix", [
    ("last_blocks.toml", 2 * 1_774_464 + 2 * 385, ["embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]),
    ("all_weights.toml", 22_565_376 + 2 * 385, None)])
def test_a_forward_only_step_changes_theta_identically_on_two_replicas(minilm_job, example, job_file, d, prefix):
    model, _, classifier = example
    cfg = Config.load(minilm_job / job_file, ["train.batch_size=8", "train.chunk_size=4"])
    train = data(minilm_job, "train")
    spec = ReplicaSpec.from_config(cfg, device="cpu")
    replicas = [Replica(copy.deepcopy(classifier), model.per_example_cross_entropy, train, spec) for _ in range(2)]
    start = replicas[0].theta.clone()
    engine = Engine(cfg.train, LocalExecutor(replicas), train, replicas[0].d)
    record = engine.step(0).record
    assert replicas[0].d == d
    assert (replicas[0].forward.prefix and replicas[0].forward.prefix.names) == prefix
    if prefix:  # the tail's attention and pooling mask padding by the token ids: the input stays live
        assert not replicas[0].forward.prefix.input_dead
    assert torch.isfinite(torch.tensor(record.loss)) and record.dropped_queries == 0
    assert len({r.hash() for r in replicas}) == 1  # the chunks were dealt to both, the bits agree
    assert not torch.equal(replicas[0].theta, start)
