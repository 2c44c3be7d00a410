"""Arrow/Parquet datasets: one input column (a list of numbers per example) and one label column.

Two kinds hand out rows by global index, `rows(indices) -> ArrayDataset`:
- ArrayDataset: arrays in memory (from a pyarrow Table, or built by hand);
- ParquetSource: a Parquet file, a directory of parts or a glob, on any filesystem pyarrow supports.
  Only metadata is read up front; rows come from the row groups that hold them, so memory grows with
  a step's batch and a bounded cache, never with the dataset.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the column."""


@dataclass(frozen=True)
class ArrayDataset:
    inputs: np.ndarray  # float32 [N, *input_shape], or int64 for integer columns (token ids)
    labels: np.ndarray  # int64 or float32 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices) -> "ArrayDataset":
        return ArrayDataset(self.inputs[indices], self.labels[indices])

    def batches(self, size: int):
        """The whole set in order, `size` rows at a time."""
        for start in range(0, len(self), size):
            yield self.rows(np.arange(start, min(start + size, len(self))))


def read_table(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {str(path)!r} does not exist")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def table_to_arrays(table: pa.Table, input_column: str, label_column: str,
                    input_shape: list[int] | tuple[int, ...] = (), source: str = "table") -> ArrayDataset:
    names = table.column_names
    for role, column in (("input", input_column), ("label", label_column)):
        if column not in names:
            raise DataError(f"{source}: missing {role} column {column!r}; it has {', '.join(names)}")
    inputs_col = table.column(input_column).combine_chunks()
    itype = inputs_col.type
    if not (pa.types.is_list(itype) or pa.types.is_large_list(itype) or pa.types.is_fixed_size_list(itype)) \
            or not (pa.types.is_floating(itype.value_type) or pa.types.is_integer(itype.value_type)):
        raise DataError(f"{source}: column {input_column!r} must be a list of numbers per example, "
                        f"got {itype}")
    if inputs_col.null_count:
        raise DataError(f"{source}: column {input_column!r} has {inputs_col.null_count} null rows")
    lengths = inputs_col.value_lengths().to_numpy(zero_copy_only=False) if not pa.types.is_fixed_size_list(itype) \
        else np.full(len(inputs_col), itype.list_size)
    if len(lengths) and (lengths != lengths[0]).any():
        raise DataError(f"{source}: column {input_column!r} has rows of different lengths "
                        f"({lengths.min()} to {lengths.max()})")
    width = int(lengths[0]) if len(lengths) else 0
    # integer inputs (token ids) stay integers; everything else is float32
    in_dtype = np.int64 if pa.types.is_integer(itype.value_type) else np.float32
    flat = inputs_col.flatten().to_numpy(zero_copy_only=False).astype(in_dtype)
    shape = tuple(input_shape) or (width,)
    if int(np.prod(shape)) != width:
        raise DataError(f"{source}: column {input_column!r} holds {width} values per row, which does not "
                        f"fit input_shape {list(shape)}")
    ltype = table.schema.field(label_column).type
    if pa.types.is_integer(ltype):
        dtype = np.int64
    elif pa.types.is_floating(ltype):
        dtype = np.float32
    else:
        raise DataError(f"{source}: label column {label_column!r} must be integer or float, got {ltype}")
    labels_col = table.column(label_column)
    if labels_col.null_count:
        raise DataError(f"{source}: label column {label_column!r} has {labels_col.null_count} null rows")
    labels = labels_col.to_numpy().astype(dtype)
    return ArrayDataset(flat.reshape(len(labels), *shape), labels)


def load_dataset(path: str | Path, input_column: str, label_column: str,
                 input_shape: list[int] | tuple[int, ...] = ()) -> ArrayDataset:
    return table_to_arrays(read_table(path), input_column, label_column, input_shape, source=str(path))


def resolve_parts(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files a location names: a file, a directory (its *.parquet files, recursively)
    or a glob over file names, as a local path or a URI pyarrow knows (s3://, gs://, hdfs://...)."""
    location = str(location)
    pattern = "" if not any(c in location for c in "*?[") else location.rsplit("/", 1)[-1]
    base = location[:-len(pattern) - 1] if pattern else location
    try:
        fs, path = pafs.FileSystem.from_uri(base) if "://" in base else (pafs.LocalFileSystem(),
                                                                          str(Path(base).resolve()))
        info = fs.get_file_info(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"dataset {location!r}: cannot open ({e})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"dataset {location!r} does not exist")
    if info.type == pafs.FileType.File and not pattern:
        return fs, [path]
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=not pattern))
    parts = sorted(f.path for f in listing if f.type == pafs.FileType.File
                   and fnmatch.fnmatch(f.base_name, pattern or "*.parquet"))
    if not parts:
        raise DataError(f"dataset {location!r}: no Parquet files there")
    return fs, parts


class ParquetSource:
    """A Parquet dataset read by row group (module docstring). Rows are numbered across the parts
    in path order, so a file and the same rows split into parts give the same indices. Pickles as
    its settings: each process opens the files itself."""

    def __init__(self, location: str, input_column: str, label_column: str,
                 input_shape: list[int] | tuple[int, ...] = (), cache_bytes: int = 256 * 1024**2):
        self.location, self.columns = str(location), (input_column, label_column)
        self.input_shape, self.cache_bytes = tuple(input_shape), cache_bytes
        self.fs, self.parts = resolve_parts(self.location)
        self._reset()
        self.groups: list[tuple[int, int]] = []  # (part, row group), in global order
        counts = []
        for part, path in enumerate(self.parts):
            meta = self._file(part).metadata
            self._check_schema(part, meta.schema.to_arrow_schema())
            for g in range(meta.num_row_groups):
                self.groups.append((part, g))
                counts.append(meta.row_group(g).num_rows)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _reset(self) -> None:
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()  # decoded row groups, least recent first
        self._cached_bytes = 0
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()  # open parts: the footer is read once

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("fs", "_cache", "_files")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.fs, _ = resolve_parts(self.location)
        self._reset()

    def _file(self, part: int, keep_open: int = 64) -> pq.ParquetFile:
        if part in self._files:
            self._files.move_to_end(part)
            return self._files[part]
        path = self.parts[part]
        try:
            self._files[part] = pq.ParquetFile(self.fs.open_input_file(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        if len(self._files) > keep_open:
            self._files.popitem(last=False)
        return self._files[part]

    def _check_schema(self, part: int, schema: pa.Schema) -> None:
        """Every part must hold the two columns with the first part's types."""
        path = self.parts[part]
        for role, column in zip(("input", "label"), self.columns):
            if column not in schema.names:
                raise DataError(f"{path}: missing {role} column {column!r}; it has {', '.join(schema.names)}")
        types = tuple(schema.field(c).type for c in self.columns)
        if part == 0:
            self.types = types
        for column, found, first in zip(self.columns, types, self.types):
            if found != first:
                raise DataError(f"{path}: column {column!r} is {found}, but {self.parts[0]} has {first}; "
                                "every part must have the same schema")

    def _group(self, g: int) -> pa.Table:
        """Row group g, decoded, through a cache bounded in bytes."""
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        part, index = self.groups[g]
        try:
            table = self._file(part).read_row_group(index, columns=list(self.columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{self.parts[part]}: cannot read row group {index} ({e})") from None
        self._cache[g] = table
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def rows(self, indices) -> ArrayDataset:
        """The examples at global `indices`, in that order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {self.location} ({len(self)} rows)")
        group_of = np.searchsorted(self.starts, indices, side="right") - 1
        pieces, order = [], []
        for g in np.unique(group_of):
            at = np.nonzero(group_of == g)[0]
            pieces.append(self._group(int(g)).take(pa.array(indices[at] - self.starts[g])))
            order.append(at)
        table = pa.concat_tables(pieces) if pieces else self._group(0).slice(0, 0)
        if order:
            table = table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
        source = self.parts[self.groups[int(group_of[0])][0]] if len(indices) else self.location
        return table_to_arrays(table, *self.columns, self.input_shape, source=source)

    def batches(self, size: int):
        """The whole set in order, `size` rows at a time, one row group in memory at once."""
        for start in range(0, len(self), size):
            yield self.rows(np.arange(start, min(start + size, len(self))))
