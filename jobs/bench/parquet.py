"""What Parquet encoding of the float16 tensor columns costs, by Arrow layout and writer option.

``python -m jobs.bench.parquet`` writes 1024 rows of three float16 [3, 64, 64] columns (the
project's x_t, epsilon and posterior_mean at 64 px) uncompressed, best of 5, and prints ms per
1024 rows and the file size for:

* the project's layout and options: ``arrow.fixed_shape_tensor`` (FixedSizeList<float16>), no
  dictionary, no statistics on tensors;
* the same with pyarrow's defaults (dictionary and statistics on), the floor of a naive writer;
* the same with BYTE_STREAM_SPLIT encoding, and with data page v2;
* the tensors as one fixed_size_binary value per row (no nesting, no per-value float16): what the
  cost would be without the tensor type, which the output format keeps for its readers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.records import tensor_array, tensor_type

ROWS, SHAPE = 1024, (3, 64, 64)


def binary_column(x: np.ndarray) -> pa.Array:
    width = x[0].nbytes
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(x), [None, pa.py_buffer(x.reshape(-1))]
    )


def time_write(table: pa.Table, path: str, **options) -> tuple[float, int]:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        with pq.ParquetWriter(path, table.schema, compression="none", **options) as w:
            w.write_table(table, row_group_size=256)
        best = min(best, time.perf_counter() - t0)
    return best, os.path.getsize(path)


def main() -> int:
    x = np.random.default_rng(0).standard_normal((ROWS, *SHAPE)).astype(np.float16)
    tt = tensor_type(SHAPE, "float16")  # the project's column type, built as the project does
    tensors = pa.table({name: tensor_array(x, tt) for name in ("x_t", "epsilon", "posterior_mean")})
    binary = pa.table({name: binary_column(x) for name in ("x_t", "epsilon", "posterior_mean")})
    project = {"use_dictionary": False, "write_statistics": False}
    cases = [
        ("fixed_shape_tensor, project options", tensors, project),
        ("fixed_shape_tensor, pyarrow defaults", tensors, {}),
        ("fixed_shape_tensor, BYTE_STREAM_SPLIT", tensors,
         {**project, "column_encoding": "BYTE_STREAM_SPLIT"}),
        ("fixed_shape_tensor, data page v2", tensors, {**project, "data_page_version": "2.0"}),
        ("fixed_size_binary (no tensor type)", binary, project),
    ]  # fmt: skip
    print(f"{ROWS} rows x 3 float16 {list(SHAPE)} columns, uncompressed, best of 5")
    with tempfile.TemporaryDirectory() as d:
        for name, table, options in cases:
            secs, size = time_write(table, os.path.join(d, "t.parquet"), **options)
            print(f"{name:40s} {secs * 1000:7.0f} ms  {size / 1e6:6.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
