"""The Python API: a model, a loss, a dataset and a config in; a trained model and a run log out.

    result = flops_dist.train(model, loss_fn, train_data, config, test_data=...)

It joins (or starts) Ray, runs a preflight of the model in this process so a mistake gets a clear
message rather than a traceback from inside an actor, starts the coordinator on this node (so the
run directory is local), and shows progress while the coordinator trains.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn

from .config import Config, ConfigError, require_batch_fits
from .coordinator import RemoteCoordinator
from .data import ArrayDataset
from .loading import as_dataset, build_model, check_resume, load_callable, sample_rows  # noqa: F401 (the API's loaders)
from .losses import as_loss
from .replica import Replica, ReplicaSpec
from .runlog import check_run_dir, read_log
from .sharding import chunk_examples, plan_queries


class TrainingError(RuntimeError):
    """A run that could not go on; the message says why in one line, `details` holds the rest."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


@dataclass
class TrainResult:
    model: nn.Module
    run_log: pa.Table
    run_dir: Path
    metric_before: float | None
    metric_after: float | None
    peak_memory: dict  # peak resident bytes: {"coordinator": n, "workers": [n, ...]}


def ship_by_value(model: nn.Module, loss_fn) -> None:
    """Pickle the user's own modules (those not installed in site-packages) by value, so workers
    need neither the files nor the driver's sys.path."""
    modules = {type(m).__module__ for m in model.modules()} | {getattr(loss_fn, "__module__", None)}
    for name in modules:
        module = sys.modules.get(name or "")
        path = getattr(module, "__file__", None) or ""
        if module is None or name == "__main__" or not path or "-packages" in path \
                or name.split(".")[0] in ("torch", "flops_dist"):
            continue
        ray.cloudpickle.register_pickle_by_value(module)


def preflight(model: nn.Module, loss_fn, sample: ArrayDataset, cfg: Config) -> None:
    """One clean forward and one chunk of perturbed queries on a few examples, in this process."""
    import copy
    t = cfg.train
    try:
        as_loss(loss_fn).ensure_loaded(torch.device("cpu"))
    except Exception as e:
        raise TrainingError(f"model.loss: the frozen model failed to load: {type(e).__name__}: {e}",
                            traceback.format_exc()) from None
    try:  # the prefix is looked for below, once the model is known to run on the data
        spec = ReplicaSpec.from_config(cfg, threads=torch.get_num_threads(), device="cpu", frozen_prefix="off")
        replica = Replica(copy.deepcopy(model).cpu(), loss_fn, sample, spec)
    except ValueError as e:
        raise ConfigError(f"target: {e}") from None
    try:
        with torch.no_grad():
            outputs = replica.forward.call(replica.theta, replica.inputs)
            losses, _ = replica.forward.losses(outputs, replica.inputs, replica.labels)
            if cfg.data.metric == "accuracy":
                replica.forward.scores(outputs, replica.inputs)
        if not torch.is_tensor(losses) or losses.shape != (len(sample),):
            shape = list(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
            raise TrainingError(f"the loss function must return one loss per example (shape [{len(sample)}]), "
                                f"got {shape}; check its reduction")
        _find_prefix(replica, cfg.target.frozen_prefix)
        rows, _ = chunk_examples(np.arange(len(sample)), t.chunk_size)
        replica.clean_forward(sample, rows)
        plan = plan_queries(np.zeros(len(sample), np.int64), np.ones(len(sample), np.int64), 1, t.unit,
                            t.pairing == "shared", t.chunk_size)
        replica.evaluate(plan.chunks.take(np.arange(1)))
    except (TrainingError, ConfigError):
        raise
    except Exception as e:
        raise TrainingError(f"the model or loss failed on a first batch of {len(sample)} examples: "
                            f"{type(e).__name__}: {e}", traceback.format_exc()) from None


def _find_prefix(replica, boundary: str) -> None:
    try:
        replica.forward.find_prefix(replica.theta, replica.inputs[:16], boundary)
    except ValueError as e:
        if "frozen_prefix" in str(e):
            raise ConfigError(str(e)) from None
        raise


def start_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
    else:  # "local": always a fresh instance of our own, never a cluster left running by `ray start`
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or None, include_dashboard=False,
                 logging_level=logging.WARNING)


def _progress_line(records: list[dict], total: int, began: float, first: int, metric: str) -> str:
    rec, scored = records[-1], [r["test_metric"] for r in records if not np.isnan(r["test_metric"])]
    done = rec["step"] + 1
    rate = (done - first) / max(time.perf_counter() - began, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("nan")
    lam = "" if np.isnan(rec["lambda_beta0"]) else (
        f"  λ=(β0 {rec['lambda_beta0']:.2f}, β1 {rec['lambda_beta1']:.2f}, s {rec['lambda_s']:.2f}, "
        f"γ {rec['lambda_gamma']:.2f})")
    test = f"  test {metric} {scored[-1]:.4f}" if scored else ""
    return (f"step {done:>5}/{total}  loss {rec['loss']:.4f}{test}  A {rec['allocation_min']}-{rec['allocation_max']}"
            f"  {rate:.1f} steps/s  eta {eta:4.0f}s  workers {rec['workers_alive']}{lam}")


def train(model: nn.Module, loss_fn, train_data, config: Config, test_data=None,
          progress=print, resume: bool = False) -> TrainResult:
    """Train `model`'s target parameters forward-only; returns the trained model and the run log.
    With resume=True, continue the run in config.output.run_dir from its last snapshot plus its
    update log; the result is bit-identical to an uninterrupted run."""
    cfg = config.validate()
    train_set = as_dataset(train_data, cfg, "train data")
    test_set = as_dataset(test_data, cfg, "test data") if test_data is not None else None
    require_batch_fits(cfg.train.batch_size, len(train_set))  # before Ray starts, not in the coordinator
    sample = sample_rows(train_set, cfg.train.chunk_size)
    preflight(model, loss_fn, sample, cfg)
    try:
        check_run_dir(cfg.output.run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if resume:
        check_resume(cfg, Path(cfg.output.run_dir))
    if cfg.output.score_every and test_set is None:
        progress(f"flops_dist: output.score_every = {cfg.output.score_every}, but no test data was given "
                 "(data.test, or test_data=): nothing will be scored")
    start_ray(cfg)
    ship_by_value(model, loss_fn)
    refs = {"model": ray.put(model), "loss_fn": ray.put(loss_fn), "sample": ray.put(sample),
            "train": ray.put(train_set), "test": ray.put(test_set) if test_set is not None else None}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = RemoteCoordinator.options(num_cpus=0, scheduling_strategy=here).remote(cfg, refs, resume)
    try:
        before, after, memory, state = _drive(coordinator, cfg, progress, resume)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
        raise _training_error(e, cfg) from None
    finally:
        ray.kill(coordinator)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    run_dir = Path(cfg.output.run_dir)
    from .plots import plot_run
    plot_run(run_dir)
    return TrainResult(model, read_log(run_dir, "run_log"), run_dir, before, after, memory)


def _drive(coordinator, cfg: Config, progress, resume: bool):
    """Start, score, train with a progress line every output.log_every steps, score, finish."""
    info = ray.get(coordinator.info.remote())
    if info.get("error"):
        raise TrainingError(info["error"], info["details"])
    devices = sorted({w["device"] for w in info["workers"]})
    progress(f"flops_dist: {len(info['workers'])} workers on {', '.join(devices)}; d = {info['d']} target "
             f"parameters; run dir {info['run_dir']}" + (f"; resumed at step {info['step']}" if resume else ""))
    for line in [f"flops_dist: {note}" for note in info["notes"]] + (
            [f"metrics at {info['metrics_url']}"] if info["metrics_url"] else []):
        progress(line)
    before = ray.get(coordinator.score.remote())
    if before is not None:
        progress(f"test {cfg.data.metric} before: {before:.4f}")
    began, first = time.perf_counter(), info["step"]
    while records := ray.get(coordinator.run.remote(cfg.output.log_every)):
        progress(_progress_line(records, cfg.train.steps, began, first, cfg.data.metric))
    after = ray.get(coordinator.score.remote())
    if after is not None:
        progress(f"test {cfg.data.metric} after:  {after:.4f}")
    memory = ray.get(coordinator.peak_memory.remote())
    return before, after, memory, ray.get(coordinator.finish.remote())


def _training_error(e: Exception, cfg: Config) -> TrainingError:
    """One line for the user from what Ray raised; the remote traceback goes to `details`."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        return TrainingError(f"{type(cause).__name__}: {cause}", str(e))
    return TrainingError(f"the coordinator died ({type(e).__name__}); the run can go on from its last "
                         f"snapshot: flops-dist train --resume {cfg.output.run_dir}", str(e))
