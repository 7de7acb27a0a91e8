"""Unit tests of the shard worker's pieces: device pinning, batch maths, row-group writing and
the read-ahead default (batch sizing by free memory: test_memory.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.noising.noise import KeyedNoise
from pipeline.noising.schedule import make_schedule
from pipeline.read.source import Sample
from pipeline.run.config import actor_config, compose
from pipeline.run.stages import RecordOptions, RowGroupWriter, compute_records, read_ahead
from pipeline.run.worker import resolve_device


def test_resolve_device_from_assigned_gpus():
    assert resolve_device("cpu", [0], True) == torch.device("cpu")
    assert resolve_device("auto", [], True) == torch.device("cpu")
    assert resolve_device("auto", ["3"], False) == torch.device("cpu")
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned ids: the first one is cuda:0 in the actor
    assert resolve_device("auto", ["3"], True) == torch.device("cuda", 0)
    assert resolve_device("cuda", [1], True) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="assigned this actor no GPU.*gpus_per_actor"):
        resolve_device("cuda", [], True)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        resolve_device("cuda", [0], False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_records_equal_cpu_records_up_to_float32_rounding():
    sched, noise = make_schedule("linear", 100), KeyedNoise(3, 100, draws=2)
    samples = [
        Sample(f"k{i}", i, np.random.default_rng(i).standard_normal((3, 8, 8)).astype(np.float32))
        for i in range(5)
    ]
    cpu = compute_records(
        sched,
        noise,
        "s",
        samples,
        device=torch.device("cpu"),
        options=RecordOptions("float32", store_x0=True),
    )
    gpu = compute_records(
        sched,
        noise,
        "s",
        samples,
        device=torch.device("cuda", 0),
        options=RecordOptions("float32", store_x0=True),
    )
    np.testing.assert_array_equal(cpu["epsilon"], gpu["epsilon"])
    np.testing.assert_array_equal(cpu["t"], gpu["t"])
    np.testing.assert_allclose(cpu["x_t"], gpu["x_t"], rtol=1e-6, atol=1e-6)


def test_compute_records_layout_and_half_precision():
    sched, noise = make_schedule("cosine", 50), KeyedNoise(1, 50, draws=3)
    rng = np.random.default_rng(0)
    samples = [
        Sample(f"k{i}", 10 + i, rng.standard_normal((2, 4, 4)).astype(np.float32)) for i in range(4)
    ]
    c32 = compute_records(
        sched,
        noise,
        "sh",
        samples,
        device=torch.device("cpu"),
        options=RecordOptions("float32", store_x0=True),
    )
    c16 = compute_records(
        sched,
        noise,
        "sh",
        samples,
        device=torch.device("cpu"),
        options=RecordOptions("float16", store_x0=True),
    )
    assert c32["key"] == [f"k{i}" for i in range(4) for _ in range(3)]
    assert list(c32["index"]) == [10, 10, 10, 11, 11, 11, 12, 12, 12, 13, 13, 13]
    assert list(c32["draw"]) == [0, 1, 2] * 4
    assert c16["x_t"].dtype == np.float16 and c16["epsilon"].dtype == np.float16
    for col in ("x_t", "epsilon", "posterior_mean", "x_0"):
        # the float16 records are the float32 ones rounded once (no double rounding drift)
        np.testing.assert_array_equal(c16[col], c32[col].astype(np.float16), err_msg=col)
    np.testing.assert_array_equal(c32["x_0"][::3], np.stack([s.array for s in samples]))


def test_row_group_writer_writes_exact_groups(tmp_path):
    schema = pa.schema([("v", pa.int64())])
    path = tmp_path / "x.parquet"
    w = RowGroupWriter(pq.ParquetWriter(path, schema), rows=4)
    for n in (3, 3, 1, 6, 2):
        w.write(pa.table({"v": np.arange(n)}, schema=schema))
    w.close()
    md = pq.ParquetFile(path).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [4, 4, 4, 3]
    assert pq.read_table(path).num_rows == 15


def test_a_sample_too_large_for_an_actor_is_a_config_error(tmp_path, make_cfg):
    """source.resolution=20000 used to kill actor after actor ("ActorDiedError" x3)."""
    from shards import write_image_shard

    from pipeline.precompute import JobError, run

    write_image_shard(tmp_path / "a.tar", 1)
    cfg = make_cfg(f"source.urls={tmp_path}/a.tar", f"output.dir={tmp_path}/o")
    cfg.source.resolution = 20000
    with pytest.raises(JobError, match=r"sample shape \[3, 20000, 20000\].*source.resolution"):
        run(cfg)


def test_read_ahead_auto_needs_a_second_cpu():
    def cfg(read_ahead, cpus):  # as the actor receives it: the schema alone holds no values
        over = [f"read_ahead={'null' if read_ahead is None else read_ahead}"]
        return actor_config(compose(["source.urls=x.tar", "output.dir=o", *over,
                                     f"ray.cpus_per_actor={cpus}"]))  # fmt: skip

    assert read_ahead(cfg(None, 1)) == 0  # one CPU: the thread would only contend for the GIL
    assert read_ahead(cfg(None, 2)) == 2
    assert read_ahead(cfg(3, 1)) == 3  # explicit wins
    assert read_ahead(cfg(0, 8)) == 0
