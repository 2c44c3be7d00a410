"""Parquet read by row group: a file, a directory of parts and a glob are the same rows by index."""
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flops_dist.data import DataError, ParquetSource, load_dataset


def table(n=300, seed=0, label_type=pa.int64()):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n, 5)).astype(np.float32)
    return pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(inputs.reshape(-1)), 5),
                     "y": pa.array(rng.integers(0, 3, n), label_type)})


@pytest.fixture
def one_file_and_parts(tmp_path):
    t = table()
    pq.write_table(t, tmp_path / "all.parquet")
    (tmp_path / "parts").mkdir()
    for i, (a, b) in enumerate([(0, 70), (70, 200), (200, 300)]):
        pq.write_table(t.slice(a, b - a), tmp_path / "parts" / f"part-{i}.parquet", row_group_size=32)
    return tmp_path


def test_a_file_a_directory_of_parts_and_a_glob_hold_the_same_rows(one_file_and_parts):
    whole = load_dataset(one_file_and_parts / "all.parquet", "x", "y")
    indices = np.random.default_rng(1).permutation(300)[:64]
    for location in ("all.parquet", "parts", "parts/part-*.parquet"):
        source = ParquetSource(str(one_file_and_parts / location), "x", "y")
        rows = source.rows(indices)
        assert len(source) == 300
        assert np.array_equal(rows.inputs, whole.inputs[indices]) and np.array_equal(rows.labels, whole.labels[indices])


def test_batches_stream_every_row_in_order(one_file_and_parts):
    source = ParquetSource(str(one_file_and_parts / "parts"), "x", "y")
    streamed = np.concatenate([b.labels for b in source.batches(50)])
    assert np.array_equal(streamed, load_dataset(one_file_and_parts / "all.parquet", "x", "y").labels)


def test_the_row_group_cache_stays_within_its_bound(one_file_and_parts):
    source = ParquetSource(str(one_file_and_parts / "parts"), "x", "y", cache_bytes=2000)
    source.rows(np.arange(300))  # every row group once
    group_bytes = max(source._group(g).nbytes for g in range(len(source.groups)))
    assert sum(t.nbytes for t in source._cache.values()) <= max(2000, group_bytes)


def test_a_source_pickles_as_its_settings_and_reopens(one_file_and_parts):
    source = ParquetSource(str(one_file_and_parts / "parts"), "x", "y")
    source.rows([1, 2, 3])
    state = pickle.dumps(source)
    assert len(state) < 4000  # no rows travel
    assert np.array_equal(pickle.loads(state).rows([299]).labels, source.rows([299]).labels)


def test_a_schema_that_differs_between_parts_names_both_files_and_the_column(one_file_and_parts):
    parts = one_file_and_parts / "parts"
    pq.write_table(table(10, label_type=pa.float32()), parts / "part-3.parquet")
    with pytest.raises(DataError) as err:
        ParquetSource(str(parts), "x", "y")
    assert f"{parts / 'part-3.parquet'}: column 'y' is float" in str(err.value)
    assert str(parts / "part-0.parquet") in str(err.value)


def test_a_missing_column_an_unreadable_part_and_a_missing_location_are_named(one_file_and_parts):
    parts = one_file_and_parts / "parts"
    with pytest.raises(DataError, match=f"{parts / 'part-0.parquet'}: missing label column 'label'"):
        ParquetSource(str(parts), "x", "label")
    (parts / "part-9.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=f"{parts / 'part-9.parquet'}: not a readable Parquet file"):
        ParquetSource(str(parts), "x", "y")
    with pytest.raises(DataError, match="does not exist"):
        ParquetSource(str(one_file_and_parts / "nowhere"), "x", "y")
    with pytest.raises(DataError, match="no Parquet files"):
        ParquetSource(str(one_file_and_parts / "parts" / "*.csv"), "x", "y")
