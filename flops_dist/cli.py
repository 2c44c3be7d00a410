"""`flops-dist train CONFIG`: forward-only training from a TOML config; `flops-dist plot RUN_DIR`;
`flops-dist verify RUN_DIR`: check a run directory's integrity."""
from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from .config import Config, ConfigError
from .data import DataError


def _with_overrides(path: str, overrides: list[str], json_file: bool = False) -> Config:
    """`--set train.steps=50` edits the file's values before validation."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        raw = json.loads(p.read_text()) if json_file else tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if json_file else 'TOML'}: {e}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        section, name = key.strip().split(".", 1)
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word is a string
        raw.setdefault(section, {})[name] = parsed
    return Config.from_dict(raw, p.resolve().parent)


def _train(args) -> int:
    from .api import build_model, load_callable, train
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.json)")
        cfg = _with_overrides(str(saved), args.set, json_file=True)
    elif args.config:
        cfg = _with_overrides(args.config, args.set)
    else:
        raise ConfigError("give a CONFIG file, or --resume RUN_DIR")
    if not cfg.data.train:
        raise ConfigError("data.train: required, the Parquet file of training examples")
    if not cfg.model.loss:
        raise ConfigError("model.loss: required, e.g. 'model.py:per_example_loss'")
    model = build_model(cfg)
    loss_fn = load_callable(cfg.model.loss, "model.loss")
    result = train(model, loss_fn, cfg.data.train, cfg, test_data=cfg.data.test or None,
                   resume=bool(args.resume))
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


def _plot(args) -> int:
    from .plots import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flops-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a TOML config")
    p_train.add_argument("config", nargs="?", help="the job's TOML file")
    p_train.add_argument("--resume", metavar="RUN_DIR",
                         help="continue a run from its last snapshot plus its update log")
    p_train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override a config value, e.g. --set train.steps=50")
    p_train.set_defaults(func=_train)
    p_plot = sub.add_parser("plot", help="plot a run's loss curve and allocation histograms")
    p_plot.add_argument("run_dir")
    p_plot.set_defaults(func=_plot)
    p_verify = sub.add_parser("verify", help="check a run directory's snapshots, logs and model, and replay its log")
    p_verify.add_argument("run_dir")
    p_verify.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"flops-dist: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"flops-dist: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
