"""Worker memory against inference and backprop, from the digits head up to every MiniLM weight.

    python bench/memory.py [--steps 3] [--smoke] [--only NAME]

For each target, three fresh Ray actors of the same kind (so each has its own high-water mark and
the same runtime overhead) report their peak memory (VmHWM on the CPU; max_memory_allocated on
CUDA):
- inference: the model's forward on one chunk of training examples, without gradients;
- backprop: one SGD step by autograd on the same chunk, the target's parameters trainable;
- worker: a flops_dist worker training the target for a few steps (one worker, the job's pairing).
The last line is read by a program:

    max worker/inference peak memory ratio: R
"""
from __future__ import annotations

import argparse

import numpy as np
import ray
import torch

import flops_dist
from common import EXAMPLES, example_job, fresh_dir
from flops_dist.config import Config
from flops_dist.loading import as_dataset, build_model, load_callable, sample_rows
from flops_dist.metrics import peak_rss_bytes
from flops_dist.targets import Target

# (name, example, job file, target: None keeps the job's)
CASES = [
    ("digits ViT head", "digits", "digits.toml", None),
    ("digits ViT all weights", "digits", "digits.toml", ["all"]),
    ("MiniLM last 2 blocks", "minilm_finetune", "last_blocks.toml", None),
    ("MiniLM all weights", "minilm_finetune", "all_weights.toml", None),
]


def job_config(example: str, toml: str, include, steps: int, run_dir) -> Config:
    raw = example_job(example, toml)
    if include:
        raw["target"]["include"] = include
    raw["data"]["test"] = ""
    raw["train"].update(steps=steps)
    raw["cluster"] = {**raw.get("cluster", {}), "workers": 1, "min_workers": 1}
    raw["output"] = {"run_dir": str(run_dir), "log_every": 10**6, "snapshot_every": 10**6}
    raw["metrics"] = {"port": -1}  # no port that a run beside this one could hold
    return Config.from_dict(raw, EXAMPLES / example)


def device_peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()


@ray.remote(num_cpus=1)
class Probe:
    """A process that runs the plain-torch baselines once and reports its peak memory."""

    def run(self, cfg: Config, chunk, backprop: bool) -> int:
        torch.set_num_threads(cfg.cluster.threads_per_worker)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(cfg).to(device)
        loss_fn = load_callable(cfg.model.loss, "model.loss")
        x, y = torch.tensor(chunk.inputs, device=device), torch.tensor(chunk.labels, device=device)
        if not backprop:
            with torch.no_grad():
                model(x)
            return device_peak()
        trainable = set(Target.select(model, cfg.target.include).names)
        params = [p for n, p in model.named_parameters() if n in trainable]
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        optimizer = torch.optim.SGD(params, lr=cfg.train.learning_rate)
        loss_fn(model(x), y).mean().backward()
        optimizer.step()
        return device_peak()


def measure(cfg: Config) -> dict:
    # the chunk is sent, as the coordinator sends a worker its rows
    chunk = sample_rows(as_dataset(cfg.data.train, cfg, "train"), min(cfg.train.chunk_size, cfg.train.batch_size))
    probes = {kind: Probe.remote() for kind in ("inference", "backprop")}
    out = {kind: ray.get(p.run.remote(cfg, chunk, kind == "backprop")) for kind, p in probes.items()}
    for p in probes.values():
        ray.kill(p)
    result = flops_dist.train(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), cfg.data.train, cfg,
                              progress=lambda line: None)
    out["worker"] = max(result.peak_memory["workers"])
    out["d"] = Target.select(result.model, cfg.target.include).numel
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one step, the digits targets only")
    ap.add_argument("--only", default="", help="the targets whose name contains this, e.g. MiniLM")
    args = ap.parse_args()
    cases = [c for c in (CASES[:2] if args.smoke else CASES) if args.only in c[0]]
    steps = 1 if args.smoke else args.steps
    out = fresh_dir("memory")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    mb = 1024**2
    ratios = []
    print(f"{'target':24} {'d':>11} {'inference MB':>13} {'backprop MB':>12} {'worker MB':>10} {'worker/inf':>10}")
    for name, example, toml, include in cases:
        cfg = job_config(example, toml, include, steps, out / name.replace(" ", "_"))
        m = measure(cfg)
        ratios.append(m["worker"] / m["inference"])
        print(f"{name:24} {m['d']:>11,} {m['inference'] / mb:>13.0f} {m['backprop'] / mb:>12.0f} "
              f"{m['worker'] / mb:>10.0f} {ratios[-1]:>10.2f}", flush=True)
    ray.shutdown()
    print(f"max worker/inference peak memory ratio: {max(ratios):.2f}")


if __name__ == "__main__":
    main()
