"""Output-space against weight-space noise: the gradient-estimate error at an equal query budget.

    python bench/output_space.py [--reps 16] [--batches 4] [--smoke]

The model is the main job's digits ViT (examples/digits, pretrained by backprop on digits 0-4), and
the target is every block: the weights and biases of each block's four nn.Linear layers (attention
qkv and proj, the MLP's two), d = 16,832. The blocks' LayerNorm parameters stay frozen for both
estimators, since output-space noise has no output to put them on. Both run the same job: B = 32,
A₀ = 8 (256 queries a step), the uniform allocator, Rademacher noise, the lr and the antithetic
estimators. Weight space uses σ = 1e-3 (the main job's); output space σ = 1e-2 with
layer_sigma = "rms", so each layer's noise is 1% of its own clean output's RMS.

For --batches fixed batches, each estimate ĝ is repeated --reps times (the batch pinned, the step
index varied: new query seeds), against the batch gradient g by backprop. MSE = mean ‖ĝ − g‖²,
summed over batches; the ratio is output space's over weight space's (± a jackknife over batches).
Also the bias²'s share of each MSE, g-gain = Σ gᵀĝ̄ / Σ ‖g‖² (1 when unbiased) and the seconds a step
takes (one replica, this process). The last line is read by a program:

    output-space / weight-space gradient error: R

R is the ratio for the lr estimator (the main job's). --smoke: 2 batches × 2 repeats of B = 8.
"""
import argparse
import time

import numpy as np
import torch

from common import digits_config, gradient_errors, jackknife_ratio
from flops_dist.data import load_dataset
from flops_dist.loading import build_model, load_callable
from flops_dist.replica import Replica, ReplicaSpec

BLOCK_LINEARS = [r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.[02])\.(weight|bias)"]
SPACES = {"weights": dict(train__sigma=1e-3), "outputs": dict(train__sigma=1e-2, train__layer_sigma="rms")}


def setup(space: str, estimator: str, batch_size: int):
    """The job's config, its replica and its training data for one space and estimator."""
    cfg = digits_config(target__include=BLOCK_LINEARS, train__noise_space=space, train__estimator=estimator,
                        train__allocator="uniform", train__batch_size=batch_size, train__queries_per_example=8,
                        train__chunk_size=128, **SPACES[space])
    spec = ReplicaSpec.from_config(cfg, threads=1, device="cpu")
    data = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
    return cfg, Replica(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), data, spec), data


def measure(space, estimator, batches, reps, batch_size):
    """gradient_errors' rows [batches, (MSE, variance, bias², ‖g‖², gᵀĝ̄)], d, and seconds per step."""
    cfg, replica, data = setup(space, estimator, batch_size)
    began = time.perf_counter()
    errors = gradient_errors(cfg.train, replica, data, batches, reps)
    return errors, replica.d, (time.perf_counter() - began) / (len(batches) * reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    batch_size = 8 if args.smoke else 32
    if args.smoke:
        args.reps, args.batches = 2, 2
    torch.set_num_threads(1)
    rng = np.random.default_rng(123)
    n = len(setup("weights", "lr", batch_size)[2])
    batches = [rng.choice(n, batch_size, replace=False) for _ in range(args.batches)]
    print(f"digits ViT, every block's Linear layers; B = {batch_size}, A₀ = 8, uniform; "
          f"{args.batches} batches × {args.reps} repeats")
    print(f"{'estimator':>10} {'space':>8} {'d':>7} {'MSE ÷ ‖g‖²':>11} {'bias² share':>11} {'g-gain':>7} {'s/step':>7}")
    ratios = {}
    for estimator in ("antithetic", "lr"):
        mse = {}
        for space in SPACES:
            errors, d, seconds = measure(space, estimator, batches, args.reps, batch_size)
            mse[space] = errors[:, 0]
            print(f"{estimator:>10} {space:>8} {d:>7} {errors[:, 0].sum() / errors[:, 3].sum():11.3g} "
                  f"{errors[:, 2].sum() / errors[:, 0].sum():11.3f} {errors[:, 4].sum() / errors[:, 3].sum():7.3f} "
                  f"{seconds:7.3f}", flush=True)
        ratios[estimator] = jackknife_ratio(mse["outputs"], mse["weights"])
        print(f"{estimator:>10} output-space / weight-space MSE: {ratios[estimator][0]:.4f} "
              f"± {ratios[estimator][1]:.4f}", flush=True)
    print(f"output-space / weight-space gradient error: {ratios['lr'][0]:.4f}")


if __name__ == "__main__":
    main()
