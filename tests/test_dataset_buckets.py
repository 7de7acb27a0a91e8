"""The loader over aspect-ratio buckets (pipeline/consume/dataset.py, "Aspect-ratio buckets"):
batches never mix shapes, every record once per epoch over ranks and DataLoader workers, shuffled by
epoch within and across buckets, short batches per bucket kept or dropped, exact len(), record
mode of mixed shapes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_bucket_output import BUCKETS, bucket_shards
from torch.utils.data import DataLoader

from pipeline.consume.dataset import PrecomputedDataset
from pipeline.precompute import run

pytestmark = pytest.mark.usefixtures("ray_session")
COLUMNS = ["key", "draw", "x_t", "t", "target_size", "original_size", "flipped"]


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """3 shards x 12 images over 4 buckets, K=2, row groups of 4 records (many units)."""
    from pipeline.run.config import compose

    tmp = tmp_path_factory.mktemp("bucketed")
    urls = bucket_shards(tmp, n_shards=3, n=12)
    cfg = compose(["progress=false", urls, f"output.dir={tmp}/o", *BUCKETS, "source.flip=random",
                   "sampling.draws_per_sample=2", "output.rows_per_group=4"])  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    return tmp / "o"


def _batches(out, world, workers, epoch=0, **kw) -> list[list[dict]]:
    """Per rank, the batches a DataLoader with ``workers`` workers yields."""
    got = []
    for rank in range(world):
        ds = PrecomputedDataset(out, columns=COLUMNS, rank=rank, world_size=world,
                                num_workers=workers, **kw)  # fmt: skip
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        batches = list(loader)
        assert len(batches) == len(ds)  # len() counts what is yielded
        got.append(batches)
    return got


def _check_one_shape(batch: dict) -> tuple:
    """The batch's bucket; fails when it mixes shapes."""
    sizes = {tuple(s) for s in batch["target_size"].tolist()}
    assert len(sizes) == 1, f"a batch of buckets {sizes}"
    (h, w), c = sizes.pop(), batch["x_t"].shape[1]
    assert batch["x_t"].shape[2:] == (h, w)
    assert batch["target_size"].dtype == torch.int32 and batch["flipped"].dtype == torch.bool
    return (c, h, w)


def test_two_ranks_two_workers_every_record_once_and_no_batch_of_two_shapes(bucketed):
    total = PrecomputedDataset(bucketed).num_records
    assert total == 72
    runs = _batches(bucketed, world=2, workers=2, batch_size=5)
    seen = Counter()
    buckets, short = set(), 0
    for batches in runs:
        for b in batches:
            buckets.add(_check_one_shape(b))
            assert 1 <= len(b["key"]) <= 5
            short += len(b["key"]) < 5
            seen.update(zip(b["key"], b["draw"].tolist()))
    assert len(buckets) >= 3
    assert sum(seen.values()) == total and set(seen.values()) == {1}  # each record once
    assert short <= 2 * 2 * len(buckets)  # at most one short batch per reader and bucket
    # drop_last: no short batch, and only those records are left out
    dropped = _batches(bucketed, world=2, workers=2, batch_size=5, drop_last=True)
    sizes = [len(b["key"]) for batches in dropped for b in batches]
    assert set(sizes) == {5}
    assert total - 2 * 2 * len(buckets) * 4 <= sum(sizes) < total


def test_bucket_batches_are_shuffled_by_epoch_and_reproducible(bucketed):
    def order(epoch, **kw):
        (batches,) = _batches(bucketed, world=1, workers=0, epoch=epoch, batch_size=4, **kw)
        return [tuple(b["key"]) for b in batches], [_check_one_shape(b) for b in batches]

    keys0, shapes0 = order(0)
    keys1, _ = order(1)
    assert order(0)[0] == keys0  # same epoch, same batches
    assert keys0 != keys1
    assert sorted(k for b in keys0 for k in b) == sorted(k for b in keys1 for k in b)
    # batches of different buckets interleave (shuffled across buckets), not bucket by bucket
    changes = sum(1 for a, b in zip(shapes0, shapes0[1:]) if a != b)
    assert changes + 1 > len(set(shapes0))
    # within a bucket the records are shuffled: batches are not runs of the file order
    plain, _ = order(0, shuffle=False)
    assert {frozenset(b) for b in keys0} != {frozenset(b) for b in plain}


def test_record_mode_yields_records_of_mixed_shapes(bucketed):
    ds = PrecomputedDataset(bucketed, columns=COLUMNS, seed=3)
    shapes = Counter()
    n = 0
    for r in ds:
        h, w = r["target_size"].tolist()
        assert r["x_t"].shape[1:] == (h, w)
        assert r["original_size"].dtype == torch.int32 and r["flipped"].dtype == torch.bool
        shapes[tuple(r["x_t"].shape)] += 1
        n += 1
    assert n == ds.num_records and len(shapes) >= 3


def test_drop_uneven_gives_every_rank_the_same_batches(bucketed):
    runs = _batches(bucketed, world=3, workers=1, batch_size=4, drop_uneven=True)
    assert len({len(b) for b in runs}) == 1 and len(runs[0]) > 0
    keys = [k for batches in runs for b in batches for k in zip(b["key"], b["draw"].tolist())]
    assert len(keys) == len(set(keys))  # nothing twice
    for batches in runs:
        for b in batches:
            _check_one_shape(b)


def test_polars_duckdb_and_ray_data_read_the_bucket_files(bucketed, ray_session):
    """polars reads one bucket per glob (a column has one tensor shape); DuckDB reads every
    bucket at once (FLOAT[] lists); Ray Data one bucket per call."""
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    names = sorted(p.name for p in bucketed.glob("*.parquet"))
    buckets = sorted({n.split(".")[-2] for n in names})
    total = 0
    for b in buckets:
        h, w = (int(x) for x in b.split("x"))
        df = pl.read_parquet(f"{bucketed}/*.{b}.parquet", columns=["key", "x_t", "target_size"])
        assert df["x_t"].to_numpy().reshape(len(df), 3, h, w).shape[0] == len(df)
        assert {tuple(v) for v in df["target_size"].to_list()} == {(h, w)}
        total += len(df)
    assert total == 72
    con = duckdb.connect()
    rel = con.sql(f"select key, x_t, target_size from read_parquet('{bucketed}/*.parquet')")
    assert [str(t) for t in rel.types] == ["VARCHAR", "FLOAT[]", "INTEGER[]"]
    assert len(rel.fetchall()) == 72
    one = sorted(str(p) for p in bucketed.glob(f"*.{buckets[0]}.parquet"))
    ds = ray_session.data.read_parquet(one)
    h, w = (int(x) for x in buckets[0].split("x"))
    batch = next(iter(ds.iter_batches(batch_size=2, batch_format="numpy")))
    assert batch["x_t"].shape[1:] == (3, h, w)


def test_hf_export_writes_one_config_per_bucket_and_says_so(bucketed, tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    from pipeline.consume.hf import export_hf_parquet, to_hf_dataset

    with caplog.at_level("WARNING", logger="pipeline.consume.hf"):
        written = export_hf_parquet(bucketed, tmp_path / "hf", columns=["key", "x_t", "t"])
    buckets = sorted({w.split("/")[0] for w in written})
    assert len(buckets) >= 3 and all("/" in w for w in written)
    assert "one datasets config per bucket" in caplog.text
    card = (tmp_path / "hf" / "README.md").read_text()
    for b in buckets:
        assert f"- config_name: {b}\n  data_files: {b}/*.parquet" in card
    b = buckets[0]
    h, w = (int(x) for x in b.split("x"))
    ds = datasets.load_dataset(str(tmp_path / "hf"), b, split="train")
    assert ds.features["x_t"].shape == (3, h, w)
    assert len(ds) == sum(pq_rows(p) for p in bucketed.glob(f"*.{b}.parquet"))
    with pytest.raises(ValueError, match=r"pass bucket= one of \['"):
        to_hf_dataset(bucketed, columns=["key", "x_t"], cache_dir=str(tmp_path / "c"))
    one = to_hf_dataset(bucketed, columns=["key", "x_t"], bucket=b, cache_dir=str(tmp_path / "c"))
    assert one.features["x_t"].shape == (3, h, w) and len(one) == len(ds)


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_files_of_a_shard_without_its_marker_are_left_out(bucketed, tmp_path):
    """A job stopped between a shard's bucket files and its marker: the loader reads none of
    that shard's files, and says so."""
    import shutil

    d = shutil.copytree(bucketed, tmp_path / "d")
    (d / "_shards" / "b-1.json").unlink()
    kept = PrecomputedDataset(bucketed).num_records
    with pytest.warns(UserWarning, match=r"data files of shards without a commit marker are "
                      r"left out \(e\.g\. b-1\.\d+x\d+\.parquet\)"):  # fmt: skip
        ds = PrecomputedDataset(d, columns=["key"], batch_size=4)
    keys = [k for b in ds for k in b["key"]]
    assert len(keys) == ds.num_records < kept and not any(k.startswith("s1k") for k in keys)


def test_the_example_trainer_refuses_buckets_naming_the_way(bucketed):
    from jobs.train.loop import train

    with pytest.raises(ValueError, match=r"aspect-ratio buckets .*PrecomputedDataset\(\.\.\., "
                       r"batch_size=B\)"):  # fmt: skip
        train(bucketed, steps=1)
