"""`flops-dist train CONFIG`: forward-only training from a TOML config; `flops-dist plot RUN_DIR`;
`flops-dist verify RUN_DIR`: check a run directory's integrity; `flops-dist sweep SWEEP.toml`: ablations
as Ray Tune trials (flops_dist/sweep.py).

Every failure is one line, `flops-dist: error: …`, naming the field, file or step. Where there is
a traceback worth keeping (the user's own code raised, or a remote error), it goes to the run
directory's flops-dist.log, or to a temporary file when no run directory exists yet, and the line
says where.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
from pathlib import Path

from .config import RESUMABLE, Config, ConfigError, apply_overrides, read_raw
from .data import DataError


def job_config(args) -> Config:
    """The job file with its overrides, or, with --resume DIR, DIR's own config: it writes only into
    DIR wherever DIR now is, and only settings that cannot change the logged steps may be --set."""
    if not args.resume:
        if not args.config:
            raise ConfigError("give a CONFIG file, or --resume RUN_DIR")
        return Config.load(args.config, args.set)
    from .loading import check_sources
    run_dir = Path(args.resume).absolute()
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {args.resume}: not a run directory (no config.json)")
    raw = apply_overrides(read_raw(run_dir / "config.json"), args.set, allowed=RESUMABLE)
    raw["output"]["run_dir"] = str(run_dir)
    cfg = Config.from_dict(raw)
    check_sources(cfg, run_dir / "sources.json")
    return cfg


def _train(args) -> int:
    from .api import train
    from .loading import build_model, load_callable
    cfg = job_config(args)
    args.run_dir = cfg.output.run_dir
    if not cfg.data.train:
        raise ConfigError("data.train: required, the Parquet data to train on")
    if not cfg.model.loss:
        raise ConfigError("model.loss: required, e.g. 'model.py:per_example_loss'")
    result = train(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), cfg.data.train, cfg,
                   test_data=cfg.data.test or None, resume=bool(args.resume))
    log = result.run_log.to_pydict()
    print(f"done: {len(log['step'])} steps, {sum(log['queries'])} queries, "
          f"{sum(log['dropped_queries'])} dropped; final batch loss {log['loss'][-1]:.4f}")
    if result.metric_before is not None:
        print(f"test {cfg.data.metric}: {result.metric_before:.4f} -> {result.metric_after:.4f}")
    print(f"run log {result.run_dir / 'run_log'}, model {result.run_dir / 'model.safetensors'}, "
          f"plot {result.run_dir / 'run.png'}")
    return 0


def _verify(args) -> int:
    from .verify import verify_run
    problems, summary = verify_run(args.run_dir)
    for problem in problems:
        print(f"flops-dist: verify: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"verified {args.run_dir}: {summary}")
    return 0


def _sweep(args) -> int:
    from .sweep import load_sweep, run_sweep
    sweep = load_sweep(args.sweep_file)
    print(f"sweep {args.sweep_file}: {len(sweep.trials)} trials in {len(sweep.ablations)} ablations "
          f"({', '.join(sweep.ablations)}); results in {sweep.out_dir}", flush=True)
    for path in run_sweep(sweep, progress=lambda line: print(line, flush=True)):
        print(path)
    return 0


def _plot(args) -> int:
    from .plots import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def keep_traceback(error: BaseException, run_dir: str | None) -> str:
    """Where the traceback of `error` was written: the run dir's log if it holds a run, else a
    temporary file (a start that fails leaves the run dir as it was)."""
    from .runlog import append_text, holds_run
    text = getattr(error, "details", "") or "".join(traceback.format_exception(error))
    if run_dir and holds_run(Path(run_dir)):
        with contextlib.suppress(OSError, ValueError):  # an unwritable run dir: the temporary file below
            return str(append_text(run_dir, "flops-dist.log", text + "\n"))
    with tempfile.NamedTemporaryFile("w", prefix="flops-dist-", suffix=".log", delete=False) as f:
        f.write(text)
    return f.name


def fail(error: BaseException, run_dir: str | None) -> str:
    """The one line a failure prints. A ConfigError or DataError is its message; anything else
    also keeps its traceback and says where."""
    message = " ".join(str(error).split())
    if isinstance(error, (ConfigError, DataError)) and error.__cause__ is None:
        return f"flops-dist: error: {message}"
    from .api import TrainingError
    if not isinstance(error, (ConfigError, DataError, TrainingError)):  # those messages are the user's already
        message = f"{type(error).__name__}: {message}"
    return f"flops-dist: error: {message} (traceback in {keep_traceback(error, run_dir)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flops-dist", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a TOML config")
    p_train.add_argument("config", nargs="?", help="the job's TOML file")
    p_train.add_argument("--resume", metavar="RUN_DIR",
                         help="continue a run from its last snapshot plus its update log (runs the code it names)")
    p_train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override a config value, e.g. --set train.steps=50")
    p_train.set_defaults(func=_train)
    p_sweep = sub.add_parser("sweep", help="run a sweep file's ablations as Ray Tune trials; a Parquet table "
                                           "and a PNG per ablation")
    p_sweep.add_argument("sweep_file")
    p_sweep.set_defaults(func=_sweep)
    for name, func, text in (("plot", _plot, "plot a run's loss curve and allocation histograms"),
                             ("verify", _verify, "check a run directory's snapshots, logs and model, and "
                                                 "replay its update log")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    args.run_dir = getattr(args, "run_dir", None)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # every failure is one line; the traceback is kept, not shown
        print(fail(e, args.run_dir), file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, DataError)) else 1


if __name__ == "__main__":
    sys.exit(main())
