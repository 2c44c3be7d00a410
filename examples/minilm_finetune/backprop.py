"""The same fine-tuning by ordinary backprop: what the forward-only runs' budget buys with gradients.

    python examples/minilm_finetune/backprop.py last_blocks.toml --lr 0.03 [--steps 500]
        [--seconds 1500] [--eval-every 50] [--threads 2] [--optimizer sgd]

Same model (build_model), same target parameters (the job's target.include), same training data,
batch size and seed-driven order of examples, plain torch autograd. Every --eval-every steps it
prints the wall time, examples seen, and validation and test loss and accuracy; it stops after
--steps or once --seconds of training have passed.
"""
import argparse
import os
import time

import numpy as np
import torch

from flops_dist.config import Config
from flops_dist.targets import Target
from flops_dist.apps.minilm import classification_score
from evaluate import load_split  # noqa: E402 (the example dir is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))


def trainable(model: torch.nn.Module, include: list[str]) -> list[torch.nn.Parameter]:
    """The job's target parameters, with gradients on; every other one frozen."""
    names = set(Target.select(model, include).names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [p for name, p in model.named_parameters() if name in names]


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr) if kind == "adam" else torch.optim.SGD(params, lr=lr)


def report(model, splits, step, examples, seconds) -> None:
    model.eval()
    parts = [f"{name} loss {loss:.4f} accuracy {acc:.4f}"
             for name, (loss, acc) in ((name, classification_score(model, *data)) for name, data in splits.items())]
    print(f"step {step:5d}  examples {examples:6d}  {seconds:6.0f} s  " + "  ".join(parts), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)  # the forward-only runs use 2 workers × 1 thread
    args = parser.parse_args()
    cfg = Config.load(args.job if os.path.exists(args.job) else os.path.join(HERE, args.job))
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    from model import build_model
    model = build_model()
    optimizer = make_optimizer(args.optimizer, trainable(model, cfg.target.include), args.lr)
    ids, labels = load_split(cfg.data.train)
    splits = {name: load_split(os.path.join(os.path.dirname(cfg.data.train), f"{name}.parquet"))
              for name in ("validation", "test")}
    rng, order, batch, elapsed = np.random.default_rng(cfg.train.seed), np.array([], np.int64), cfg.train.batch_size, 0.0
    report(model, splits, 0, 0, 0.0)
    for step in range(1, args.steps + 1):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(labels))])
        rows, order = torch.from_numpy(order[:batch]), order[batch:]
        began = time.perf_counter()
        model.train(False)  # MiniLM's dropout stays off, as in the forward-only runs
        loss = torch.nn.functional.cross_entropy(model(ids[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - began
        if step % args.eval_every == 0 or elapsed >= args.seconds:
            report(model, splits, step, step * batch, elapsed)
        if elapsed >= args.seconds:
            break


if __name__ == "__main__":
    main()
