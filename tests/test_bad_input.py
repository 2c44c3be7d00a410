"""Bad input gets a clear message naming what is wrong, before any Ray actor starts."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flops_dist.api import TrainingError, as_dataset, preflight
from flops_dist.losses import FrozenModelLoss
from flops_dist.config import Config, ConfigError
from flops_dist.data import DataError, load_dataset
from models import FrozenNetLoss, blobs, build_mlp, build_projection, cross_entropy


@pytest.mark.parametrize("raw,message", [
    ({"train": {"allocator": "fastest"}}, "train.allocator: unknown value 'fastest'; choose one of uniform"),
    ({"train": {"estimator": "spsa"}}, "train.estimator: unknown value 'spsa'"),
    ({"train": {"queries_per_example": 2, "min_queries": 4}}, "below the minimum B·A_min"),
    ({"train": {"estimator": "antithetic", "queries_per_example": 5}}, "must be even"),
    ({"train": {"allocator": "neyman", "queries_per_example": 2, "min_queries": 2}}, "neyman spends"),
    ({"train": {"allocator": "neyman", "pairing": "shared"}}, "train.allocator / train.pairing: neyman's"),
    ({"train": {"neyman_pilot": "reweight"}}, "train.neyman_pilot: unknown value 'reweight'; choose one of reuse"),
    ({"train": {"sigma": -1.0}}, "train.sigma: must be positive"),
    ({"train": {"batch_size": "32"}}, "train.batch_size: expected int, got str"),
    ({"train": {"stepz": 3}}, "train.stepz: unknown field"),
    ({"cluster": {"workers": 2, "min_workers": 3}}, "cluster.workers / cluster.min_workers"),
    ({"cluster": {"gpus_per_worker": "2"}}, "cluster.gpus_per_worker: unknown value '2'"),
    ({"output": {"score_every": -1}}, "output.score_every: must be"),
    ({"train": {"allocator_frozen": ["lambda"]}}, "train.allocator_frozen: unknown value 'lambda'; choose one of beta1"),
    ({"train": {"allocator_frozen": "beta0"}}, "train.allocator_frozen: beta0 is always fixed"),
    ({"train": {"allocator": "uniform", "allocator_frozen": ["s"]}}, "train.allocator_frozen: only the flops"),
])
def test_invalid_config_names_the_field(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_dict(raw)


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(bad)


def test_config_paths_resolve_relative_to_the_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[data]\ntrain = "d/train.parquet"\n[model]\nfactory = "m.py:build"\nloss = "pkg.mod:fn"\n')
    cfg = Config.load(path)
    assert cfg.data.train == str(tmp_path / "d" / "train.parquet")
    assert cfg.model.factory == str(tmp_path / "m.py") + ":build"
    assert cfg.model.loss == "pkg.mod:fn"


def write(tmp_path, table):
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    return path


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, pa.table({"x": [[1.0, 2.0]], "label": [0]}))
    with pytest.raises(DataError, match="missing input column 'pixels'; it has x, label"):
        load_dataset(path, "pixels", "label")


def test_wrong_column_types_are_named(tmp_path):
    path = write(tmp_path, pa.table({"pixels": ["a"], "label": [0]}))
    with pytest.raises(DataError, match="'pixels' must be a list of numbers"):
        load_dataset(path, "pixels", "label")
    path = write(tmp_path, pa.table({"pixels": [[1.0]], "label": ["cat"]}))
    with pytest.raises(DataError, match="label column 'label' must be integer or float"):
        load_dataset(path, "pixels", "label")


def test_ragged_rows_and_bad_shape_are_reported(tmp_path):
    path = write(tmp_path, pa.table({"pixels": [[1.0, 2.0], [1.0]], "label": [0, 1]}))
    with pytest.raises(DataError, match="rows of different lengths"):
        load_dataset(path, "pixels", "label")
    path = write(tmp_path, pa.table({"pixels": [[1.0, 2.0, 3.0]], "label": [0]}))
    with pytest.raises(DataError, match="does not fit input_shape"):
        load_dataset(path, "pixels", "label", [2, 2])


def test_not_parquet_and_missing_file(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(junk, "x", "y")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "none.parquet", "x", "y")


def test_a_good_parquet_file_round_trips(tmp_path):
    data = blobs(20)
    table = pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(data.inputs.reshape(-1)), 10),
                      "label": data.labels})
    loaded = load_dataset(write(tmp_path, table), "input", "label", [10])
    assert np.array_equal(loaded.inputs, data.inputs) and np.array_equal(loaded.labels, data.labels)


def test_a_loss_without_per_example_reduction_is_caught():
    cfg = Config().validate()
    mean_loss = lambda o, y: torch.nn.functional.cross_entropy(o, y)  # noqa: E731
    with pytest.raises(TrainingError, match="one loss per example"):
        preflight(build_mlp(), mean_loss, blobs(), cfg)


def test_a_target_matching_nothing_is_a_config_error():
    cfg = Config.from_dict({"target": {"include": ["head"]}})
    with pytest.raises(ConfigError, match="selects no parameter"):
        preflight(build_mlp(), cross_entropy, blobs(), cfg)


def test_a_model_that_fails_on_the_data_is_reported():
    cfg = Config().validate()
    wrong = as_dataset(blobs(), cfg, "train")
    wrong = type(wrong)(wrong.inputs[:, :7].copy(), wrong.labels)
    with pytest.raises(TrainingError, match="failed on a first batch"):
        preflight(build_mlp(), cross_entropy, wrong, cfg)


def test_a_run_dir_that_writes_outside_itself_is_refused(tmp_path):
    from flops_dist.api import train
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "snapshots").symlink_to(outside)
    cfg = Config.from_dict({"output": {"run_dir": str(run_dir)}})
    with pytest.raises(ConfigError, match="snapshots resolves to .*elsewhere, outside the run directory"):
        train(build_mlp(), cross_entropy, blobs(), cfg)
    (run_dir / "snapshots").unlink()
    (run_dir / "model.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(ConfigError, match="outside the run directory"):
        train(build_mlp(), cross_entropy, blobs(), cfg)


class UnreachableModelLoss(FrozenModelLoss):
    """A frozen model behind a service that is not there."""

    def load(self, device):
        raise ConnectionError("no frozen model at http://127.0.0.1:9/")

    def __call__(self, outputs, inputs, labels):
        return outputs.sum(-1)


class NoScoresLoss(FrozenNetLoss):
    scores = FrozenModelLoss.scores  # the base class: no class scores


def test_a_frozen_model_that_cannot_load_is_one_clear_error():
    cfg = Config().validate()
    with pytest.raises(TrainingError, match="model.loss: the frozen model failed to load: ConnectionError: no frozen"):
        preflight(build_projection(), UnreachableModelLoss(), blobs(), cfg)


def test_accuracy_needs_a_black_box_with_scores():
    with pytest.raises(TrainingError, match="defines no scores.*data.metric must be 'loss'"):
        preflight(build_projection(), NoScoresLoss(), blobs(), Config().validate())
    preflight(build_projection(), NoScoresLoss(), blobs(), Config.from_dict({"data": {"metric": "loss"}}))


def test_integer_inputs_stay_integers(tmp_path):
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array([101, 2023, 102, 0] * 2, pa.int32()), 4),
                      "label": [0, 1]})
    loaded = load_dataset(write(tmp_path, table), "tokens", "label")
    assert loaded.inputs.dtype == np.int64 and loaded.inputs[0].tolist() == [101, 2023, 102, 0]


def test_a_frozen_prefix_boundary_that_is_not_a_module_is_a_config_error():
    cfg = Config().validate()
    cfg.target.frozen_prefix = "neck"
    with pytest.raises(ConfigError, match="target.frozen_prefix 'neck' is not a submodule"):
        preflight(build_mlp(), cross_entropy, as_dataset(blobs(), cfg, "train"), cfg)
