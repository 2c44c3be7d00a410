"""One typed config for the Python API, the CLI and `ray job submit`, validated at the edge.

Every error names the field: `train.allocator: unknown value 'foo'; choose one of ...`. A TOML file
has the sections below; relative paths in it are relative to the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .allocators import ALLOCATORS, LEARNABLE
from .estimators import ESTIMATORS
from .noise import KINDS as NOISE_KINDS
from .update import OPTIMIZERS, OptimizerConfig

PAIRINGS = ("independent", "shared")
NEYMAN_PILOTS = ("reuse", "discard")
NOISE_SPACES = ("weights", "outputs")
LAYER_SIGMAS = ("rms", "one")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field."""


@dataclass
class TrainConfig:
    steps: int = 300                 # optimizer steps T
    batch_size: int = 32             # examples per step B
    queries_per_example: int = 8     # A₀: the budget is N = B·A₀ forward queries per step
    min_queries: int = 2             # A_min: the least queries any example gets
    estimator: str = "lr"            # lr (clean-loss baseline) or antithetic (±σu pairs)
    noise: str = "rademacher"        # rademacher (bit-exact on any device) or gaussian
    pairing: str = "independent"     # independent: a seed per query; shared: query k of all examples shares seed k
    sigma: float = 1e-2              # perturbation scale σ
    noise_space: str = "weights"     # weights: θ + σu; outputs: noise on the outputs of the target's nn.Linear
                                     # layers (the FLOPS paper's estimator; flops_dist/outputs.py)
    layer_sigma: str = "rms"         # outputs only: layer l's noise is σ·RMS of its clean output ("rms") or σ ("one")
    learning_rate: float = 1e-2
    optimizer: str = "sgd"           # sgd, momentum or adam; applied identically on every replica
    momentum: float = 0.9
    weight_decay: float = 0.0
    allocator: str = "flops"         # uniform, neyman, bernoulli or flops
    allocator_learning_rate: float = 0.05  # step size for λ; 0 freezes λ at its initial value
    allocator_frozen: list[str] = field(default_factory=list)  # flops: λ components held at their start, of
                                     # beta1, s, gamma (β0 is always fixed); for ablations
    neyman_pilot: str = "reuse"      # reuse: the pilot's queries count in the estimate (biased); discard: they only allocate
    seed: int = 0                    # run seed: data order, query seeds, allocator samples
    chunk_size: int = 16             # queries per evaluation chunk; fixed boundaries keep losses batch-invariant
    clean_chunk_size: int = 0        # examples per clean-forward chunk (0: chunk_size); with a frozen prefix,
                                     # how finely the batch's prefix outputs split over workers
    hash_every: int = 50             # compare replica hashes every this many steps (0: only at the end)
    stop_dropped_fraction: float = 1.0  # stop when at least this fraction of a step's queries give NaN/inf (1: all)

    @property
    def unit(self) -> int:
        """Queries per allocation unit: a pair for the antithetic estimator."""
        return 2 if self.estimator == "antithetic" else 1

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(kind=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay)


@dataclass
class TargetConfig:
    include: list[str] = field(default_factory=lambda: ["all"])  # "all", regexes on parameter names, or module names
    embedding_module: str = ""       # module whose output is the allocator's embedding e_j; "" = the model's output
    frozen_prefix: str = "auto"      # "auto": the frozen modules before the target run once per example per step;
                                     # or the name of the first module of the tail; "off": every query runs it all


@dataclass
class ModelConfig:
    factory: str = ""                # "file.py:function" or "package.module:function", returning an nn.Module
    weights: str = ""                # optional safetensors file loaded into the model
    loss: str = ""                   # "file.py:function"; (outputs, labels) -> per-example losses [B]


@dataclass
class DataConfig:
    train: str = ""                  # Parquet file of training examples
    test: str = ""                   # optional Parquet file scored before and after training
    input_column: str = "input"      # list<float> per example (or fixed_size_list)
    label_column: str = "label"      # integer class or float target
    input_shape: list[int] = field(default_factory=list)  # shape of one input; [] = as stored
    metric: str = "accuracy"         # accuracy (argmax of outputs) or loss


@dataclass
class ClusterConfig:
    workers: int = 2                 # worker actors, one replica each
    min_workers: int = 1             # start when at least this many can be placed
    address: str = ""                # "" starts a local Ray; "auto" or "ray://host:port" joins a cluster
    num_cpus: int = 0                # CPUs for a local Ray (0 = all)
    threads_per_worker: int = 1      # torch threads per replica; the same on every worker
    gpus_per_worker: str = "auto"    # "auto": one GPU each when the cluster has GPUs, else "0" or "1"
    rescale_every: int = 50          # with fewer workers than asked, look for room to add one every this many steps


@dataclass
class OutputConfig:
    run_dir: str = "runs/latest"     # run log, update log and final model go here
    log_every: int = 10              # progress line and log flush every this many steps
    snapshot_every: int = 100        # θ snapshot (and log flush) every this many steps; resume replays the rest
    score_every: int = 0             # held-out data.metric every this many steps, into the run log, the progress
                                     # line, the plot and /metrics (0: only before and after the run); needs test data


@dataclass
class MetricsConfig:
    address: str = "127.0.0.1"       # where the coordinator serves /metrics; loopback unless asked otherwise
    port: int = 9500                 # 0 picks a free port (printed at start), -1 serves nothing


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> "Config":
        self._validate_choices()
        self._validate_numbers()
        self._validate_neyman()
        self._validate_frozen()
        self._validate_output_space()
        self._validate_cluster_and_output()
        return self

    def _validate_choices(self) -> None:
        t = self.train
        _choice("train.estimator", t.estimator, ESTIMATORS)
        _choice("train.noise", t.noise, NOISE_KINDS)
        _choice("train.pairing", t.pairing, PAIRINGS)
        _choice("train.optimizer", t.optimizer, OPTIMIZERS)
        _choice("train.allocator", t.allocator, ALLOCATORS)
        _choice("train.neyman_pilot", t.neyman_pilot, NEYMAN_PILOTS)
        _choice("train.noise_space", t.noise_space, NOISE_SPACES)
        _choice("train.layer_sigma", t.layer_sigma, LAYER_SIGMAS)
        _choice("data.metric", self.data.metric, ("accuracy", "loss"))

    def _validate_numbers(self) -> None:
        """Counts, rates and the query budget."""
        t = self.train
        for name in ("steps", "batch_size", "queries_per_example", "min_queries", "chunk_size"):
            _at_least(f"train.{name}", getattr(t, name), 1)
        _at_least("train.seed", t.seed, 0)
        _at_least("train.clean_chunk_size", t.clean_chunk_size, 0)
        _at_least("train.hash_every", t.hash_every, 0)
        for name in ("sigma", "learning_rate", "momentum", "weight_decay", "allocator_learning_rate",
                     "stop_dropped_fraction"):
            if not math.isfinite(getattr(t, name)):
                raise ConfigError(f"train.{name}: must be a finite number, got {getattr(t, name)}")
        for name in ("sigma", "learning_rate", "stop_dropped_fraction"):
            if not getattr(t, name) > 0:
                raise ConfigError(f"train.{name}: must be positive, got {getattr(t, name)}")
        for name in ("momentum", "weight_decay", "allocator_learning_rate"):
            _at_least(f"train.{name}", getattr(t, name), 0)
        if t.stop_dropped_fraction > 1:
            raise ConfigError(f"train.stop_dropped_fraction: a fraction of a step's queries, at most 1, "
                              f"got {t.stop_dropped_fraction}")
        if t.unit == 2 and (t.queries_per_example % 2 or t.min_queries % 2):
            raise ConfigError("train.queries_per_example and train.min_queries: the antithetic estimator "
                              f"spends queries in pairs, so both must be even (got {t.queries_per_example}, "
                              f"{t.min_queries})")
        if t.queries_per_example < t.min_queries:
            raise ConfigError(f"train.queries_per_example: the budget N = B·A₀ = {t.batch_size}×"
                              f"{t.queries_per_example} is below the minimum B·A_min = {t.batch_size}×"
                              f"{t.min_queries}; raise queries_per_example or lower min_queries")

    def _validate_neyman(self) -> None:
        t = self.train
        if t.allocator != "neyman":
            return
        if t.pairing == "shared":  # its estimates are correlated: allocators.shared_variance_objective
            raise ConfigError("train.allocator / train.pairing: neyman's A ∝ √ĉ minimises the variance of "
                              "independent noise only; with shared noise use allocator flops or uniform")
        if t.queries_per_example == t.min_queries:
            raise ConfigError("train.queries_per_example: neyman spends min_queries per example on a pilot "
                              "and needs budget left after it")

    def _validate_frozen(self) -> None:
        t = self.train
        for name in t.allocator_frozen:
            if name == "beta0":
                raise ConfigError("train.allocator_frozen: beta0 is always fixed (the projection to the budget "
                                  "makes λ's scale redundant), so freezing it changes nothing; freeze "
                                  f"{', '.join(LEARNABLE)}")
            _choice("train.allocator_frozen", name, LEARNABLE)
        if t.allocator_frozen and t.allocator != "flops":
            raise ConfigError(f"train.allocator_frozen: only the flops allocator learns λ, but train.allocator "
                              f"is {t.allocator!r}")

    def _validate_output_space(self) -> None:
        t = self.train
        if t.noise_space != "outputs":
            return
        if t.pairing == "shared":  # a shared seed's coefficient mixes examples whose inputs x differ
            raise ConfigError("train.noise_space / train.pairing: output-space noise rebuilds each seed's "
                              "gradient from its own example's layer inputs, so it needs independent pairing")
        if t.batch_size * t.queries_per_example >= 1 << 20:
            raise ConfigError("train.batch_size / train.queries_per_example: output-space seeds name their "
                              "example and unit in 20 bits each, so the budget B·A₀ must stay below 2**20")

    def _validate_cluster_and_output(self) -> None:
        c = self.cluster
        if c.workers < 1 or not 1 <= c.min_workers <= c.workers:
            raise ConfigError(f"cluster.workers / cluster.min_workers: need 1 ≤ min_workers ≤ workers, "
                              f"got {c.min_workers}, {c.workers}")
        for name in ("threads_per_worker", "rescale_every", "num_cpus"):
            _at_least(f"cluster.{name}", getattr(c, name), 0 if name == "num_cpus" else 1)
        _choice("cluster.gpus_per_worker", c.gpus_per_worker, ("auto", "0", "1"))
        if not -1 <= self.metrics.port <= 65535:
            raise ConfigError(f"metrics.port: must be -1 (off), 0 (any free port) or a port number, "
                              f"got {self.metrics.port}")
        for name in ("snapshot_every", "log_every"):
            _at_least(f"output.{name}", getattr(self.output, name), 1)
        _at_least("output.score_every", self.output.score_every, 0)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: Path | None = None) -> "Config":
        cfg = _build(cls, raw, "")
        if base_dir is not None:
            for section, name in (("model", "factory"), ("model", "weights"), ("model", "loss"),
                                  ("data", "train"), ("data", "test"), ("output", "run_dir")):
                obj = getattr(cfg, section)
                setattr(obj, name, _resolve(getattr(obj, name), base_dir))
        return cfg.validate()

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "Config":
        """A TOML job file (or a run's config.json), with `section.field=value` overrides applied
        before validation; relative paths are relative to the file."""
        path = Path(path)
        return cls.from_dict(apply_overrides(read_raw(path), overrides), path.resolve().parent)


# fields that --set may change on resume: none of them changes the bits of the steps already logged
RESUMABLE = ("train.steps", "cluster.", "metrics.", "output.log_every", "output.snapshot_every", "output.score_every")


def read_raw(path: Path) -> dict:
    """The sections of a TOML job file, or of a run directory's config.json."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str], allowed: tuple[str, ...] | None = None) -> dict:
    """`section.field=value` (a TOML value, or a bare word as a string) onto raw sections; with
    `allowed`, only keys equal to or starting with one of them."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        if allowed is not None and not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            raise ConfigError(f"--set {key}: cannot change when a run resumes: it would change the steps already logged; "
                              "only train.steps, cluster.*, metrics.*, output.log_every, output.snapshot_every and "
                              "output.score_every may")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word is a string
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = parsed
    return raw


def require_batch_fits(batch_size: int, examples: int) -> None:
    """A batch is drawn without replacement from one epoch: it cannot exceed the dataset."""
    if batch_size > examples:
        raise ConfigError(f"train.batch_size: {batch_size} exceeds the dataset's {examples} examples")


def _at_least(name: str, value, least) -> None:
    if value < least:
        raise ConfigError(f"{name}: must be at least {least}, got {value}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r}; choose one of {', '.join(choices)}")


def _resolve(value: str, base: Path) -> str:
    if not value:
        return value
    path_part, sep, attr = value.partition(":")
    if sep and not path_part.endswith(".py"):
        return value  # "package.module:function"
    p = Path(path_part)
    return str(p if p.is_absolute() else (base / p).resolve()) + (sep + attr)


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field; "
                          f"{where or 'config'} has {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _coerce(key, value, hint)
    return cls(**values)


def _coerce(key: str, value, hint):
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (float, str) and isinstance(value, hint):
        return value
    if hint == list[int] and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return value
    if hint == list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")
