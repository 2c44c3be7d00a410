"""Loading what a config names: the user's callables, the model, the datasets, and the sha256 of
every file of code or weights a run starts from. No Ray here.

A run directory names code (`model.factory`, `model.loss`), and resuming it runs that code. So a
run records the sha256 of those files (and of `model.weights`) in sources.json at its start, and
`check_sources` refuses a resume whose files differ or are not the ones recorded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
from torch import nn

from .config import RESUMABLE, Config, ConfigError, read_raw
from .data import ArrayDataset, DataError, ParquetSource, table_to_arrays

SOURCE_FIELDS = ("model.factory", "model.loss", "model.weights")


def load_callable(spec: str, field: str):
    """`path/to/file.py:name` or `package.module:name`. The user's code failing on import is one
    ConfigError naming the field and the file (its traceback stays attached as the cause)."""
    path_part, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ConfigError(f"{field}: expected 'file.py:function' or 'package.module:function', got {spec!r}")
    try:
        module = _import(path_part, field)
    except ConfigError:
        raise
    except Exception as e:  # the user's module raised while it was imported
        raise ConfigError(f"{field}: {path_part} failed on import: {type(e).__name__}: {e}{_where(e, path_part)}") from e
    if not hasattr(module, attr):
        raise ConfigError(f"{field}: {path_part!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _import(path_part: str, field: str):
    if not path_part.endswith(".py"):
        try:
            return importlib.import_module(path_part)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{field}: cannot import {path_part!r} ({e})") from None
    if not Path(path_part).is_file():
        raise ConfigError(f"{field}: file {path_part!r} does not exist")
    name = "flops_dist_user_" + Path(path_part).stem  # not __main__: Ray ships it to workers by value
    module_spec = importlib.util.spec_from_file_location(name, path_part)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _where(error: BaseException, path: str) -> str:
    """' (at file.py:LINE)', the last line of the user's file that the error passed through."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
    return f" (at {Path(path).name}:{lines[-1]})" if lines else ""


def build_model(cfg: Config) -> nn.Module:
    """The model from `model.factory`, with `model.weights` loaded into it."""
    if not cfg.model.factory:
        raise ConfigError("model.factory: required, e.g. 'model.py:build_model'")
    factory = load_callable(cfg.model.factory, "model.factory")
    try:
        model = factory()
    except Exception as e:
        where = _where(e, cfg.model.factory.partition(":")[0])
        raise ConfigError(f"model.factory: {cfg.model.factory} raised {type(e).__name__}: {e}{where}") from e
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


def sample_rows(data, count: int) -> ArrayDataset:
    """The first `count` examples: what a worker needs before its first batch arrives."""
    return data.rows(np.arange(min(count, len(data))))


def source_files(cfg: Config) -> dict[str, str]:
    """field -> the file of code or weights it names (package modules are installed code: none)."""
    files = {}
    for field in SOURCE_FIELDS:
        section, name = field.split(".")
        value = getattr(getattr(cfg, section), name)
        path = value.partition(":")[0] if name != "weights" else value
        if path and (name == "weights" or path.endswith(".py")):
            files[field] = path
    return files


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_hashes(cfg: Config) -> dict[str, dict[str, str]]:
    """What sources.json records: {field: {"path": ..., "sha256": ...}}."""
    return {field: {"path": path, "sha256": sha256_file(path)} for field, path in source_files(cfg).items()}


def check_resume(cfg: Config, run_dir: Path) -> None:
    """A resumed run must compute what its logged steps computed: every setting outside RESUMABLE
    must equal the one recorded at its start."""
    recorded = read_raw(run_dir / "config.json")
    for section, values in dataclasses.asdict(cfg).items():
        for name, value in values.items():
            key = f"{section}.{name}"
            resumable = any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUMABLE)
            if not resumable and key != "output.run_dir" and recorded.get(section, {}).get(name) != value:
                raise ConfigError(f"{key}: cannot change when a run resumes (recorded "
                                  f"{recorded.get(section, {}).get(name)!r}, given {value!r}): it would change the "
                                  "steps already logged")


def check_sources(cfg: Config, recorded_file: Path) -> None:
    """Refuse to run code or weights that are not byte for byte what the run started with."""
    if not recorded_file.is_file():
        raise ConfigError(f"{recorded_file}: missing, so the code this run started with is unknown; refusing "
                          "to run model.factory or model.loss from a run directory without it")
    recorded = json.loads(recorded_file.read_text())
    for field, path in source_files(cfg).items():
        entry = recorded.get(field)
        if entry is None or entry["path"] != path:
            raise ConfigError(f"{field}: {path} is not the file this run started with "
                              f"({entry['path'] if entry else 'none recorded'}); refusing to run it")
        if not Path(path).is_file() or sha256_file(path) != entry["sha256"]:
            raise ConfigError(f"{field}: {path} has changed since this run started (its sha256 differs from the "
                              "one recorded in sources.json); refusing to run it")
