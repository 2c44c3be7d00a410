"""The per-step run log and the seed-based update log, as Parquet files written by row groups."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .update import UpdateMessage

RUN_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("loss", pa.float64()), ("queries", pa.int64()), ("dropped_queries", pa.int64()),
    ("allocation_min", pa.int64()), ("allocation_mean", pa.float64()), ("allocation_max", pa.int64()),
    ("allocation_gini", pa.float64()), ("variance_proxy", pa.float64()),
    ("lambda_beta0", pa.float64()), ("lambda_beta1", pa.float64()), ("lambda_s", pa.float64()),
    ("lambda_gamma", pa.float64()), ("update_bytes", pa.int64()), ("seconds", pa.float64()),
    ("allocation", pa.list_(pa.int32())),
])
UPDATE_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("learning_rate", pa.float64()),
    ("seeds", pa.list_(pa.int64())), ("coefficients", pa.list_(pa.float64())),
])


class RunLogWriter:
    """Buffers rows and writes them as one row group per flush to run_log.parquet and updates.parquet."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._runs = pq.ParquetWriter(self.run_dir / "run_log.parquet", RUN_LOG_SCHEMA)
        self._updates = pq.ParquetWriter(self.run_dir / "updates.parquet", UPDATE_LOG_SCHEMA)
        self._run_rows: list[dict] = []
        self._update_rows: list[dict] = []

    def append(self, record: dict, msg: UpdateMessage, allocation: np.ndarray) -> None:
        self._run_rows.append({**record, "allocation": allocation.astype(np.int32).tolist()})
        self._update_rows.append({"step": msg.step, "learning_rate": msg.learning_rate,
                                  "seeds": msg.seeds.tolist(), "coefficients": msg.coefficients.tolist()})

    def flush(self) -> None:
        if self._run_rows:
            self._runs.write_table(pa.Table.from_pylist(self._run_rows, RUN_LOG_SCHEMA))
            self._updates.write_table(pa.Table.from_pylist(self._update_rows, UPDATE_LOG_SCHEMA))
            self._run_rows, self._update_rows = [], []

    def close(self) -> None:
        self.flush()
        self._runs.close()
        self._updates.close()
