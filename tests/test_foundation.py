"""The black-box applications, tiny, with the real frozen MiniLM: a few steps on a small subset."""
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.numpy import load_file

from flops_dist.config import TrainConfig
from flops_dist.data import load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.replica import Replica, ReplicaSpec
from flops_dist.runlog import read_log
from flops_dist.apps.tweets import topic


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_prompt_code_tuning_runs_on_ray_with_the_real_encoder(tweets, tmp_path):
    out = run("-m", "flops_dist.cli", "train", str(tweets / "prompt_code.toml"), "--set", "train.steps=3",
              "--set", "train.batch_size=8", "--set", "output.log_every=1", "--set", "metrics.port=-1",
              "--set", f"output.run_dir='{tmp_path / 'run'}'")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 workers" in out.stdout and "d = 32 target parameters" in out.stdout
    assert "test accuracy before: 0." in out.stdout and "test accuracy after:  0." in out.stdout
    assert read_log(tmp_path / "run", "run_log").column("queries").to_pylist() == [32, 32, 32]
    code = load_file(tmp_path / "run" / "model.safetensors")["code"]
    assert code.shape == (32,) and np.abs(code).sum() > 0  # z started at 0 and moved


def test_the_direct_soft_prompt_is_bit_identical_on_one_and_two_replicas(tweets):
    sys.path.insert(0, str(tweets))
    try:
        import prompt
    finally:
        sys.path.remove(str(tweets))
    data = load_dataset(tweets / "data" / "tweets_train.parquet", "tokens", "label")
    cfg = TrainConfig(batch_size=8, queries_per_example=4, sigma=0.01, learning_rate=1.0, chunk_size=4,
                      allocator="flops")
    spec = ReplicaSpec(sigma=cfg.sigma)
    thetas = []
    for n in (1, 2):
        replicas = [Replica(prompt.build_soft_prompt(), prompt.loss, data, spec) for _ in range(n)]
        engine = Engine(cfg, LocalExecutor(replicas), data, replicas[0].d)
        for t in range(2):
            engine.step(t)
        assert len({r.hash() for r in replicas}) == 1
        thetas.append(replicas[0].theta)
    assert replicas[0].d == 6 * 384
    assert torch.equal(thetas[0], thetas[1])
    assert not torch.equal(thetas[0], prompt.build_soft_prompt().prompt.detach().reshape(-1))


def test_a_tweet_has_a_topic_only_when_one_topics_keywords_match():
    assert topic("@united lost my bag again") == "airlines"
    assert topic("Thank you @Apple, the new iPhone is great") == "apple"
    assert topic("Tom Brady says he did not deflate the balls") == "deflategate"
    assert topic("@JetBlue left my iPad on the flight") is None  # two topics
    assert topic("what a lovely day") is None


def test_the_prompt_splits_are_disjoint_balanced_and_on_their_topics(tweets):
    names = ("train", "validation", "test", "other_topic")
    splits = {name: pq.read_table(tweets / "data" / f"tweets_{name}.parquet").to_pydict() for name in names}
    texts = {name: set(split["text"]) for name, split in splits.items()}
    assert [len(texts[name]) for name in names] == [32, 16, 16, 16]  # distinct tweets, none lost
    assert sum(len(t) for t in texts.values()) == len(set.union(*texts.values()))  # disjoint
    assert {topic(t) for t in texts["train"] | texts["validation"] | texts["test"]} == {"airlines"}
    assert {topic(t) for t in texts["other_topic"]} == {"apple"}
    for split in splits.values():
        assert np.bincount(split["label"]).tolist() == [len(split["label"]) // 2] * 2  # balanced


def test_tune_trains_a_grid_on_train_and_scores_it_on_validation(tweets):
    out = run(str(tweets / "tune.py"), str(tweets / "prompt_code.toml"), "--lr", "1", "3", "--sigma", "0.01",
              "--steps", "2", "--eval-every", "1", "--set", "train.batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("  validation loss ") == 1 + 2 * 2  # zero-shot, then 2 steps × 2 grid points
    assert "winner (lowest validation loss): learning_rate = " in out.stdout


def test_alignment_learns_forward_only_through_the_cli(alignment, tmp_path):
    out = run("-m", "flops_dist.cli", "train", str(alignment / "alignment.toml"), "--set", "train.steps=30",
              "--set", "output.log_every=10", "--set", "metrics.port=-1",
              "--set", f"output.run_dir='{tmp_path / 'run'}'")
    assert out.returncode == 0, out.stderr[-3000:]
    before = float(out.stdout.split("test accuracy before:")[1].split()[0])
    after = float(out.stdout.split("test accuracy after:")[1].split()[0])
    # ten label texts: chance is 0.1; 30 forward-only steps take retrieval far above it
    assert before < 0.2 and after > 0.5, out.stdout[-2000:]
