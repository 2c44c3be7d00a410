"""Frozen-prefix reuse on the main job: queries per second with and without it, in one run.

    python bench/prefix_reuse.py [--steps 60] [--rounds 2] [--queries-per-example A --chunk-size C] [--workers W]
                                 [--smoke]

The main job (examples/digits/digits.toml: the ViT's head is the target, so the patch embedding, both
blocks and the norm are its frozen prefix) runs with `target.frozen_prefix = "off"` and "auto" in
turn, `rounds` times, in one Ray instance. Queries per second are Σ queries / Σ step seconds from the
run log, after the first 5 steps (warm-up). Both settings must end with bit-identical models; the
bench says so and fails otherwise. The last line is read by a program:

    prefix reuse speedup: S

S is the median over rounds of auto's queries/s over off's, each round's pair run side by side.
--queries-per-example and --chunk-size run the job at another budget (a step's fixed costs weigh
more at a small one). --workers runs it on another number of workers than the job's (2): with reuse
a step's work is small beside its fixed costs, so off gains from a second worker and auto much less.
"""
from __future__ import annotations

import argparse
import hashlib

import numpy as np
import ray

import flops_dist
from common import digits_config, fresh_dir
from flops_dist.loading import build_model, load_callable

WARMUP = 5


def run(steps: int, mode: str, run_dir, overrides: dict) -> tuple[float, str]:
    """(queries per second after warm-up, the final model's θ hash)."""
    cfg = digits_config(train__steps=steps, target__frozen_prefix=mode, output__run_dir=str(run_dir),
                        output__log_every=10**6, metrics__port=-1, **overrides)
    cfg.data.test = ""
    result = flops_dist.train(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), cfg.data.train, cfg,
                              progress=lambda line: None)
    log = result.run_log.to_pydict()
    queries, seconds = np.array(log["queries"][WARMUP:]), np.array(log["seconds"][WARMUP:])
    digest = hashlib.sha256()
    for name, value in sorted(result.model.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return queries.sum() / seconds.sum(), digest.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--queries-per-example", type=int, help="instead of the job's")
    ap.add_argument("--chunk-size", type=int, help="instead of the job's")
    ap.add_argument("--workers", type=int, help="instead of the job's")
    ap.add_argument("--smoke", action="store_true", help="one round of 8 steps")
    args = ap.parse_args()
    steps, rounds = (8, 1) if args.smoke else (args.steps, args.rounds)
    overrides = {f"train__{k}": v for k, v in (("queries_per_example", args.queries_per_example),
                                               ("chunk_size", args.chunk_size)) if v}
    if args.workers:
        overrides["cluster__workers"] = args.workers
    out = fresh_dir("prefix_reuse")
    ray.init(address="local", num_cpus=max(2, args.workers or 0), include_dashboard=False, logging_level="WARNING")
    ratios, hashes = [], set()
    print(f"{'round':>5} {'off q/s':>9} {'auto q/s':>9} {'speedup':>8}")
    for r in range(rounds):
        off, h_off = run(steps, "off", out / f"off-{r}", overrides)
        auto, h_auto = run(steps, "auto", out / f"auto-{r}", overrides)
        hashes |= {h_off, h_auto}
        ratios.append(auto / off)
        print(f"{r:>5} {off:>9.0f} {auto:>9.0f} {ratios[-1]:>8.2f}", flush=True)
    ray.shutdown()
    if len(hashes) != 1:
        raise SystemExit(f"prefix reuse changed the trained model: θ hashes {sorted(hashes)}")
    print(f"the trained models are bit-identical with and without reuse (sha256 {hashes.pop()[:16]})")
    print(f"prefix reuse speedup: {np.median(ratios):.2f}")


if __name__ == "__main__":
    main()
