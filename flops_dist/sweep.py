"""`flops-dist sweep SWEEP.toml`: ablations of one job as Ray Tune trials, a Parquet table and a PNG each.

A sweep file names a base job and ablations; each ablation is a grid of config overrides, run for
every seed. Relative paths are relative to the sweep file.

    base = "../examples/digits/digits.toml"   # the job every trial starts from (required)
    steps = 200                               # train.steps of every trial (default: the job's)
    seeds = [0, 1]                            # train.seed values; every grid point runs each
    set = ["train.queries_per_example=16"]    # overrides for every trial, as `--set` takes them

    [report]
    eval_every = 50      # held-out data.metric every this many steps, before step 1 and at the end
    loss_window = 20     # final train loss: mean clean batch loss of the last this many steps
    loss_target = 0.5    # optional: queries until that running mean first reaches this loss

    [cluster]
    address = ""         # "" starts a local Ray; "auto" or "ray://host:port" joins a cluster
    num_cpus = 0         # CPUs of a local Ray (0: all)
    cpus_per_trial = 1

    [output]
    dir = "runs/sweeps/NAME"   # the default; NAME is the sweep file's stem

    [[ablation]]
    name = "pairing"           # the table and plot are NAME.parquet and NAME.png
    grid = {"train.estimator" = ["lr", "antithetic"], "train.pairing" = ["independent", "shared"]}
    # grid may also be a list of such tables: the union of their products. A value written as
    # {name = value} is labelled `name`. Optional: steps, seeds.

A trial runs the engine in its Tune worker with the local reference executor (one replica, no
actors of its own, the same bits as `flops-dist train`). The driver loads the model, loss and data
once and ships them to the trials, so grids may not change `model.*` or `data.*`. Every trial's
config is validated, and each distinct one preflighted, before Ray starts, so bad input is one
ConfigError naming the field. Trials with the same config (ablations that share a point, such as
the job as it is) run once and give their rows to each. The parsing and the summaries here import
no Ray.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config, ConfigError, apply_overrides, read_raw

TOP_FIELDS = ("base", "steps", "seeds", "set", "report", "cluster", "output", "ablation")
SECTION_FIELDS = {"report": ("eval_every", "loss_window", "loss_target"),
                  "cluster": ("address", "num_cpus", "cpus_per_trial"), "output": ("dir",)}
ABLATION_FIELDS = ("name", "grid", "steps", "seeds")
FIXED_SECTIONS = ("model.", "data.")  # loaded once by the driver and shipped to every trial


@dataclass
class Trial:
    ablation: str
    label: str            # the grid point, e.g. "estimator=lr, pairing=shared"
    seed: int
    config: Config


@dataclass
class Sweep:
    path: Path
    base: Path
    trials: list[Trial]
    ablations: list[str]
    eval_every: int = 50
    loss_window: int = 20
    loss_target: float | None = None
    address: str = ""
    num_cpus: int = 0
    cpus_per_trial: float = 1
    out_dir: Path = field(default_factory=Path)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every trial's Config is built and validated here."""
    path = Path(path)
    raw = read_raw(path)
    _known(raw, TOP_FIELDS, "")
    for section, names in SECTION_FIELDS.items():
        _known(_table(raw.get(section, {}), section), names, section)
    base = _base_job(raw, path)
    sweep = Sweep(path, base, [], [], out_dir=(path.resolve().parent / f"runs/sweeps/{path.stem}").resolve())
    _read_settings(sweep, raw)
    ablations = raw.get("ablation")
    if not isinstance(ablations, list) or not ablations:
        raise ConfigError("ablation: required, a non-empty list of [[ablation]] tables with name and grid")
    base_raw, common = read_raw(base), _string_list(raw.get("set", []), "set")
    for i, ablation in enumerate(ablations):
        name = _ablation_name(ablation, i, sweep.ablations)
        sweep.ablations.append(name)
        steps = ablation.get("steps", raw.get("steps"))
        seeds = _seeds(ablation.get("seeds", raw.get("seeds", [0])), f"ablation {name!r}: seeds")
        for label, overrides in expand_grid(ablation.get("grid"), f"ablation {name!r}: grid"):
            for seed in seeds:
                cfg = trial_config(base_raw, base, common, overrides, steps, seed, f"ablation {name!r} ({label})")
                sweep.trials.append(Trial(name, label, seed, cfg))
    return sweep


def _read_settings(sweep: Sweep, raw: dict) -> None:
    report, cluster = raw.get("report", {}), raw.get("cluster", {})
    sweep.eval_every = _integer(report.get("eval_every", 50), "report.eval_every", 1)
    sweep.loss_window = _integer(report.get("loss_window", 20), "report.loss_window", 1)
    target = report.get("loss_target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise ConfigError(f"report.loss_target: expected a number, got {target!r}")
    sweep.loss_target = None if target is None else float(target)
    sweep.address = _string(cluster.get("address", ""), "cluster.address")
    sweep.num_cpus = _integer(cluster.get("num_cpus", 0), "cluster.num_cpus", 0)
    cpus = cluster.get("cpus_per_trial", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
        raise ConfigError(f"cluster.cpus_per_trial: expected a positive number, got {cpus!r}")
    sweep.cpus_per_trial = cpus
    out = raw.get("output", {}).get("dir")
    if out is not None:
        sweep.out_dir = (sweep.path.resolve().parent / _string(out, "output.dir")).resolve()


def _base_job(raw: dict, path: Path) -> Path:
    if "base" not in raw:
        raise ConfigError("base: required, the job file every trial starts from (relative to the sweep file)")
    base = path.resolve().parent / _string(raw["base"], "base")
    if not base.is_file():
        raise ConfigError(f"base: job file {str(base)!r} does not exist")
    return base


def _ablation_name(ablation, index: int, taken: list[str]) -> str:
    where = f"ablation[{index}]"
    _known(_table(ablation, where), ABLATION_FIELDS, where)
    name = ablation.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{where}.name: required, letters, digits, '_', '.' or '-' (it names the output "
                          f"files), got {name!r}")
    if name in taken:
        raise ConfigError(f"{where}.name: {name!r} is used twice")
    return name


def expand_grid(grid, where: str) -> list[tuple[str, dict]]:
    """(label, {dotted key: value}) for every point of a grid: a table of key -> non-empty list of
    values (their product), or a list of such tables (the union of their products, in order). A
    value may be named for the labels (named_value)."""
    tables = grid if isinstance(grid, list) else [grid]
    if grid is None or not tables:
        raise ConfigError(f"{where}: required, a table of config keys to lists of values")
    points = []
    for table in tables:
        flat = flatten(_table(table, where))
        if not flat:
            raise ConfigError(f"{where}: empty; give at least one config key and its values")
        for key, values in flat.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
            if key.startswith(FIXED_SECTIONS):
                raise ConfigError(f"{where}.{key}: a sweep cannot vary model.* or data.*: the driver loads "
                                  "them once for every trial")
        for combo in itertools.product(*flat.values()):
            named = [named_value(v) for v in combo]
            label = ", ".join(f"{k.split('.', 1)[-1]}={shown}" for k, (shown, _) in zip(flat, named))
            points.append((label, {k: value for k, (_, value) in zip(flat, named)}))
    return points


def named_value(value) -> tuple[str, object]:
    """(label, value): a one-key table {name = value} names its value in labels, e.g.
    {last_block = ['blocks\\.1\\..*', "head"]}; any other value is shown as itself."""
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value.items()))
    return show(value), value


def flatten(table: dict, prefix: str = "") -> dict:
    """{"train": {"seed": [1]}} and {"train.seed": [1]} both become {"train.seed": [1]}."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def show(value) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value)) if value else "none"
    return str(value)


def trial_config(base_raw: dict, base: Path, common: list[str], overrides: dict, steps, seed: int,
                 where: str) -> Config:
    """The base job with the sweep's `set`, the grid point, steps and seed; errors say which trial."""
    try:
        raw = apply_overrides(copy.deepcopy(base_raw), common)
    except ConfigError as e:
        raise ConfigError(f"set: {e}") from None
    for key, value in overrides.items():
        section, sep, name = key.partition(".")
        if not sep or not name:
            raise ConfigError(f"{where}: grid key {key!r}: expected section.field")
        raw.setdefault(section, {})[name] = value
    if steps is not None:
        raw.setdefault("train", {})["steps"] = steps
    raw.setdefault("train", {})["seed"] = seed
    try:
        return Config.from_dict(raw, base.parent)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _known(table: dict, names, where: str) -> None:
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field; "
                          f"{where or 'a sweep file'} has {', '.join(names)}")


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
    return value


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _string_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of 'section.field=value' strings, got {value!r}")
    return value


def _integer(value, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{where}: expected an integer of at least {least}, got {value!r}")
    return value


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of seeds (integers ≥ 0), got {value!r}")
    return value


# ---- results: rows of (trial, step) -> a Parquet table, a summary and a plot per ablation ----

ROW_SCHEMA = pa.schema([("ablation", pa.string()), ("label", pa.string()), ("seed", pa.int64()),
                        ("step", pa.int64()), ("queries", pa.int64()), ("train_loss", pa.float64()),
                        ("test_metric", pa.float64()), ("lambda_beta1", pa.float64()), ("lambda_s", pa.float64()),
                        ("lambda_gamma", pa.float64()), ("seconds", pa.float64())])


def ablation_table(rows: list[dict], ablation: str, labels: list[str]) -> pa.Table:
    """One row per trial and step (step 0: before training, its held-out metric only), in grid
    order, then seed, then step."""
    mine = sorted((r for r in rows if r["ablation"] == ablation),
                  key=lambda r: (labels.index(r["label"]), r["seed"], r["step"]))
    return pa.Table.from_pylist(mine, schema=ROW_SCHEMA)


def running_mean(x: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    t = np.arange(1, len(x) + 1)
    return (c[t] - c[np.maximum(t - window, 0)]) / np.minimum(t, window)


def trial_finals(steps: dict, window: int, target: float | None) -> tuple[float, float, float]:
    """(held-out metric at the last step, mean train loss of the last `window` steps, queries until
    the `window`-step running mean of the train loss first reaches `target`: NaN if never or none)."""
    trained = steps["step"] > 0
    loss, queries = steps["train_loss"][trained], steps["queries"][trained]
    hit = np.nonzero(running_mean(loss, window) <= target)[0] if target is not None else []
    return (float(steps["test_metric"][-1]), float(loss[-window:].mean()),
            float(queries[hit[0]]) if len(hit) else math.nan)


def summarize(table: pa.Table, window: int, target: float | None) -> list[dict]:
    """Per grid point, over its seeds: final held-out metric and train loss (mean, std), and the
    mean queries to the loss target (NaN unless every seed reached it)."""
    columns = {k: np.asarray(v) for k, v in table.to_pydict().items()}
    summary = []
    for label in dict.fromkeys(columns["label"]):
        finals = []
        for seed in dict.fromkeys(columns["seed"][columns["label"] == label]):
            keep = (columns["label"] == label) & (columns["seed"] == seed)
            finals.append(trial_finals({k: v[keep] for k, v in columns.items()}, window, target))
        metric, loss, queries = np.array(finals).T
        summary.append(dict(label=label, seeds=len(finals), metric=metric.mean(), metric_std=metric.std(),
                            loss=loss.mean(), loss_std=loss.std(), queries_to_target=queries.mean()))
    return summary


def format_summary(ablation: str, summary: list[dict], metric: str, window: int, target: float | None) -> str:
    width = max(len(s["label"]) for s in summary) + 2
    head = (f"{'':{width}}{'held-out ' + metric:>22}{'train loss (last ' + str(window) + ')':>26}"
            + (f"{'queries to ' + format(target, 'g'):>20}" if target is not None else ""))
    lines = [f"{ablation} (mean ± std over seeds)", head]
    for s in summary:
        line = f"{s['label']:{width}}{s['metric']:>14.4f} ± {s['metric_std']:.4f}{s['loss']:>17.4f} ± {s['loss_std']:.4f}"
        if target is not None:
            q = s["queries_to_target"]
            line += f"{'never' if math.isnan(q) else format(int(q), ','):>20}"
        lines.append(line + f"   (n = {s['seeds']})")
    return "\n".join(lines)


def plot_ablation(table: pa.Table, path: Path, window: int, metric: str) -> None:
    """Train loss (running mean over `window` steps) and held-out metric against queries, each the
    mean over seeds, one line per grid point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = {k: np.asarray(v) for k, v in table.to_pydict().items()}
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(dict.fromkeys(columns["label"])):
        mine = columns["label"] == label
        steps = np.unique(columns["step"][mine])
        with warnings.catch_warnings():  # a step without a held-out score is NaN in every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = {k: np.array([np.nanmean(columns[k][mine & (columns["step"] == t)]) for t in steps])
                    for k in ("queries", "train_loss", "test_metric")}
        trained, scored = steps > 0, ~np.isnan(mean["test_metric"])
        ax_loss.plot(mean["queries"][trained], running_mean(mean["train_loss"][trained], window), color=f"C{i}",
                     label=label)
        ax_metric.plot(mean["queries"][scored], mean["test_metric"][scored], "o-", color=f"C{i}", label=label)
    ax_loss.set(xlabel="queries spent", ylabel=f"train loss ({window}-step running mean)", yscale="log")
    ax_metric.set(xlabel="queries spent", ylabel=f"held-out {metric}")
    ax_loss.legend(fontsize=7)
    fig.suptitle(f"{path.stem}: mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the run: Ray Tune, one function trial per (grid point, seed) ----

def run_sweep(sweep: Sweep, progress=print) -> list[Path]:
    """Preflight, run every trial on Ray Tune, and write NAME.parquet, NAME.png per ablation and
    summary.txt into sweep.out_dir; returns the files written."""
    shared = _load_shared(sweep.trials[0].config)
    _preflight_all(sweep, shared)
    began = time.perf_counter()
    runs, members = distinct_trials(sweep.trials)
    rows = share_rows(_run_tune(sweep, runs, shared, progress), members)
    progress(f"{len(runs)} trials in {time.perf_counter() - began:.0f} s")
    return write_results(sweep, rows, progress)


def distinct_trials(trials: list[Trial]) -> tuple[list[Trial], dict[tuple, list[Trial]]]:
    """The trials to run, one per distinct config (ablations often share a point, such as the job as
    it is), and for each, keyed by (ablation, label, seed), the trials whose rows it gives."""
    runs, members = {}, {}
    for trial in trials:
        run = runs.setdefault(json.dumps(asdict(trial.config), sort_keys=True), trial)
        members.setdefault((run.ablation, run.label, run.seed), []).append(trial)
    return list(runs.values()), members


def share_rows(rows: list[dict], members: dict[tuple, list[Trial]]) -> list[dict]:
    """Every row of a run once for each trial with its config, under that trial's ablation and label."""
    return [dict(row, ablation=t.ablation, label=t.label) for row in rows
            for t in members[row["ablation"], row["label"], row["seed"]]]


def write_results(sweep: Sweep, rows: list[dict], progress=print) -> list[Path]:
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    metric, written, texts = sweep.trials[0].config.data.metric, [], []
    for name in sweep.ablations:
        labels = list(dict.fromkeys(t.label for t in sweep.trials if t.ablation == name))
        table = ablation_table(rows, name, labels)
        pq.write_table(table, sweep.out_dir / f"{name}.parquet")
        plot_ablation(table, sweep.out_dir / f"{name}.png", sweep.loss_window, metric)
        texts.append(format_summary(name, summarize(table, sweep.loss_window, sweep.loss_target), metric,
                                    sweep.loss_window, sweep.loss_target))
        progress(texts[-1] + "\n")
        written += [sweep.out_dir / f"{name}.parquet", sweep.out_dir / f"{name}.png"]
    (sweep.out_dir / "summary.txt").write_text("\n\n".join(texts) + "\n")
    return written + [sweep.out_dir / "summary.txt"]


def _load_shared(cfg: Config) -> dict:
    """The model, loss and data every trial shares (grids cannot vary model.* or data.*)."""
    from .data import load_dataset
    from .loading import build_model, load_callable
    if not cfg.data.train:
        raise ConfigError("data.train: required in the base job, the Parquet data to train on")
    if not cfg.model.loss:
        raise ConfigError("model.loss: required in the base job, e.g. 'model.py:per_example_loss'")
    d = cfg.data
    return {"model": build_model(cfg), "loss_fn": load_callable(cfg.model.loss, "model.loss"),
            "train": load_dataset(d.train, d.input_column, d.label_column, d.input_shape),
            "test": load_dataset(d.test, d.input_column, d.label_column, d.input_shape) if d.test else None}


def _preflight_all(sweep: Sweep, shared: dict) -> None:
    """api.preflight for each distinct grid point, here, so a bad target or loss is one clear line."""
    from .api import TrainingError, preflight
    from .loading import sample_rows
    for trial in {(t.ablation, t.label): t for t in sweep.trials}.values():
        cfg = trial.config
        try:
            preflight(shared["model"], shared["loss_fn"], sample_rows(shared["train"], cfg.train.chunk_size), cfg)
        except ConfigError as e:
            raise ConfigError(f"ablation {trial.ablation!r} ({trial.label}): {e}") from None
        except TrainingError as e:
            raise TrainingError(f"ablation {trial.ablation!r} ({trial.label}): {e}", e.details) from None


def _run_tune(sweep: Sweep, runs: list[Trial], shared: dict, progress) -> list[dict]:
    import logging
    import os
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # rows reach us through a callback
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune prints nothing; our lines say enough
    # without the file loggers, the result grid warns that it found no per-trial files
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    from ray import tune
    from .api import TrainingError, ship_by_value, start_ray
    from .config import ClusterConfig
    start_ray(Config(cluster=ClusterConfig(address=sweep.address, num_cpus=sweep.num_cpus)))
    ship_by_value(shared["model"], shared["loss_fn"])
    collector = _collector(tune.Callback, len(runs), progress)
    trainable = tune.with_resources(tune.with_parameters(run_trial, trials=runs, eval_every=sweep.eval_every,
                                                         **shared), {"cpu": sweep.cpus_per_trial})
    tuner = tune.Tuner(trainable, param_space={"index": tune.grid_search(list(range(len(runs))))},
                       tune_config=tune.TuneConfig(trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                                   reuse_actors=True),  # no actor start and stop per trial
                       run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", verbose=0,
                                                 storage_path=str((sweep.out_dir / "tune").resolve()),
                                                 callbacks=[collector]))
    for result in tuner.fit():
        if result.error is not None:
            trial = runs[result.config["index"]]
            cause = getattr(result.error, "cause", None) or result.error
            raise TrainingError(f"ablation {trial.ablation!r} ({trial.label}) seed {trial.seed} failed: "
                                f"{type(cause).__name__}: {cause}", str(result.error))
    return collector.rows


def _trial_name(trial) -> str:
    return f"trial-{trial.config['index']}"


def _collector(base, total: int, progress):
    """A Tune callback (on `base`, tune.Callback, so this module imports no Ray) that keeps the
    per-step rows of every report and prints a line as each trial ends."""
    class Collector(base):
        def __init__(self):
            self.rows, self.done = [], 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows += result["rows"]

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result
            self.done += 1
            progress(f"[{self.done}/{total}] {last['ablation']}: {last['label']}, seed {last['seed']}: "
                     f"held-out {last['test_metric']:.4f}, batch loss {last['train_loss']:.4f}")
    return Collector()


def run_trial(config: dict, trials, eval_every: int, model, loss_fn, train, test) -> None:
    """One Tune trial: the engine in this process with the local reference executor. A row per step;
    at step 0 (before training), every `eval_every` steps and at the end the held-out metric, and one
    tune.report of the latest row's metrics with the rows since the last report under "rows". (A
    report waits for the Tune controller; one per step cost more than the steps on 2 loaded cores.)"""
    from ray import tune
    from .engine import Engine, LocalExecutor
    from .loading import sample_rows
    from .replica import Replica, ReplicaSpec
    trial = trials[config["index"]]
    cfg, steps = trial.config, trial.config.train.steps
    replica = Replica(copy.deepcopy(model), loss_fn, sample_rows(train, cfg.train.chunk_size),
                      ReplicaSpec.from_config(cfg, device="cpu"))
    engine = Engine(cfg.train, LocalExecutor([replica]), train, replica.d)
    score = (lambda: replica.score(test, cfg.data.metric)) if test is not None else (lambda: math.nan)
    row = dict(ablation=trial.ablation, label=trial.label, seed=trial.seed, step=0, queries=0,
               train_loss=math.nan, test_metric=score(), lambda_beta1=math.nan, lambda_s=math.nan,
               lambda_gamma=math.nan, seconds=0.0)
    pending = [dict(row)]
    for t in range(steps):
        rec = engine.step(t).record
        done = t + 1
        scored = done % eval_every == 0 or done == steps
        row.update(step=done, queries=row["queries"] + rec.queries, train_loss=rec.loss,
                   test_metric=score() if scored else math.nan, lambda_beta1=rec.lambda_beta1,
                   lambda_s=rec.lambda_s, lambda_gamma=rec.lambda_gamma, seconds=row["seconds"] + rec.seconds)
        pending.append(dict(row))
        if scored:
            tune.report(dict(row, rows=pending))
            pending = []
