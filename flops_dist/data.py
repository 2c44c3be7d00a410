"""Arrow/Parquet datasets: one input column (a list of floats per example) and one label column."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the column."""


@dataclass(frozen=True)
class ArrayDataset:
    inputs: np.ndarray  # float32 [N, *input_shape], or int64 for integer columns (token ids)
    labels: np.ndarray  # int64 or float32 [N]

    def __len__(self) -> int:
        return len(self.labels)


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
