"""`flops-dist sweep`: sweep files parse into validated trials, bad ones get one line naming the
field, and a tiny sweep runs on a local Ray Tune and writes its tables and plots."""
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from flops_dist.cli import main
from flops_dist.config import ConfigError
from flops_dist.sweep import ROW_SCHEMA, distinct_trials, expand_grid, load_sweep, share_rows, summarize

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

EXAMPLE = """
base = "job.toml"
steps = 7
seeds = [0, 1]

[[ablation]]
name = "pairing"
grid = {"train.estimator" = ["lr", "antithetic"], "train.pairing" = ["independent", "shared"]}

[[ablation]]
name = "lambda"
seeds = [3]
grid = [{"train.allocator_frozen" = [[], ["s"]]}, {train = {allocator = ["uniform"]}}]
"""


@pytest.fixture
def job(tmp_path):
    """A job file with the fields a trial needs to validate (paths need not exist to parse)."""
    (tmp_path / "job.toml").write_text('[model]\nloss = "m.py:f"\n[data]\ntrain = "t.parquet"\n'
                                       '[train]\nqueries_per_example = 4\n')
    return tmp_path


def write(directory, text):
    path = directory / "sweep.toml"
    path.write_text(text)
    return path


def test_a_grid_is_the_product_of_its_values_and_a_list_of_grids_their_union():
    points = expand_grid([{"train.estimator": ["lr", "antithetic"], "train": {"pairing": ["independent", "shared"]}},
                          {"train.noise_space": ["outputs"]}], "grid")
    assert [label for label, _ in points] == [
        "estimator=lr, pairing=independent", "estimator=lr, pairing=shared",
        "estimator=antithetic, pairing=independent", "estimator=antithetic, pairing=shared", "noise_space=outputs"]
    assert points[1][1] == {"train.estimator": "lr", "train.pairing": "shared"}


def test_every_grid_point_runs_every_seed_with_the_sweeps_steps(job):
    sweep = load_sweep(write(job, EXAMPLE))
    assert sweep.ablations == ["pairing", "lambda"]
    assert len(sweep.trials) == 4 * 2 + 3 * 1
    first, last = sweep.trials[0], sweep.trials[-1]
    assert (first.label, first.seed, first.config.train.steps) == ("estimator=lr, pairing=independent", 0, 7)
    assert (last.label, last.seed, last.config.train.allocator) == ("allocator=uniform", 3, "uniform")
    assert sweep.trials[9].config.train.allocator_frozen == ["s"]
    assert sweep.out_dir == (job / "runs" / "sweeps" / "sweep").resolve()


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('base = "job.toml"', 'base = "nowhere.toml"'), "base: job file '.*nowhere.toml' does not exist"),
    (lambda t: t.replace('base = "job.toml"\n', ""), "base: required"),
    (lambda t: "colour = 1\n" + t, "colour: unknown field; a sweep file has base, steps"),
    (lambda t: t.replace('seeds = [3]', 'seeds = [3]\nstpes = 2'), r"ablation\[1\].stpes: unknown field"),
    (lambda t: t.replace('name = "lambda"', 'name = "pairing"'), r"ablation\[1\].name: 'pairing' is used twice"),
    (lambda t: t.replace('grid = [{"train.allocator_frozen" = [[], ["s"]]}, {train = {allocator = ["uniform"]}}]',
                         "grid = {}"), "ablation 'lambda': grid: empty"),
    (lambda t: t.replace('["lr", "antithetic"]', '"lr"'), "ablation 'pairing': grid.train.estimator: expected a "
                                                           "non-empty list"),
    (lambda t: t.replace('"train.estimator"', '"train.estimater"'),
     r"ablation 'pairing' \(estimater=lr, pairing=independent\): train.estimater: unknown field"),
    (lambda t: t.replace('"train.estimator" = ["lr", "antithetic"]', '"train.noise_space" = ["outputs"]'),
     r"ablation 'pairing' \(noise_space=outputs, pairing=shared\): train.noise_space / train.pairing"),
    (lambda t: t.replace('"train.estimator"', '"data.train"'), "grid.data.train: a sweep cannot vary model"),
    (lambda t: t.replace("seeds = [0, 1]", "seeds = []"), "ablation 'pairing': seeds: expected a non-empty list"),
    (lambda t: t + "[report]\neval_every = 0\n", "report.eval_every: expected an integer of at least 1"),
    (lambda t: t.split("[[ablation]]")[0], "ablation: required"),
])
def test_a_bad_sweep_file_is_one_config_error_naming_the_field(job, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(job, edit(EXAMPLE)))


def test_the_cli_prints_a_bad_sweep_as_one_line(job, capsys):
    assert main(["sweep", str(write(job, EXAMPLE.replace('"train.estimator"', '"train.estimater"')))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("flops-dist: error: ablation 'pairing' (estimater=lr, pairing=independent): "
                           "train.estimater: unknown field; train has steps, batch_size")


def test_summary_gives_final_metrics_and_queries_to_the_loss_target():
    rows = []
    for seed, losses in ((0, [3.0, 2.0, 1.0, 1.0]), (1, [3.0, 3.0, 2.0, 1.0])):
        rows.append(dict(ablation="a", label="x", seed=seed, step=0, queries=0, train_loss=math.nan, test_metric=0.5))
        for step, loss in enumerate(losses, 1):
            rows.append(dict(ablation="a", label="x", seed=seed, step=step, queries=10 * step, train_loss=loss,
                             test_metric=0.7 + 0.1 * seed if step == 4 else math.nan))
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    (s,) = summarize(table, window=2, target=1.5)
    assert s["metric"] == pytest.approx(0.75) and s["metric_std"] == pytest.approx(0.05)
    assert s["loss"] == pytest.approx((1.0 + 1.5) / 2)
    # running means over 2 steps: seed 0 reaches 1.5 at step 3 (30 queries), seed 1 at step 4 (40)
    assert s["queries_to_target"] == pytest.approx(35.0)
    assert math.isnan(summarize(table, window=2, target=0.5)[0]["queries_to_target"])


def digits_job(directory, data):
    """The main job (examples/digits/digits.toml) with the fixture's prepared data."""
    model = EXAMPLES / "digits" / "model.py"
    text = (EXAMPLES / "digits" / "digits.toml").read_text()
    for name in ("model.py", "data/digits_vit_pretrained.safetensors", "data/digits_train.parquet",
                 "data/digits_test.parquet"):
        target = model if name == "model.py" else data / name.split("/")[1]
        text = text.replace(f'"{name}', f'"{target}')
    path = directory / "digits.toml"
    path.write_text(text)
    return path


def test_a_tiny_sweep_runs_on_a_local_ray_tune_and_writes_a_table_and_a_plot(digits_dir, tmp_path, capsys):
    base = digits_job(tmp_path, digits_dir)
    path = write(tmp_path, f"""
base = "{base.name}"
steps = 4
seeds = [0]
set = ["train.queries_per_example=4", "train.chunk_size=64"]
[report]
eval_every = 2
loss_window = 2
loss_target = 100.0
[cluster]
num_cpus = 2
[output]
dir = "out"
[[ablation]]
name = "frozen"
grid = {{"train.allocator_frozen" = [[], ["gamma"]]}}
""")
    try:
        assert main(["sweep", str(path)]) == 0
    finally:
        ray.shutdown()
    table = pq.read_table(tmp_path / "out" / "frozen.parquet").to_pydict()
    assert table["label"] == ["allocator_frozen=none"] * 5 + ["allocator_frozen=gamma"] * 5
    assert table["step"] == [0, 1, 2, 3, 4] * 2 and table["queries"][4] == 4 * 32 * 4
    scored = np.isfinite(table["test_metric"])
    assert list(scored) == [True, False, True, False, True] * 2
    assert len(set(table["lambda_gamma"][6:])) == 1 and len(set(table["lambda_gamma"][1:5])) > 1
    assert (tmp_path / "out" / "frozen.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "allocator_frozen=gamma" in out and "queries to 100" in out


def test_a_value_written_as_a_one_key_table_is_named_in_labels():
    points = expand_grid({"target.include": [{"last_block": [r"blocks\.1\..*", "head"]}, ["head"], []]}, "grid")
    assert points == [("include=last_block", {"target.include": [r"blocks\.1\..*", "head"]}),
                      ("include=head", {"target.include": ["head"]}), ("include=none", {"target.include": []})]


def test_a_trial_whose_model_cannot_run_it_is_refused_before_ray_starts(digits_dir, tmp_path, capsys):
    """Each distinct grid point is preflighted in this process: output-space noise on a LayerNorm
    is one line naming the ablation, the grid point and the target, and no Ray starts."""
    base = digits_job(tmp_path, digits_dir)
    path = write(tmp_path, f'base = "{base.name}"\n[[ablation]]\nname = "layers"\n'
                           '[ablation.grid]\n"target.include" = [["head"], {last_block = ["blocks.1"]}]\n'
                           '"train.noise_space" = ["outputs"]\n')
    ray_before = ray.is_initialized()
    assert main(["sweep", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("flops-dist: error: ablation 'layers' (include=last_block, noise_space=outputs): target: ")
    assert "is a LayerNorm" in line
    assert ray.is_initialized() == ray_before


def test_trials_with_the_same_config_run_once_and_give_their_rows_to_each(job):
    """lambda's allocator_frozen=none and pairing's lr/independent are both the job as it is."""
    sweep = load_sweep(write(job, EXAMPLE.replace("seeds = [3]", "seeds = [0]")))
    runs, members = distinct_trials(sweep.trials)
    assert len(sweep.trials) == 11 and len(runs) == 10
    shared = members["pairing", "estimator=lr, pairing=independent", 0]
    assert [(t.ablation, t.label) for t in shared] == [("pairing", "estimator=lr, pairing=independent"),
                                                        ("lambda", "allocator_frozen=none")]
    rows = share_rows([dict(ablation="pairing", label="estimator=lr, pairing=independent", seed=0, step=1)], members)
    assert [(r["ablation"], r["label"], r["step"]) for r in rows] == [
        ("pairing", "estimator=lr, pairing=independent", 1), ("lambda", "allocator_frozen=none", 1)]
