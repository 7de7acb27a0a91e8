"""PrecomputedDataset: exactly-once partitioning, column projection, shuffling, memory, errors."""

from __future__ import annotations

import io
import tracemalloc
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from fixtures.records import process_meta, write_records, write_records_file
from torch.utils.data import DataLoader

from pipeline.consume.dataset import PrecomputedDataset, RecordsDir, collate
from pipeline.noising.schedule import make_schedule
from pipeline.output import records
from pipeline.read.conditioning import Conditioning


@pytest.fixture
def recdir(tmp_path):
    """3 files, row groups of 8: 5 + 7 + 2 = 14 units of uneven sizes, 100 records."""
    keys = write_records(tmp_path / "recs", {"a": 37, "b": 50, "c": 13})
    return tmp_path / "recs", keys


def keys_of(ds) -> list[str]:
    return [r["key"] for r in ds]


# -- partitioning -------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_exactly_once_two_ranks_two_workers(recdir, shuffle):
    root, keys = recdir
    seen = []
    for rank in range(2):
        ds = PrecomputedDataset(
            root, columns=["key", "t"], shuffle=shuffle, rank=rank, world_size=2
        )
        ds.set_epoch(3)
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        for batch in loader:
            assert isinstance(batch["key"], list) and batch["t"].dtype == torch.int64
            seen += batch["key"]
    assert len(seen) == len(keys) and sorted(seen) == sorted(keys)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_plan_covers_every_unit_once_and_balances(recdir, world_size, num_workers):
    ds = PrecomputedDataset(recdir[0], columns=["t"])
    units = ds.records.units()
    assert len(units) == 14
    for epoch in range(3):
        plan = ds.plan(world_size, num_workers, epoch=epoch)
        flat = [u for rank in plan for worker in rank for u in worker]
        assert sorted(flat, key=lambda u: (u.file, u.row_group)) == units
        per_rank = [sum(len(w) for w in rank) for rank in plan]
        assert max(per_rank) - min(per_rank) <= 1
        for rank in plan:
            per_worker = [len(w) for w in rank]
            assert max(per_worker) - min(per_worker) <= 1


def test_drop_uneven_equalises_every_worker(recdir):
    root, keys = recdir
    counts = {}
    seen = []
    for rank in range(2):
        ds = PrecomputedDataset(
            root, columns=["key"], rank=rank, world_size=2, drop_uneven=True, seed=1
        )
        ds.set_epoch(2)
        epoch = ds.epoch_plan(2, 2)
        plan = epoch.readers
        for worker in range(2):
            limit = epoch.limit(worker)
            assert limit == min(sum(u.num_rows for u in plan[r][worker]) for r in range(2))
        loader = DataLoader(ds, batch_size=3, num_workers=2)
        batches = list(loader)
        counts[rank] = (len(batches), sum(len(b["key"]) for b in batches))
        seen += [k for b in batches for k in b["key"]]
    assert counts[0] == counts[1]  # same number of batches and of records on every rank
    assert len(set(seen)) == len(seen)  # still never twice
    assert len(keys) - len(seen) <= 2 * 2 * 8  # at most ~one row group per worker and rank


def test_single_file_spreads_over_row_groups(tmp_path):
    keys = write_records(tmp_path / "one", {"big": 64}, row_group_size=8)
    got = []
    for rank in range(4):
        part = keys_of(
            PrecomputedDataset(tmp_path / "one", columns=["key"], rank=rank, world_size=4)
        )
        assert len(part) == 16  # 8 row groups over 4 ranks: every rank works
        got += part
    assert sorted(got) == sorted(keys)


def test_torch_distributed_defaults(recdir, monkeypatch):
    root, keys = recdir
    expected = {r: set(keys_of(PrecomputedDataset(root, rank=r, world_size=2))) for r in range(2)}
    ds = PrecomputedDataset(root)  # built before the "process group" exists
    assert ds.world() == (0, 1)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    assert ds.world() == (1, 2)
    assert set(keys_of(ds)) == expected[1]
    # The placement is frozen when the dataset is pickled to (spawned) DataLoader workers.
    assert ds.__getstate__()["_rank"] == 1 and ds.__getstate__()["_world_size"] == 2
    # Explicit arguments win over torch.distributed.
    assert PrecomputedDataset(root, rank=0, world_size=2).world() == (0, 2)


def test_gloo_group_of_one(recdir, tmp_path):
    root, keys = recdir
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ds = PrecomputedDataset(root, columns=["key"])
        assert ds.world() == (0, 1)
        assert sorted(keys_of(ds)) == sorted(keys)
    finally:
        dist.destroy_process_group()


def test_names_of_the_module_before_its_split_are_importable_from_it():
    """The loader's concepts moved to pipeline.consume.{partition,columns,batching}; every public
    name pipeline.consume.dataset had stays importable from it (its old alias is the same module:
    test_moved)."""
    import pipeline.consume.dataset as dataset_module

    names = (
        "Batcher DEFAULT_NULL_LABEL DEFAULT_SHUFFLE_BUFFER DRAWS PrecomputedDataset RecordsDir "
        "ShuffleBuffer Unit buffer_quotas check_null_label collate head_rows refuse_collisions "
        "resolve_dtype rows_len table_to_numpy take_rows to_tensor torch_dtype "
        "uncommitted_files get_worker_info IterableDataset"
    ).split()
    missing = [n for n in names if not hasattr(dataset_module, n)]
    assert not missing
    assert dataset_module.collate is collate and dataset_module.DRAWS == ("all", "cycle")


# -- columns, dtypes, values --------------------------------------------------------------------


class _CountingFile(io.RawIOBase):
    def __init__(self, f, counter: list):
        self.f, self.counter = f, counter

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buf):
        data = self.f.read(len(buf))
        buf[: len(data)] = data
        self.counter[0] += len(data)
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()
        super().close()


class CountingHandler(pafs.FSSpecHandler):
    """A pyarrow filesystem over fsspec's local one that counts the bytes read."""

    def __init__(self):
        super().__init__(fsspec.filesystem("file"))
        self.counter = [0]

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(self.fs.open(path, "rb"), self.counter), mode="r")


def test_reads_only_requested_columns(tmp_path):
    write_records(tmp_path / "r", {"a": 256}, shape=(3, 16, 16), dtype="float32", row_group_size=64)
    handler = CountingHandler()
    fs = pafs.PyFileSystem(handler)

    ds = PrecomputedDataset(str(tmp_path / "r"), columns=["t", "key"], filesystem=fs)
    footer_bytes = handler.counter[0]
    recs = list(ds)
    assert len(recs) == 256 and all(list(r) == ["t", "key"] for r in recs)
    narrow = handler.counter[0] - footer_bytes

    handler.counter[0] = 0
    all_recs = list(PrecomputedDataset(str(tmp_path / "r"), filesystem=fs))
    wide = handler.counter[0] - footer_bytes
    assert set(all_recs[0]) == set(records.record_schema((3, 16, 16), "float32", False).names)
    tensor_bytes = 256 * 3 * 3 * 16 * 16 * 4
    assert wide > tensor_bytes and narrow < 0.05 * tensor_bytes


def test_record_types_and_dtype_cast(tmp_path):
    write_records(tmp_path / "r", {"a": 20}, store_x0=True)
    ds = PrecomputedDataset(tmp_path / "r", shuffle=False)
    r = next(iter(ds))
    assert list(r) == ds.records.column_names  # file column order by default
    assert isinstance(r["key"], str) and isinstance(r["draw"], int) and isinstance(r["index"], int)
    assert r["t"].dtype == torch.int64 and r["t"].shape == ()
    for name in ("x_t", "epsilon", "posterior_mean", "x_0"):
        assert r[name].shape == (3, 4, 4) and r[name].dtype == torch.float16
    for name in records.SCALAR_COLUMNS:
        assert r[name].dtype == torch.float32 and r[name].shape == ()

    cast = list(PrecomputedDataset(tmp_path / "r", shuffle=False, dtype=torch.float32))
    plain = list(ds)
    for a, b in zip(cast, plain):
        assert a["x_t"].dtype == torch.float32 and a["x_0"].dtype == torch.float32
        assert torch.equal(a["x_t"], b["x_t"].float()) and torch.equal(a["x_0"], b["x_0"].float())
        assert a["alpha_bar"].dtype == torch.float32 and a["t"].dtype == torch.int64
    assert [float(r["x_t"][0, 0, 0]) for r in cast] == list(range(20))
    r64 = next(iter(PrecomputedDataset(tmp_path / "r", dtype="float64", columns=["epsilon"])))
    assert r64["epsilon"].dtype == torch.float64
    with pytest.raises(ValueError, match="floating torch dtype"):
        PrecomputedDataset(tmp_path / "r", dtype=torch.int32)


def test_metadata_num_records_and_schedule(recdir):
    ds = PrecomputedDataset(recdir[0])
    assert ds.num_records == 100
    assert ds.files == ["a.parquet", "b.parquet", "c.parquet"]
    assert ds.metadata["shape"] == [3, 4, 4] and ds.metadata["noise"]["seed"] == 0
    assert "source" not in ds.metadata and ds.records.sources["b.parquet"]["shard"] == "b"
    sched = ds.schedule()
    assert (
        sched.num_timesteps == 100
        and sched.betas_sha256 == make_schedule("linear", 100).betas_sha256
    )


def test_argument_errors(recdir):
    root = recdir[0]
    with pytest.raises(ValueError, match=r"unknown columns \['x_0'\].*store_x0"):
        PrecomputedDataset(root, columns=["x_t", "x_0"])
    with pytest.raises(ValueError, match="both rank and world_size"):
        PrecomputedDataset(root, rank=1)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        PrecomputedDataset(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        PrecomputedDataset(root, shuffle_buffer=-1)


# -- shuffling ----------------------------------------------------------------------------------


def test_shuffle_is_seeded_per_epoch(recdir):
    root, keys = recdir

    def order(seed, epoch, **kw):
        ds = PrecomputedDataset(root, columns=["key"], seed=seed, shuffle_buffer=16, **kw)
        ds.set_epoch(epoch)
        return keys_of(ds)

    e0 = order(0, 0)
    assert sorted(e0) == sorted(keys) and e0 != keys
    assert order(0, 0) == e0  # same seed and epoch: same order
    assert order(0, 1) != e0 and sorted(order(0, 1)) == sorted(keys)  # reshuffled per epoch
    assert order(1, 0) != e0
    # Unshuffled: files sorted by name, rows in file order, whatever the epoch.
    ds = PrecomputedDataset(root, columns=["key"], shuffle=False)
    ds.set_epoch(5)
    assert keys_of(ds) == keys


def test_shuffle_mixes_across_row_groups(recdir):
    root, keys = recdir
    got = keys_of(PrecomputedDataset(root, columns=["key"], shuffle_buffer=64))
    # With a buffer much larger than a row group, the first 8 records come from several groups.
    groups = {(k.split("-")[0], int(k.split("-")[1]) // 8) for k in got[:8]}
    assert len(groups) >= 3
    # shuffle_buffer=0 still permutes within each row group and shuffles the unit order.
    got0 = keys_of(PrecomputedDataset(root, columns=["key"], shuffle_buffer=0))
    assert sorted(got0) == sorted(keys) and got0 != keys


def test_bounded_memory_on_a_large_file(tmp_path):
    """One row group plus the shuffle buffer, never the file (32 MiB of x_t here)."""
    n, shape, rg, buf = 8192, (1, 32, 32), 128, 256
    write_records(tmp_path / "big", {"big": n}, shape=shape, dtype="float32", row_group_size=rg)
    record_bytes = 4 * int(np.prod(shape))
    ds = PrecomputedDataset(tmp_path / "big", columns=["x_t", "t"], shuffle_buffer=buf)

    reads = []
    read = ds.records.read
    ds.records.read = lambda unit, *a, **k: (reads.append(unit.num_rows), read(unit, *a, **k))[1]

    pool = pa.default_memory_pool()
    arrow_base = pool.bytes_allocated()
    tracemalloc.start()
    try:
        arrow_peak, count = 0, 0
        for r in ds:
            count += 1
            arrow_peak = max(arrow_peak, pool.bytes_allocated() - arrow_base)
            assert r["x_t"].shape == shape
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n and sum(reads) == n and max(reads) == rg
    file_bytes = n * record_bytes
    bound = 2 * (2 * buf + 2 * rg) * record_bytes  # 2x the documented estimate: 6 MiB
    assert numpy_peak < bound < file_bytes / 4
    assert arrow_peak < 4 * rg * record_bytes  # Arrow holds at most the row group being read


# -- errors -------------------------------------------------------------------------------------


def test_refuses_mixed_processes(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    write_records_file(root / "s1.parquet", "s1", 10, seed=0)
    write_records_file(root / "s2.parquet", "s2", 10, seed=7)
    with pytest.raises(ValueError) as exc:
        PrecomputedDataset(root)
    msg = str(exc.value)
    assert "s1.parquet" in msg and "s2.parquet" in msg and "noise" in msg and "config_hash" in msg
    assert "schedule" not in msg.split("differ in")[1].split("(")[0]

    write_records_file(root / "s2.parquet", "s2", 10, schedule="cosine")
    with pytest.raises(ValueError, match=r"s1\.parquet and .*s2\.parquet differ in schedule"):
        PrecomputedDataset(root)


def test_refuses_files_without_process_metadata(tmp_path):
    root = tmp_path / "foreign"
    root.mkdir()
    write_records_file(root / "a.parquet", "a", 4)
    pq.write_table(pa.table({"x": [1, 2]}), root / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet: no 'ddpm' process metadata"):
        PrecomputedDataset(root)
    (root / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"b\.parquet is not a readable Parquet file"):
        PrecomputedDataset(root)


def test_empty_and_missing_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} holds no records"):
        PrecomputedDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        PrecomputedDataset(tmp_path / "nope")
    (tmp_path / "file.parquet").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.parquet"):
        PrecomputedDataset(tmp_path / "file.parquet")


# -- filesystems --------------------------------------------------------------------------------


def test_file_uri_and_fsspec_filesystems(recdir):
    root, keys = recdir
    assert sorted(keys_of(PrecomputedDataset(f"file://{root}", columns=["key"]))) == sorted(keys)
    fs = fsspec.filesystem("file")
    ds = PrecomputedDataset(str(root), columns=["key"], filesystem=fs)
    assert sorted(keys_of(ds)) == sorted(keys)

    mem = fsspec.filesystem("memory")
    try:
        for name in ("a.parquet", "b.parquet", "c.parquet"):
            mem.pipe(f"/recs-test/{name}", (root / name).read_bytes())
        ds = PrecomputedDataset("memory://recs-test", columns=["key", "x_t"], shuffle=False)
        assert keys_of(ds) == keys
    finally:
        mem.rm("/recs-test", recursive=True)


def test_records_dir_units(recdir):
    rd = RecordsDir(recdir[0])
    assert [u.num_rows for u in rd.units()] == [8, 8, 8, 8, 5, 8, 8, 8, 8, 8, 8, 2, 8, 5]
    assert sum(Counter(u.file for u in rd.units()).values()) == 14


# -- batches (batch_size=...) -------------------------------------------------------------------


def batches_of(root, workers, batch_size, collate_fn=None, **kw):
    """Batch mode (``batch_size=B``, DataLoader batch_size=None) or, with ``collate_fn``,
    record mode through ``DataLoader(batch_size=B, collate_fn=...)``, for epoch 2."""
    if collate_fn is None:
        ds = PrecomputedDataset(root, batch_size=batch_size, **kw)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
    else:
        ds = PrecomputedDataset(root, **kw)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn)
    ds.set_epoch(2)
    return list(loader)


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for name in w:
            if isinstance(w[name], torch.Tensor):
                assert g[name].dtype == w[name].dtype and torch.equal(g[name], w[name]), name
            else:
                assert g[name] == w[name], name


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "kw",
    [
        {"shuffle": False},
        {"seed": 3},
        {"seed": 1, "shuffle_buffer": 0},
        {"seed": 2, "shuffle_buffer": 200, "dtype": torch.float32},
        {"shuffle": False, "dtype": "float64", "columns": ["epsilon", "x_0", "key", "draw"]},
    ],
)
def test_batches_equal_collated_records(tmp_path, workers, kw):
    """Same records, same order, same batches as record mode + collate, every column."""
    root = tmp_path / "r"
    write_records(root, {"a": 37, "b": 50, "c": 13}, store_x0=True)
    got = batches_of(root, workers, 7, **kw)
    want = batches_of(root, workers, 7, collate_fn=collate, **kw)
    assert_same_batches(got, want)
    assert sum(len(b["key"]) for b in got) == 100
    if "dtype" in kw:
        tensor = "epsilon" if "columns" in kw else "x_t"
        assert got[0][tensor].dtype == getattr(torch, str(kw["dtype"]).replace("torch.", ""))
    one = got[0]
    if "t" in one:
        assert one["t"].dtype == torch.int64 and one["alpha_bar"].dtype == torch.float32
        assert one["index"].dtype == torch.int64 and one["x_t"].shape == (7, 3, 4, 4)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_exactly_once_two_ranks_two_workers(recdir, shuffle):
    root, keys = recdir
    seen = []
    for rank in range(2):
        ds = PrecomputedDataset(
            root, columns=["key", "t", "x_t"], shuffle=shuffle, rank=rank, world_size=2,
            batch_size=4, shuffle_buffer=16,
        )  # fmt: skip
        ds.set_epoch(3)
        sizes = {}
        for batch in DataLoader(ds, batch_size=None, num_workers=2):
            assert isinstance(batch["key"], list) and batch["t"].dtype == torch.int64
            assert batch["x_t"].shape == (len(batch["key"]), 3, 4, 4)
            # x_t[i] is filled with the record's row number in its file
            rows = [int(k.split("-")[1]) for k in batch["key"]]
            assert batch["x_t"][:, 0, 0, 0].tolist() == rows
            seen += batch["key"]
            sizes.setdefault(len(batch["key"]) < 4, []).append(len(batch["key"]))
        assert len(sizes.get(True, [])) <= 2  # a short batch only at each worker's end
    assert len(seen) == len(keys) and sorted(seen) == sorted(keys)


def test_batches_seeded_and_reshuffled_per_epoch(recdir):
    root, keys = recdir

    def order(seed, epoch):
        ds = PrecomputedDataset(root, columns=["key"], seed=seed, batch_size=8, shuffle_buffer=16)
        ds.set_epoch(epoch)
        return [k for b in ds for k in b["key"]]

    e0 = order(0, 0)
    assert sorted(e0) == sorted(keys) and e0 != keys
    assert order(0, 0) == e0 and order(0, 1) != e0 and order(1, 0) != e0
    # the same records in the same order as record mode
    rec = PrecomputedDataset(root, columns=["key"], seed=0, shuffle_buffer=16)
    assert keys_of(rec) == e0


def test_drop_uneven_with_more_readers_than_row_groups_is_refused(tmp_path, monkeypatch):
    """World size 4 over one row group used to yield 0 of 40 records on every rank, silently."""
    root = tmp_path / "one"
    write_records(root, {"a": 40}, row_group_size=40)
    for rank in range(4):
        ds = PrecomputedDataset(root, columns=["key"], rank=rank, world_size=4, drop_uneven=True)
        msg = r"4 rank\(s\) x 1 DataLoader worker\(s\) = 4 readers over 1 row group.*0 of 40 rec"
        with pytest.raises(ValueError, match=msg + r".*output\.rows_per_group.*drop_uneven=False"):
            list(ds)
        with pytest.raises(ValueError, match=msg):
            len(ds)
    ds = PrecomputedDataset(root, columns=["key"], rank=0, world_size=4)  # the fix it names
    assert len(list(ds)) == 40
    write_records(root, {"a": 40}, row_group_size=10)  # 4 row groups: one per rank
    ds = PrecomputedDataset(root, columns=["key"], rank=3, world_size=4, drop_uneven=True)
    assert len(list(ds)) == len(ds) == 10
    write_records(root, {"a": 40}, row_group_size=14)  # 3 row groups, 2 ranks x 2 workers
    ds = PrecomputedDataset(root, columns=["key"], rank=0, world_size=2, drop_uneven=True)
    _as_dataloader_worker(monkeypatch, 1, 2)  # in-process (a real worker's error costs torch 10 s)
    with pytest.raises(ValueError, match=r"= 4 readers over 3 row group.*its worker 1"):
        list(ds)


def test_batches_drop_uneven_and_drop_last(recdir):
    root, keys = recdir
    counts, seen = {}, []
    for rank in range(2):
        ds = PrecomputedDataset(
            root, columns=["key"], rank=rank, world_size=2, drop_uneven=True, seed=1, batch_size=3
        )
        ds.set_epoch(2)
        batches = list(DataLoader(ds, batch_size=None, num_workers=2))
        counts[rank] = (len(batches), sum(len(b["key"]) for b in batches))
        seen += [k for b in batches for k in b["key"]]
    assert counts[0] == counts[1] and len(set(seen)) == len(seen)

    ds = PrecomputedDataset(root, columns=["key", "x_t"], batch_size=16, drop_last=True)
    full = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert full and all(b["x_t"].shape[0] == 16 == len(b["key"]) for b in full)
    got = [k for b in full for k in b["key"]]
    assert len(set(got)) == len(got) > len(keys) - 2 * 16
    with pytest.raises(ValueError, match="drop_last"):
        PrecomputedDataset(root, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        PrecomputedDataset(root, batch_size=0)


def test_batches_conditioning_columns(tmp_path):
    """cls: a null is -1 (int64); txt: a null is None, kept in the batch's list."""
    root = tmp_path / "cond"
    root.mkdir()
    n, shape = 30, (3, 4, 4)
    meta = process_meta(shape)
    meta["conditioning"] = Conditioning(["cls", "txt"]).describe()
    schema = records.record_schema(shape, "float16", False, meta)
    assert {"cls", "txt"} <= set(schema.names)
    i = np.arange(n)
    tens = np.zeros((n, *shape), np.float32)
    cols = {"key": [f"k{k:03d}" for k in i], "index": i, "draw": np.zeros(n, np.int32),
            "t": i.astype(np.int32), "x_t": tens, "epsilon": tens, "posterior_mean": tens,
            "posterior_variance": np.ones(n, np.float32),
            "posterior_log_variance": np.zeros(n, np.float32), "alpha_bar": np.ones(n, np.float32),
            "snr": np.ones(n, np.float32), "cls": [None if k % 4 == 0 else int(k) for k in i],
            "txt": [None if k % 5 == 0 else f"caption {k}" for k in i]}  # fmt: skip
    pq.write_table(records.build_table(schema, cols), root / "a.parquet", row_group_size=8)
    columns = ["key", "cls", "txt", "t"]
    for kw in ({"shuffle": False}, {"seed": 4, "shuffle_buffer": 10}):
        for workers in (0, 2):
            got = batches_of(root, workers, 6, columns=columns, **kw)
            want = batches_of(root, workers, 6, collate_fn=collate, columns=columns, **kw)
            assert_same_batches(got, want)
            rows = {
                k: (c, s) for b in got for k, c, s in zip(b["key"], b["cls"].tolist(), b["txt"])
            }
            assert len(rows) == n and all(b["cls"].dtype == torch.int64 for b in got)
            for k in i:
                cls, txt = rows[f"k{k:03d}"]
                assert cls == (-1 if k % 4 == 0 else k)
                assert txt == (None if k % 5 == 0 else f"caption {k}")


def _labels_file(path, labels, row_group_size=8):
    """A records file whose cls column holds ``labels`` (None: an absent member)."""
    n, shape = len(labels), (3, 4, 4)
    meta = process_meta(shape)
    meta["conditioning"] = Conditioning(["cls"]).describe()
    schema = records.record_schema(shape, "float16", False, meta)
    i, tens = np.arange(n), np.zeros((n, *shape), np.float32)
    cols = {"key": [f"k{k:03d}" for k in i], "index": i, "draw": np.zeros(n, np.int32),
            "t": i.astype(np.int32), "x_t": tens, "epsilon": tens, "posterior_mean": tens,
            "posterior_variance": np.ones(n, np.float32),
            "posterior_log_variance": np.zeros(n, np.float32), "alpha_bar": np.ones(n, np.float32),
            "snr": np.ones(n, np.float32),
            "cls": labels}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(records.build_table(schema, cols), path, row_group_size=row_group_size)


def test_a_null_label_is_kept_apart_from_a_real_one(tmp_path):
    """Labels -1 .. 8 with nulls: the default null_label=-1 would make a missing label and a real
    -1 the same number, so it is refused, naming the column, a file and a free value; an
    explicit free null_label keeps them apart; data without that collision loads as before."""
    both = tmp_path / "both"
    _labels_file(both / "a.parquet", [None if k % 4 == 0 else k % 10 - 1 for k in range(30)])
    msg = r"column 'cls' .* real labels equal to null_label=-1 \(e\.g\. in a\.parquet\).*=-2"
    with pytest.raises(ValueError, match=msg):
        PrecomputedDataset(both, columns=["key", "cls"])
    with pytest.raises(ValueError, match=r"null_label=3 .*span -1 to 8"):
        PrecomputedDataset(both, columns=["cls"], null_label=3)
    ds = PrecomputedDataset(both, columns=["key", "cls"], shuffle=False, null_label=-2)
    got = {r["key"]: int(r["cls"]) for r in ds}
    assert got == {f"k{k:03d}": -2 if k % 4 == 0 else k % 10 - 1 for k in range(30)}
    assert list(got.values()).count(-1) == 1 and list(got.values()).count(-2) == 8
    assert len(PrecomputedDataset(both, columns=["key"])) == 30  # cls not read: no question
    with pytest.raises(ValueError, match="null_label must be an integer"):
        PrecomputedDataset(both, columns=["cls"], null_label=None)
    old = tmp_path / "old"  # nulls and labels 0..9: the default -1 as before
    _labels_file(old / "a.parquet", [None if k % 4 == 0 else k % 10 for k in range(30)])
    assert sorted({int(r["cls"]) for r in PrecomputedDataset(old, columns=["cls"])}) == [
        -1,
        *range(10),
    ]
    real = tmp_path / "real"  # real -1 labels and no nulls: nothing to tell apart
    _labels_file(real / "a.parquet", [k % 3 - 1 for k in range(12)])
    assert sorted(int(r["cls"]) for r in PrecomputedDataset(real, columns=["cls"])).count(-1) == 4


def test_read_ahead_errors_in_order_and_no_thread_left(recdir):
    """The next row group is read in a background thread: a read error surfaces after the
    records before it, and a reader left early leaves no thread behind."""
    import gc
    import threading

    root, keys = recdir
    ds = PrecomputedDataset(root, columns=["key"], shuffle=False)
    read = ds.records.read
    calls = []

    def failing(unit, *a, **k):
        calls.append(unit)
        if len(calls) == 3:
            raise OSError("disk on fire")
        return read(unit, *a, **k)

    ds.records.read = failing
    got = []
    with pytest.raises(OSError, match="disk on fire"):
        for r in ds:
            got.append(r["key"])
    assert got == keys[:16]  # the two row groups read before the failing one

    ds.records.read = read
    for batch_size in (None, 4):
        ds.batch_size = batch_size
        it = iter(ds)
        next(it)
        del it
        gc.collect()
        alive = [t.name for t in threading.enumerate() if t.name.startswith("records-read-ahead")]
        assert alive == []


# -- len() and draws="cycle" ----------------------------------------------------------------------


def _as_dataloader_worker(monkeypatch, worker: int, num_workers: int) -> None:
    """Read the dataset in this process as DataLoader worker ``worker`` of ``num_workers`` (its
    get_worker_info). A refusal raised in a real worker process costs the DataLoader's shutdown
    10 s (torch's worker join timeouts, with any IterableDataset), so the refusals are checked
    here; tests above read through real workers."""
    import types

    import pipeline.consume.dataset as dataset_module

    info = types.SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: info)


def _simulated_count(ds, world_size, workers, monkeypatch):
    """Items each rank yields, read worker by worker as DataLoader workers would (their
    get_worker_info), without starting processes."""
    import types

    import pipeline.consume.dataset as dataset_module

    counts = []
    for rank in range(world_size):
        ds._rank, ds._world_size = rank, world_size
        n = 0
        for w in range(max(workers, 1)):
            info = types.SimpleNamespace(id=w, num_workers=workers) if workers else None
            monkeypatch.setattr(dataset_module, "get_worker_info", lambda info=info: info)
            n += sum(1 for _ in ds)
        counts.append(n)
    return counts


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shuffle": False},
        {"drop_uneven": True},
        {"batch_size": 5},
        {"batch_size": 5, "drop_last": True, "drop_uneven": True},
        {"draws": "cycle"},
        {"draws": "cycle", "batch_size": 4, "drop_uneven": True},
    ],
)
def test_len_is_exact_per_rank(tmp_path, world_size, workers, kw, monkeypatch):
    root = tmp_path / "r"
    write_records(root, {"a": 39, "b": 51, "c": 12}, draws=3)  # row groups of 8 split samples
    ds = PrecomputedDataset(root, columns=["key"], num_workers=workers, seed=4, **kw)
    for epoch in range(4):
        ds.set_epoch(epoch)
        lengths = []
        for rank in range(world_size):
            ds._rank, ds._world_size = rank, world_size
            lengths.append(len(ds))
        assert _simulated_count(ds, world_size, workers, monkeypatch) == lengths
        if not kw.get("batch_size") and not kw.get("drop_uneven"):
            assert sum(lengths) == (102 if not kw.get("draws") else 34)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_len_through_dataloader_workers(recdir, batch_size):
    root, keys = recdir
    for rank in range(2):
        ds = PrecomputedDataset(
            root, columns=["key"], rank=rank, world_size=2, num_workers=2,
            batch_size=batch_size, drop_uneven=True,
        )  # fmt: skip
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        assert len(loader) == len(ds) == len(list(loader))


def test_len_refuses_another_worker_count(recdir, monkeypatch):
    ds = PrecomputedDataset(recdir[0], columns=["key"], num_workers=3)
    _as_dataloader_worker(monkeypatch, 0, 2)  # in-process (a real worker's error costs torch 10 s)
    with pytest.raises(ValueError, match=r"num_workers=3.*read by 2 DataLoader worker"):
        list(ds)
    monkeypatch.undo()
    assert len(keys_of(PrecomputedDataset(recdir[0], columns=["key"], num_workers=0))) == 100


def test_len_without_workers_matches_records(recdir):
    ds = PrecomputedDataset(recdir[0], columns=["key"], rank=1, world_size=3)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert len(ds) == len(keys_of(ds))


@pytest.mark.parametrize("shuffle", [True, False])
def test_draws_cycle_yields_draw_e_mod_k(tmp_path, shuffle):
    K = 3
    root = tmp_path / "r"
    write_records(root, {"a": 39, "b": 51, "c": 12}, draws=K)  # 34 samples
    full = {
        (r["key"], r["draw"]): r["epsilon"].clone()
        for r in PrecomputedDataset(root, columns=["key", "draw", "epsilon"], shuffle=False)
    }
    samples = {k for k, _ in full}
    orders = {}
    for epoch in range(2 * K + 1):
        seen = []
        for rank in range(2):
            ds = PrecomputedDataset(
                root, columns=["key", "draw", "epsilon"], draws="cycle", shuffle=shuffle,
                rank=rank, world_size=2, seed=7,
            )  # fmt: skip
            ds.set_epoch(epoch)
            recs = list(ds)
            assert len(recs) == len(ds)
            for r in recs:
                assert r["draw"] == epoch % K
                assert torch.equal(r["epsilon"], full[(r["key"], r["draw"])])
            seen += [r["key"] for r in recs]
        assert sorted(seen) == sorted(samples)  # each sample exactly once per epoch
        orders[epoch] = seen
    if shuffle:
        assert orders[0] != orders[K]  # the same draw again, in another order
    # the draw column is read for the filter but only yielded when asked
    ds = PrecomputedDataset(root, columns=["key"], draws="cycle", shuffle=False)
    ds.set_epoch(1)
    first = next(iter(ds))
    assert list(first) == ["key"]
    got = next(iter(DataLoader(ds, batch_size=None, num_workers=0)))
    assert got == first


def test_draws_cycle_with_one_draw_is_all_and_bad_values(recdir):
    root, keys = recdir
    ds = PrecomputedDataset(root, columns=["key"], draws="cycle", seed=2)
    ds.set_epoch(5)
    ref = PrecomputedDataset(root, columns=["key"], seed=2)
    ref.set_epoch(5)
    assert keys_of(ds) == keys_of(ref) and len(ds) == 100
    with pytest.raises(ValueError, match="draws must be one of all, cycle, got 'even'"):
        PrecomputedDataset(root, draws="even")


def test_draws_cycle_refuses_files_in_another_order(tmp_path):
    root = tmp_path / "r"
    write_records(root, {"a": 12}, draws=2)
    table = pq.read_table(root / "a.parquet")
    order = np.r_[np.arange(0, 12, 2), np.arange(1, 12, 2)]  # draw-major: not the writer's
    pq.write_table(table.take(order), root / "a.parquet", row_group_size=8)
    ds = PrecomputedDataset(root, columns=["key"], draws="cycle")
    with pytest.raises(ValueError, match=r"a.parquet row group 0: draws are not in sample order"):
        list(ds)
