"""The Python API: a model, a loss, a dataset and a config in; a trained model and a run log out.

    result = flops_dist.train(model, loss_fn, train_data, config, test_data=...)

It joins (or starts) Ray, runs a preflight of the model in this process so a mistake gets a clear
message rather than a traceback from inside an actor, starts the coordinator on this node (so the
run directory is local), and shows progress while the coordinator trains.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn

from .config import Config, ConfigError
from .coordinator import RemoteCoordinator
from .data import ArrayDataset, DataError, ParquetSource, table_to_arrays
from .losses import as_loss
from .replica import Replica, ReplicaSpec
from .runlog import check_run_dir, read_log
from .sharding import chunk_examples, plan_queries


class TrainingError(RuntimeError):
    """A run that could not go on; the message says why."""


@dataclass
class TrainResult:
    model: nn.Module
    run_log: pa.Table
    run_dir: Path
    metric_before: float | None
    metric_after: float | None
    peak_memory: dict  # peak resident bytes: {"coordinator": n, "workers": [n, ...]}


def load_callable(spec: str, field: str):
    """`path/to/file.py:name` or `package.module:name`. A module loaded from a file is pickled by
    value, so Ray workers need not have the file."""
    path_part, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ConfigError(f"{field}: expected 'file.py:function' or 'package.module:function', got {spec!r}")
    if path_part.endswith(".py"):
        if not Path(path_part).is_file():
            raise ConfigError(f"{field}: file {path_part!r} does not exist")
        name = "flops_dist_user_" + Path(path_part).stem
        module_spec = importlib.util.spec_from_file_location(name, path_part)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        ray.cloudpickle.register_pickle_by_value(module)
    else:
        try:
            module = importlib.import_module(path_part)
        except ImportError as e:
            raise ConfigError(f"{field}: cannot import {path_part!r} ({e})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{field}: {path_part!r} has no attribute {attr!r}")
    return getattr(module, attr)


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


def build_model(cfg: Config) -> nn.Module:
    if not cfg.model.factory:
        raise ConfigError("model.factory: required, e.g. 'model.py:build_model'")
    model = load_callable(cfg.model.factory, "model.factory")()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: returned {type(model).__name__}, not a torch.nn.Module")
    if cfg.model.weights:
        from safetensors.torch import load_file
        if not Path(cfg.model.weights).is_file():
            raise ConfigError(f"model.weights: file {cfg.model.weights!r} does not exist")
        try:
            model.load_state_dict(load_file(cfg.model.weights))
        except Exception as e:  # a wrong file gets its cause, not a traceback
            raise ConfigError(f"model.weights: cannot load {cfg.model.weights!r} into the model: {e}") from None
    return model


def as_dataset(data, cfg: Config, role: str) -> ArrayDataset | ParquetSource:
    """In memory as given (an ArrayDataset or a pyarrow Table), or a Parquet file, directory of parts
    or glob, read a step's rows at a time."""
    if isinstance(data, (ArrayDataset, ParquetSource)):
        return data
    if isinstance(data, pa.Table):
        return table_to_arrays(data, cfg.data.input_column, cfg.data.label_column, cfg.data.input_shape, role)
    if isinstance(data, (str, Path)):
        return ParquetSource(str(data), cfg.data.input_column, cfg.data.label_column, cfg.data.input_shape)
    raise DataError(f"{role}: expected an ArrayDataset, a pyarrow Table or a Parquet path, got {type(data).__name__}")


def preflight(model: nn.Module, loss_fn, sample: ArrayDataset, cfg: Config) -> None:
    """One clean forward and one chunk of perturbed queries on a few examples, in this process."""
    import copy
    t = cfg.train
    try:
        as_loss(loss_fn).ensure_loaded(torch.device("cpu"))
    except Exception as e:
        raise TrainingError(f"model.loss: the frozen model failed to load: {type(e).__name__}: {e}") from None
    try:
        spec = ReplicaSpec(include=cfg.target.include, embedding_module=cfg.target.embedding_module,
                           sigma=t.sigma, noise=t.noise, optimizer=t.optimizer_config(),
                           threads=torch.get_num_threads(), device="cpu")
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
        rows, _ = chunk_examples(np.arange(len(sample)), t.chunk_size)
        replica.clean_forward(sample, rows)
        plan = plan_queries(np.zeros(len(sample), np.int64), np.ones(len(sample), np.int64), 1, t.unit,
                            t.pairing == "shared", t.chunk_size)
        replica.evaluate(plan.chunks.take(np.arange(1)))
    except TrainingError:
        raise
    except Exception as e:
        raise TrainingError(f"the model or loss failed on a first batch of {len(sample)} examples: "
                            f"{type(e).__name__}: {e}") from None


def start_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
    else:  # "local": always a fresh instance of our own, never a cluster left running by `ray start`
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or None, include_dashboard=False,
                 logging_level=logging.WARNING)


def _progress_line(rec: dict, total: int, began: float, first: int) -> str:
    done = rec["step"] + 1
    rate = (done - first) / max(time.perf_counter() - began, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("nan")
    lam = "" if np.isnan(rec["lambda_beta0"]) else (
        f"  λ=(β0 {rec['lambda_beta0']:.2f}, β1 {rec['lambda_beta1']:.2f}, s {rec['lambda_s']:.2f}, "
        f"γ {rec['lambda_gamma']:.2f})")
    return (f"step {done:>5}/{total}  loss {rec['loss']:.4f}  A {rec['allocation_min']}-{rec['allocation_max']}"
            f"  {rate:.1f} steps/s  eta {eta:4.0f}s  workers {rec['workers_alive']}{lam}")


def train(model: nn.Module, loss_fn, train_data, config: Config, test_data=None,
          progress=print, resume: bool = False) -> TrainResult:
    """Train `model`'s target parameters forward-only; returns the trained model and the run log.
    With resume=True, continue the run in config.output.run_dir from its last snapshot plus its
    update log; the result is bit-identical to an uninterrupted run."""
    cfg = config.validate()
    train_set = as_dataset(train_data, cfg, "train data")
    test_set = as_dataset(test_data, cfg, "test data") if test_data is not None else None
    if cfg.train.batch_size > len(train_set):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} exceeds the {len(train_set)} training examples")
    sample = train_set.rows(np.arange(min(cfg.train.chunk_size, len(train_set))))
    preflight(model, loss_fn, sample, cfg)
    try:
        check_run_dir(cfg.output.run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    start_ray(cfg)
    ship_by_value(model, loss_fn)
    refs = {"model": ray.put(model), "loss_fn": ray.put(loss_fn), "sample": ray.put(sample),
            "train": ray.put(train_set), "test": ray.put(test_set) if test_set is not None else None}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = RemoteCoordinator.options(num_cpus=0, scheduling_strategy=here).remote(
        cfg, refs, resume)
    try:
        info = ray.get(coordinator.info.remote())
        devices = sorted({w["device"] for w in info["workers"]})
        progress(f"flops_dist: {len(info['workers'])} workers on {', '.join(devices)}; "
                 f"d = {info['d']} target parameters; run dir {info['run_dir']}"
                 + (f"; resumed at step {info['step']}" if resume else ""))
        for note in info["notes"]:
            progress(f"flops_dist: {note}")
        if info["metrics_url"]:
            progress(f"metrics at {info['metrics_url']}")
        before = ray.get(coordinator.score.remote())
        if before is not None:
            progress(f"test {cfg.data.metric} before: {before:.4f}")
        began, first = time.perf_counter(), info["step"]
        while True:
            records = ray.get(coordinator.run.remote(cfg.output.log_every))
            if not records:
                break
            progress(_progress_line(records[-1], cfg.train.steps, began, first))
            if records[-1]["step"] + 1 >= cfg.train.steps:
                break
        after = ray.get(coordinator.score.remote())
        if after is not None:
            progress(f"test {cfg.data.metric} after:  {after:.4f}")
        memory = ray.get(coordinator.peak_memory.remote())
        state = ray.get(coordinator.finish.remote())
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise TrainingError(f"{type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayActorError as e:
        if getattr(e, "_actor_init_failed", False):
            # Ray keeps only the text of an error raised while an actor started; its last line is
            # the original "Type: message"
            lines = [line for line in str(getattr(e, "error_msg", e)).splitlines() if line.strip()]
            raise TrainingError(lines[-1].strip() if lines else str(e)) from None
        raise TrainingError(f"the coordinator died: {e}") from None
    finally:
        ray.kill(coordinator)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    run_dir = Path(cfg.output.run_dir)
    run_log = read_log(run_dir, "run_log")
    try:
        from .plots import plot_run
        plot_run(run_dir)
    except ImportError:
        progress("matplotlib is not installed: no plots")
    return TrainResult(model, run_log, run_dir, before, after, memory)
