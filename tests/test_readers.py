"""The records are readable as they are by pyarrow, Ray Data, polars and DuckDB, and through
pipeline.consume.hf by Hugging Face datasets. Each test documents what its library returns for the
``arrow.fixed_shape_tensor`` columns, and the one-liner that gives [N, C, H, W] where needed.

Findings (pyarrow 26, Ray 2.60, polars 2.1, DuckDB 2.0, datasets 5.2):

* pyarrow: ``FixedShapeTensorType``; ``records.tensor_to_numpy`` / ``to_numpy_ndarray()`` give
  [N, C, H, W] in the stored dtype. ``pq.read_table(out_dir)`` fails on a real output directory:
  it skips ``_manifest.json``, ``_shards/`` and ``.*`` temporary files (``ignore_prefixes``) but
  opens ``rejects.jsonl``. Pass the file list (``OutputDir.data_files()``) or
  ``pyarrow.dataset.dataset(dir, format="parquet", exclude_invalid_files=True)``.
* Ray Data: schema keeps the extension type; numpy batches are [B, C, H, W] ndarrays of the
  stored dtype, rows are [C, H, W] ndarrays, torch batches [B, C, H, W] tensors.
* polars: ``Extension('arrow.fixed_shape_tensor', Array(Float16, shape=(C*H*W,)), ...)``;
  ``Series.to_numpy()`` is [N, C*H*W] -> ``.reshape(-1, *shape)``.
* DuckDB: ``FLOAT[]`` (a variable-length list; float16 widened to float32, losslessly);
  ``pyarrow.compute.list_flatten(col).to_numpy().reshape(-1, *shape)``, the shape from the
  ``ddpm`` entry of ``parquet_kv_metadata()``.
* datasets: cannot read the columns at all ("does not have a datasets dtype equivalent"); use
  ``pipeline.consume.hf.to_hf_dataset`` or ``export_hf_parquet`` (Array3D features; numpy/torch
  formatting returns float16 arrays as float32).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from fixtures.records import write_records

from pipeline.output import records

SHAPE = (3, 4, 4)


@pytest.fixture(scope="module")
def recdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers") / "out"
    write_records(root, {"a": 21, "b": 12}, shape=SHAPE, x_t="normal", T=50, seed=3)
    return root


@pytest.fixture(scope="module")
def reference(recdir):
    """key -> x_t [C, H, W] float16, read file by file with pyarrow."""
    out = {}
    for f in sorted(recdir.glob("[!._]*.parquet")):
        t = pq.read_table(f, columns=["key", "x_t"])
        out.update(zip(t["key"].to_pylist(), records.tensor_to_numpy(t["x_t"])))
    return out


def check(keys, x_t, reference, dtype=np.float16):
    assert len(keys) == len(reference) == len(set(keys))
    assert x_t.shape == (len(keys), *SHAPE) and x_t.dtype == dtype
    for k, x in zip(keys, x_t):
        np.testing.assert_array_equal(x, reference[k].astype(dtype))


def test_pyarrow(recdir, reference):
    # A bare directory read also opens rejects.jsonl (not a Parquet file, no '_' or '.' prefix).
    with pytest.raises(pa.ArrowInvalid, match="rejects.jsonl"):
        pq.read_table(recdir)
    # Either skip invalid files (opens every footer) or list the records yourself.
    ds = pads.dataset(f"file://{recdir}", format="parquet", exclude_invalid_files=True)
    assert [f.rsplit("/", 1)[1] for f in ds.files] == ["a.parquet", "b.parquet"]
    table = pq.read_table(sorted(str(f) for f in recdir.glob("*.parquet")))
    assert isinstance(table.schema.field("x_t").type, pa.FixedShapeTensorType)
    check(table["key"].to_pylist(), records.tensor_to_numpy(table["x_t"]), reference)
    meta = records.process_metadata(pq.read_schema(recdir / "a.parquet"))
    assert meta["shape"] == list(SHAPE)
    # Projection and predicate pushdown.
    low = ds.to_table(columns=["key", "t", "x_t"], filter=pc.field("t") < 25)
    assert set(low["t"].to_pylist()) <= set(range(25))
    chunk = low["x_t"].chunk(0)
    assert chunk.to_numpy_ndarray().shape == (len(chunk), *SHAPE)


@pytest.mark.slow
def test_ray_data(recdir, reference, ray_session):
    ray = ray_session
    # Ray skips the non-Parquet and hidden files. Materialised once: each Ray Data execution
    # costs seconds here, reads of the materialised blocks are instant.
    ds = ray.data.read_parquet(str(recdir)).materialize()
    assert ds.count() == len(reference)
    assert "fixed_shape_tensor" in str(ds.schema().types[ds.schema().names.index("x_t")])
    keys, xs = [], []
    for batch in ds.select_columns(["key", "x_t"]).iter_batches(
        batch_size=10, batch_format="numpy"
    ):
        assert isinstance(batch["x_t"], np.ndarray) and batch["x_t"].shape[1:] == SHAPE
        keys += batch["key"].tolist()
        xs.append(batch["x_t"])
    check(keys, np.concatenate(xs), reference)
    row = ds.take(1)[0]
    assert isinstance(row["x_t"], np.ndarray) and row["x_t"].shape == SHAPE
    tb = next(iter(ds.select_columns(["x_t", "t"]).iter_torch_batches(batch_size=4)))
    assert tuple(tb["x_t"].shape) == (4, *SHAPE) and str(tb["x_t"].dtype) == "torch.float16"


def test_polars(recdir, reference):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet(f"{recdir}/*.parquet", columns=["key", "t", "x_t"])
    assert "arrow.fixed_shape_tensor" in str(df.schema["x_t"])
    flat = df["x_t"].to_numpy()  # [N, C*H*W]: the Array storage of the extension type
    assert flat.shape == (len(df), int(np.prod(SHAPE)))
    check(df["key"].to_list(), flat.reshape(-1, *SHAPE), reference)
    # Lazy scan with a filter keeps the type; polars hands it back to Arrow intact.
    lazy = pl.scan_parquet(f"{recdir}/*.parquet").filter(pl.col("t") < 25).collect()
    assert isinstance(lazy.to_arrow().schema.field("x_t").type, pa.FixedShapeTensorType)


def test_duckdb(recdir, reference):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    rel = con.sql(f"select key, t, x_t from read_parquet('{recdir}/*.parquet')")
    assert [str(t) for t in rel.types] == ["VARCHAR", "INTEGER", "FLOAT[]"]
    table = rel.to_arrow_table()
    (raw,) = con.execute(
        f"select value from parquet_kv_metadata('{recdir}/a.parquet') where key = 'ddpm'"
    ).fetchone()
    shape = json.loads(raw)["shape"]
    x_t = pc.list_flatten(table["x_t"]).to_numpy().reshape(-1, *shape)  # float32 [N, C, H, W]
    check(table["key"].to_pylist(), x_t, reference, dtype=np.float32)
    sql = f"select count(*) from read_parquet('{recdir}/*.parquet') where t < 25"
    (n,) = con.execute(sql).fetchone()
    assert 0 < n < len(reference)


def test_datasets_cannot_read_tensor_columns(recdir):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="does not have a datasets dtype equivalent"):
        datasets.Dataset.from_parquet(str(recdir / "a.parquet"))


def test_to_hf_dataset(recdir, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    from pipeline.consume.hf import to_hf_dataset

    ds = to_hf_dataset(recdir, cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(reference)
    assert ds.features["x_t"] == datasets.Array3D(shape=SHAPE, dtype="float16")
    assert ds.features["t"] == datasets.Value("int32")
    np_ds = ds.with_format("numpy")
    check(list(np_ds["key"]), np.asarray(np_ds["x_t"]), reference, dtype=np.float32)
    torch_row = ds.with_format("torch")[0]
    assert tuple(torch_row["x_t"].shape) == SHAPE

    sub = to_hf_dataset(recdir, columns=["key", "epsilon"], cache_dir=str(tmp_path / "hf"))
    assert sub.column_names == ["key", "epsilon"]
    again = to_hf_dataset(recdir, columns=["key", "epsilon"], cache_dir=str(tmp_path / "hf"))
    assert again.cache_files == sub.cache_files  # unchanged files: the cache is reused
    with pytest.raises(ValueError, match="unknown columns"):
        to_hf_dataset(recdir, columns=["x_0"], cache_dir=str(tmp_path / "hf"))


def test_export_hf_parquet(recdir, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    from pipeline.consume.hf import export_hf_parquet

    out = tmp_path / "hf-parquet"
    assert export_hf_parquet(recdir, out) == ["a.parquet", "b.parquet"]
    meta = pq.read_schema(out / "a.parquet").metadata
    assert records.process_metadata(pq.read_schema(out / "a.parquet"))["shape"] == list(SHAPE)
    assert b"huggingface" in meta
    assert pq.ParquetFile(out / "a.parquet").metadata.num_row_groups == 3  # row groups kept

    ds = datasets.load_dataset(
        "parquet",
        data_files=f"{out}/*.parquet",
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.features["x_t"] == datasets.Array3D(shape=SHAPE, dtype="float16")
    np_ds = ds.with_format("numpy")
    check(list(np_ds["key"]), np.asarray(np_ds["x_t"]), reference, dtype=np.float32)


def test_export_into_records_is_refused_and_an_export_is_no_records(recdir, tmp_path):
    """export_hf_parquet(d, d) used to overwrite the records with the datasets layout, and the
    loader then yielded x_t of shape [4]."""
    pytest.importorskip("datasets")
    from pipeline.consume.dataset import PrecomputedDataset
    from pipeline.consume.hf import export_hf_parquet

    before = {p.name: p.read_bytes() for p in recdir.glob("*.parquet")}
    other = tmp_path / "other"
    write_records(other, {"c": 3})
    (other / "_manifest.json").unlink()  # records files without a manifest: refused too
    (tmp_path / "link").symlink_to(recdir)
    for target, why in [
        (recdir, "it is the records directory"),
        (tmp_path / "link", "it is the records directory"),
        (other, r"c\.parquet is a records file"),
    ]:
        with pytest.raises(ValueError, match=f"refused to export into .*{why}"):
            export_hf_parquet(recdir, target)
    (other / "c.parquet").unlink()
    (other / "_manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"_manifest\.json: a records directory"):
        export_hf_parquet(recdir, other)
    assert {p.name: p.read_bytes() for p in recdir.glob("*.parquet")} == before
    hf = tmp_path / "hf"
    assert export_hf_parquet(recdir, hf) == ["a.parquet", "b.parquet"]
    assert export_hf_parquet(recdir, hf) == ["a.parquet", "b.parquet"]  # over an export: fine
    with pytest.raises(ValueError, match=r"hf/a\.parquet: not records but a Hugging Face"):
        PrecomputedDataset(hf)
    assert len(PrecomputedDataset(recdir)) > 0  # records still load
