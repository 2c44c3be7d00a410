"""Pick learning rate and σ on the validation split, in one process (no Ray): the engine's local
reference step, which computes the same bits as `flops-dist train` on any number of workers.

    python examples/sentiment_prompt/tune.py prompt_code.toml --lr 1 3 10 --sigma 0.003 0.01 0.03 \
        [--steps 150] [--eval-every 50] [--set train.seed=0 ...]

Trains every (lr, σ) of the grid on the train split for the job's steps and prints the validation
loss and accuracy every --eval-every steps, then the grid at the last step and its winner: the
lowest validation loss. Loss, not accuracy: on 400 tweets accuracy moves in steps of 0.0025 and
its sampling error (about 0.02) is larger than the gaps between neighbouring grid points, while the
cross-entropy uses every tweet's margin. Train and validation are airline tweets; the test splits
(Apple tweets, and airline tweets in neither; prepare.py) are never read.
"""
import argparse
import itertools
import os
import sys
import time

import torch

from flops_dist.apps.minilm import classification_score
from flops_dist.config import Config
from flops_dist.data import ArrayDataset, load_dataset
from flops_dist.engine import Engine, LocalExecutor
from flops_dist.loading import build_model, load_callable
from flops_dist.replica import NonFiniteUpdate, Replica, ReplicaSpec

HERE = os.path.dirname(os.path.abspath(__file__))


def score(replica: Replica, data: ArrayDataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy at θ over a split."""
    def logits_of(x):
        return replica.forward.scores(replica.forward.call(replica.theta, x), x)
    return classification_score(logits_of, replica.inputs.new_tensor(data.inputs),
                                replica.labels.new_tensor(data.labels), chunk=100)


def run(cfg: Config, validation: ArrayDataset, eval_every: int, label: str) -> tuple[float, float]:
    """Train one grid point for cfg.train.steps; its validation (loss, accuracy) at the last step."""
    train = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
    spec = ReplicaSpec.from_config(cfg, device="cpu")
    replica = Replica(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), train.rows(range(16)), spec)
    engine = Engine(cfg.train, LocalExecutor([replica]), train, replica.d)
    began, steps = time.perf_counter(), cfg.train.steps
    for t in range(steps):
        engine.step(t)
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            loss, acc = score(replica, validation)
            print(f"{label}  step {t + 1:4d}  validation loss {loss:.4f}  accuracy {acc:.4f}  "
                  f"{time.perf_counter() - began:5.0f} s", flush=True)
    return loss, acc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--lr", type=float, nargs="+", required=True)
    parser.add_argument("--sigma", type=float, nargs="+", required=True)
    parser.add_argument("--steps", type=int, help="train.steps (default: the job's)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = args.job if os.path.exists(args.job) else os.path.join(HERE, args.job)
    overrides = args.set + ([f"train.steps={args.steps}"] if args.steps else [])
    base = Config.load(job, overrides)
    validation = load_dataset(os.path.join(os.path.dirname(base.data.train), "tweets_validation.parquet"),
                              base.data.input_column, base.data.label_column)
    results = {}
    for lr, sigma in itertools.product(args.lr, args.sigma):
        cfg = Config.load(job, overrides + [f"train.learning_rate={lr}", f"train.sigma={sigma}"])
        if not results:  # θ at step 0 is the same for every grid point: the zero-shot prompt
            replica = Replica(build_model(cfg), load_callable(cfg.model.loss, "model.loss"),
                              validation.rows(range(16)), ReplicaSpec.from_config(cfg, device="cpu"))
            print("zero-shot  validation loss {:.4f}  accuracy {:.4f}".format(*score(replica, validation)))
        try:
            results[lr, sigma] = run(cfg, validation, args.eval_every, f"lr {lr:g} σ {sigma:g}")
        except NonFiniteUpdate as e:  # too large a step: this grid point diverged, the others still run
            print(f"lr {lr:g} σ {sigma:g}  diverged: {e}")
            results[lr, sigma] = (float("inf"), float("nan"))
    print(f"\nvalidation at step {base.train.steps} (loss / accuracy); rows lr, columns σ")
    print("lr \\ σ  " + "".join(f"{sigma:>16g}" for sigma in args.sigma))
    for lr in args.lr:
        print(f"{lr:<8g}" + "".join(f"{results[lr, s][0]:>9.4f} / {results[lr, s][1]:.3f}"[-16:].rjust(16)
                                    for s in args.sigma))
    lr, sigma = min(results, key=lambda key: results[key][0])
    print(f"winner (lowest validation loss): learning_rate = {lr:g}, sigma = {sigma:g}")


if __name__ == "__main__":
    sys.exit(main())
