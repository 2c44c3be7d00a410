"""Queries per second of the system (real local Ray, 1 and 2 workers) over a plain torch loop that
evaluates the same perturbed forwards in one process.

    python bench/throughput.py [--steps 40] [--rounds 3] [--smoke]

Both sides use one torch thread per replica, the digits ViT, B = 32, A₀ = 8 (256 queries a step),
chunks of 16 vmapped perturbations, Rademacher noise over the target, and the same clean forward
and seed-based update per step. The plain loop keeps its noise in memory and has no allocator.
Each system run writes into its own run directory under a new bench/out/throughput-*, and serves
no metrics, so neither an earlier run (the README's main job included) nor a run beside it on the
same machine can refuse it. --smoke: 3 steps, 1 round; the digits data is prepared if missing.
"""
import argparse
import os
import time

import numpy as np
import ray
import torch
from torch.func import functional_call, vmap

from common import digits_config, fresh_dir
from flops_dist.api import ship_by_value
from flops_dist.loading import build_model, load_callable, sample_rows
from flops_dist.coordinator import RemoteCoordinator
from flops_dist.data import load_dataset


def plain_loop(cfg, steps):
    """What one would write without flops_dist: one process, batched perturbed forwards."""
    torch.set_num_threads(1)
    model = build_model(cfg).eval()
    loss_fn = load_callable(cfg.model.loss, "model.loss")
    data = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
    x_all, y_all = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    names = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    params = dict(model.named_parameters())
    frozen = {n: p.detach() for n, p in params.items() if n not in names}
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]
    t = cfg.train
    gen = torch.Generator().manual_seed(0)

    def as_params(flat):
        out, offset = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[..., offset:offset + s.numel()].reshape(*flat.shape[:-1], *s)
            offset += s.numel()
        return out

    def one(flat, x, y):
        return loss_fn(functional_call(model, {**frozen, **as_params(flat)}, (x[None],)), y[None])[0]

    batched = vmap(one)
    queries = 0
    began = time.perf_counter()
    with torch.no_grad():
        for step in range(steps):
            idx = torch.randperm(len(y_all), generator=gen)[:t.batch_size]
            clean = loss_fn(functional_call(model, {**frozen, **as_params(theta)}, (x_all[idx],)), y_all[idx])
            ex = idx.repeat_interleave(t.queries_per_example)
            grad = torch.zeros_like(theta)
            for start in range(0, len(ex), t.chunk_size):
                chunk = ex[start:start + t.chunk_size]
                u = torch.randint(0, 2, (len(chunk), theta.numel()), generator=gen).float() * 2 - 1
                losses = batched(theta + t.sigma * u, x_all[chunk], y_all[chunk])
                base = clean.repeat_interleave(t.queries_per_example)[start:start + t.chunk_size]
                grad += ((losses - base) / t.sigma) @ u / len(ex)
                queries += len(chunk)
            theta = theta - t.learning_rate * grad
    return queries / (time.perf_counter() - began)


def system(cfg, steps, workers):
    cfg.cluster.workers = workers
    model = build_model(cfg)
    loss_fn = load_callable(cfg.model.loss, "model.loss")
    data = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
    ship_by_value(model, loss_fn)
    refs = {"model": ray.put(model), "loss_fn": ray.put(loss_fn), "sample": ray.put(sample_rows(data, 16)),
            "train": ray.put(data), "test": None}
    coordinator = RemoteCoordinator.options(num_cpus=0).remote(cfg, refs)
    try:
        ray.get(coordinator.run.remote(3))  # warm-up: worker start, first vmap trace
        began = time.perf_counter()
        records = ray.get(coordinator.run.remote(steps))
        seconds = time.perf_counter() - began
    finally:
        ray.kill(coordinator)
    return sum(r["queries"] for r in records) / seconds


def config(run_dir):
    # hash_every=0: the replicas' agreement is the tests' business, not a cost to time here
    # A₀ = 8 in chunks of 16, and every query the whole ViT (as the plain loop's): the setting this
    # bench was measured in, not the main job's present one
    return digits_config(train__allocator="uniform", train__steps=10**6, train__hash_every=0,
                         train__queries_per_example=8, train__chunk_size=16, target__frozen_prefix="off",
                         output__run_dir=str(run_dir), metrics__port=-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 3, 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = fresh_dir("throughput")
    # address="local": a fresh Ray of our own, never a cluster that `ray start` left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = config(out / "plain")  # the plain loop writes nothing
    plain, one, two = [], [], []
    for r in range(args.rounds):  # interleaved, so drifts in machine load hit all three alike
        plain.append(plain_loop(cfg, args.steps))
        one.append(system(config(out / f"round-{r}-1-worker"), args.steps, 1))
        two.append(system(config(out / f"round-{r}-2-workers"), args.steps, 2))
    p, o, t = np.median(plain), np.median(one), np.median(two)
    print(f"plain torch loop, 1 process : {p:8.0f} queries/s (median of {args.rounds})")
    print(f"flops_dist, 1 worker        : {o:8.0f} queries/s   ratio to plain {o / p:.2f}")
    print(f"flops_dist, 2 workers       : {t:8.0f} queries/s   ratio to plain {t / p:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
