"""Pick learning rate and σ on the validation split, in one process (no Ray): the engine's local
reference step, which computes the same bits as `flops-dist train` on any number of workers.

    python examples/minilm_finetune/tune.py last_blocks.toml --lr 1e-4 3e-4 --sigma 1e-3 \
        [--steps 400] [--eval-every 100] [--set train.estimator=lr ...]

Prints the validation loss and accuracy of each (lr, σ) every --eval-every steps; the test split
is never read.
"""
import argparse
import itertools
import os
import sys
import time

import torch

from flops_dist.config import Config
from flops_dist.data import load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.loading import build_model, load_callable
from flops_dist.replica import Replica, ReplicaSpec
from flops_dist.apps.minilm import classification_score
from evaluate import load_split

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cfg: Config, validation, steps: int, eval_every: int, label: str) -> None:
    train = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
    spec = ReplicaSpec.from_config(cfg, device="cpu")
    replica = Replica(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), train.rows(range(16)), spec)
    engine = Engine(cfg.train, LocalExecutor([replica]), train, replica.d)
    began = time.perf_counter()
    for t in range(steps + 1):
        if t % eval_every == 0:
            loss, acc = classification_score(lambda ids: replica.forward.call(replica.theta, ids), *validation)
            print(f"{label}  step {t:5d}  validation loss {loss:.4f}  accuracy {acc:.4f}  "
                  f"{time.perf_counter() - began:6.0f} s", flush=True)
        if t < steps:
            engine.step(t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--lr", type=float, nargs="+", required=True)
    parser.add_argument("--sigma", type=float, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = args.job if os.path.exists(args.job) else os.path.join(HERE, args.job)
    base = Config.load(job, args.set)
    validation = load_split(os.path.join(os.path.dirname(base.data.train), "validation.parquet"))
    for lr, sigma in itertools.product(args.lr, args.sigma):
        cfg = Config.load(job, args.set + [f"train.learning_rate={lr}", f"train.sigma={sigma}"])
        run(cfg, validation, args.steps, args.eval_every, f"lr {lr:g} σ {sigma:g}")


if __name__ == "__main__":
    sys.exit(main())
