"""End-to-end tests of the precompute job on tiny shards, with the session's local Ray."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures.records import read_records
from shards import npy_bytes, write_array_shard, write_image_shard, write_tar

from pipeline.noising.schedule import make_schedule
from pipeline.output import records
from pipeline.output.manifest import OutputDir
from pipeline.precompute import JobError, run
from pipeline.read.source import SampleError
from pipeline.run.config import quote_url_overrides

pytestmark = pytest.mark.usefixtures("ray_session")


def _arrays(tmp_path, n_shards=3, n=10, shape=(2, 4, 4)):
    for i in range(n_shards):
        write_array_shard(
            tmp_path / f"lat-{i:02d}.tar", n, shape=shape, seed=i, key_prefix=f"k{i}_"
        )
    return f"{tmp_path}/lat-{{00..{n_shards - 1:02d}}}.tar"


def test_record_values_schema_and_metadata(tmp_path, make_cfg):
    urls = _arrays(tmp_path, n_shards=2, n=12)
    cfg = make_cfg(
        "source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out",
        "output.dtype=float32", "output.store_x0=true", "schedule=cosine",
        "schedule.num_timesteps=50", "seed=7",
        "sampling.draws_per_sample=2", "batch_size=5", "output.rows_per_group=8",
    )  # fmt: skip
    manifest = run(cfg)
    assert manifest["exit_code"] == 0
    assert manifest["totals"] == {**manifest["totals"], "samples": 24, "records": 48, "rejected": 0}
    sched = make_schedule("cosine", 50)
    path = tmp_path / "out" / "lat-00.parquet"
    pf = pq.ParquetFile(path)
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [8, 8, 8]
    schema = pf.schema_arrow
    assert schema.field("x_t").type == records.tensor_type([2, 4, 4], "float32")
    assert schema.field("x_t").type.permutation is None
    meta = records.process_metadata(schema)
    assert (
        meta["schedule"]["name"] == "cosine"
        and meta["schedule"]["betas_sha256"] == sched.betas_sha256
    )
    assert meta["noise"]["seed"] == 7 and meta["noise"]["draws_per_sample"] == 2
    assert meta["source"]["shard"] == "lat-00" and meta["source"]["url"].endswith("lat-00.tar")
    assert meta["shape"] == [2, 4, 4] and meta["dtype"] == "float32" and meta["config_hash"]

    cols = read_records(tmp_path / "out")["lat-00.parquet"]
    t = cols["t"].astype(np.int64)
    ab = sched.alphas_cumprod[t][:, None, None, None]
    x0, eps = cols["x_0"].astype(np.float64), cols["epsilon"].astype(np.float64)
    np.testing.assert_allclose(
        cols["x_t"], np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-5
    )
    mean = (
        sched.posterior_mean_coef1[t][:, None, None, None] * x0
        + sched.posterior_mean_coef2[t][:, None, None, None] * cols["x_t"]
    )
    np.testing.assert_allclose(cols["posterior_mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cols["posterior_variance"], sched.posterior_variance[t], rtol=1e-6)
    np.testing.assert_allclose(
        cols["posterior_log_variance"], sched.posterior_log_variance_clipped[t], rtol=1e-6
    )
    np.testing.assert_allclose(cols["alpha_bar"], sched.alphas_cumprod[t], rtol=1e-6)
    # x_0 is the input array; draws are sample-major and share x_0 but not (t, eps)
    from shards import array_samples

    src = array_samples(12, (2, 4, 4), seed=0, key_prefix="k0_")
    assert list(cols["key"][::2]) == list(src) and list(cols["draw"][:4]) == [0, 1, 0, 1]
    np.testing.assert_array_equal(cols["x_0"][::2], np.stack(list(src.values())))
    assert not np.array_equal(cols["epsilon"][0], cols["epsilon"][1])
    # the noise is the keyed noise: regenerate it from the record's identity
    noise = records.noise_from_metadata(meta)
    d = noise.digests("lat-00", ["k0_000003"])
    np.testing.assert_array_equal(noise.noise(d, (2, 4, 4)), cols["epsilon"][6:8])
    np.testing.assert_array_equal(noise.timesteps(d, "lat-00", [3]), t[6:8])


def test_output_identical_across_actors_batches_and_order(tmp_path, make_cfg):
    urls = _arrays(tmp_path, n_shards=4, n=9)
    common = ["source=arrays", "sampling.timesteps=stratified", "sampling.draws_per_sample=2"]
    run(
        make_cfg(
            *common,
            f"source.urls={urls}",
            f"output.dir={tmp_path}/a",
            "ray.num_actors=1",
            "batch_size=4",
        )
    )
    reversed_urls = "[" + ",".join(f"{tmp_path}/lat-{i:02d}.tar" for i in (3, 1, 2, 0)) + "]"
    run(
        make_cfg(
            *common,
            f"source.urls={reversed_urls}",
            f"output.dir={tmp_path}/b",
            "ray.num_actors=2",
            "batch_size=7",
            "read_ahead=2",  # decoded by a reader thread: same records
        )
    )
    a, b = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 4
    for name in a:
        for col in a[name]:
            np.testing.assert_array_equal(a[name][col], b[name][col], err_msg=f"{name}:{col}")


def test_resume_skips_committed_shards_and_equals_clean_run(tmp_path, make_cfg):
    urls = _arrays(tmp_path, n_shards=3, n=6)
    args = ["source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out"]
    run(make_cfg(*args))
    out = OutputDir(str(tmp_path / "out"))
    clean = read_records(tmp_path / "out")
    # simulate a run killed while lat-01 was in flight: no marker, a temporary file left behind
    out.remove(out.marker_name("lat-01"))
    out.remove("lat-01.parquet")
    out.write_bytes(".lat-01.parquet.tmp-0123456789ab", b"partial garbage")  # as tmp_name
    out.write_bytes(".notes.tmp-mine", b"a user's file")  # not the pipeline's: kept
    before = {n: os.stat(out.path(n)).st_mtime_ns for n in ("lat-00.parquet", "lat-02.parquet")}
    manifest = run(make_cfg(*args))
    assert manifest["exit_code"] == 0 and manifest["totals"]["ok"] == 3
    assert {n: os.stat(out.path(n)).st_mtime_ns for n in before} == before  # untouched
    assert [n for n in out.list() if ".tmp-" in n] == [".notes.tmp-mine"]
    resumed = read_records(tmp_path / "out")
    for name in clean:
        for col in clean[name]:
            np.testing.assert_array_equal(clean[name][col], resumed[name][col])


def test_config_mismatch_refused_unless_overwrite(tmp_path, make_cfg):
    urls = _arrays(tmp_path, n_shards=1, n=4)
    args = ["source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out"]
    run(make_cfg(*args, "seed=1"))
    with pytest.raises(JobError, match=r"another config.*seed: 1 -> 2.*output.overwrite=true"):
        run(make_cfg(*args, "seed=2"))
    with pytest.raises(JobError) as err:
        run(make_cfg(*args, "seed=1", "source.shape=[2,4,4]", "sampling.draws_per_sample=2"))
    diff = str(err.value).split("differences: ")[1].split(").")[0]
    assert diff == "sampling.draws_per_sample: 1 -> 2; source.shape: None -> [2, 4, 4]", diff
    manifest = run(make_cfg(*args, "seed=2", "output.overwrite=true"))
    assert manifest["exit_code"] == 0 and manifest["config"]["seed"] == 2
    meta = records.process_metadata(pq.read_schema(tmp_path / "out" / "lat-00.parquet"))
    assert meta["noise"]["seed"] == 2


class _Evil:
    """Unpickling this would create a file: shards must never be unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_samples_are_rejected_with_reasons_and_reconciled(tmp_path, make_cfg):
    good = np.zeros((2, 4, 4), np.float32)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    canary = tmp_path / "pwned"
    members = [
        ("a.npy", npy_bytes(good)),
        ("b.npy", b"\x93NUMPY garbage"),
        ("c.npy", npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True)),
        ("d.npy", npy_bytes(nan)),
        ("e.npy", npy_bytes(np.zeros((2, 4, 5), np.float32))),
        ("f.json", b"{}"),
        ("g.npy", npy_bytes(good)),
        ("h.pyd", pickle.dumps(_Evil(str(canary)))),
        ("g.npy", npy_bytes(good)),
        ("i.npy", npy_bytes(np.full((2, 4, 4), np.inf, np.float32))),
    ]
    write_tar(tmp_path / "bad-00.tar", members)
    write_tar(tmp_path / "empty-00.tar", [])
    urls = f"[{tmp_path}/bad-00.tar,{tmp_path}/empty-00.tar]"
    manifest = run(
        make_cfg(
            "source=arrays",
            f"source.urls={urls}",
            f"output.dir={tmp_path}/out",
            "source.shape=[2,4,4]",
        )
    )
    assert not canary.exists()
    assert manifest["exit_code"] == 0
    bad = manifest["shards"]["bad-00"]
    assert bad["samples"] == 10 and bad["records"] == 2 and bad["rejected"] == 8
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert set(reasons) == {"b", "c", "d", "e", "f", "g", "h", "i"} and len(rejects) == 8
    assert "pickle" in reasons["c"] and "NaN" in reasons["d"] and "shape" in reasons["e"]
    assert "payload" in reasons["f"] and "pyd" in reasons["h"] and "Inf" in reasons["i"]
    assert "duplicate" in reasons["g"]  # the second, non-contiguous "g"; the first is a record
    t = manifest["totals"]
    assert t["samples"] == t["records"] + t["rejected"]  # K = 1: every sample in one place
    empty = pq.read_table(tmp_path / "out" / "empty-00.parquet")
    assert empty.num_rows == 0 and empty.schema.field("x_t").type.shape == [2, 4, 4]


def test_duplicate_key_is_rejected(tmp_path, make_cfg):
    arr = npy_bytes(np.ones((1, 2, 2), np.float32))
    write_tar(tmp_path / "dup-00.tar", [("a.npy", arr), ("b.npy", arr), ("a.npy", arr)])
    m = run(
        make_cfg(
            "source=arrays", f"source.urls={tmp_path}/dup-00.tar", f"output.dir={tmp_path}/out"
        )
    )
    assert m["shards"]["dup-00"]["records"] == 2 and m["shards"]["dup-00"]["rejected"] == 1
    (line,) = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert json.loads(line)["key"] == "a" and "duplicate" in json.loads(line)["reason"]


@pytest.mark.parametrize("ahead", [0, 1])
def test_truncated_shard_is_partial_and_fails_the_job(tmp_path, make_cfg, ahead):
    write_array_shard(tmp_path / "ok-00.tar", 5, shape=(1, 8, 8))
    write_array_shard(tmp_path / "cut-00.tar", 20, shape=(1, 8, 8))
    data = (tmp_path / "cut-00.tar").read_bytes()
    (tmp_path / "cut-00.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "missing-00.tar").write_bytes(b"\x00" * 100)  # no tar header: cannot be read
    urls = f"[{tmp_path}/ok-00.tar,{tmp_path}/cut-00.tar,{tmp_path}/missing-00.tar]"
    m = run(
        make_cfg(
            "source=arrays",
            f"source.urls={urls}",
            f"output.dir={tmp_path}/out",
            "ray.max_shard_retries=1",
            f"read_ahead={ahead}",  # the read error reaches the worker after the samples before it
        )
    )
    assert m["exit_code"] == 1
    cut, missing = m["shards"]["cut-00"], m["shards"]["missing-00"]
    assert cut["status"] == "partial" and 0 < cut["records"] < 20 and cut["error"]
    assert (
        missing["status"] == "failed"
        and missing["attempts"] == 2
        and "missing-00" in missing["error"]
    )
    assert m["shards"]["ok-00"]["status"] == "ok"
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["shard"] for r in rejects if r["key"] is None} == {"cut-00", "missing-00"}
    assert not (tmp_path / "out" / "missing-00.parquet").exists()


def test_on_error_fail_names_shard_and_key(tmp_path, make_cfg):
    write_tar(
        tmp_path / "bad-00.tar",
        [("a.npy", npy_bytes(np.ones((1, 2, 2), np.float32))), ("zz.npy", b"junk")],
    )
    cfg = make_cfg(
        "source=arrays",
        f"source.urls={tmp_path}/bad-00.tar",
        f"output.dir={tmp_path}/out",
        "on_error=fail",
    )
    with pytest.raises(SampleError, match=r"bad-00.*zz"):
        run(cfg)
    assert not (tmp_path / "out" / "bad-00.parquet").exists()


def test_images_end_to_end(tmp_path, make_cfg):
    write_image_shard(tmp_path / "img-00.tar", 6, size=(40, 30), fmt="jpg")
    write_image_shard(tmp_path / "img-01.tar", 6, size=(30, 50), mode="RGBA", fmt="png", seed=9)
    urls = f"{tmp_path}/img-{{00..01}}.tar"
    m = run(
        make_cfg(
            f"source.urls={urls}",
            f"output.dir={tmp_path}/out",
            "source.resolution=16",
            "output.store_x0=true",
        )
    )
    assert m["exit_code"] == 0 and m["totals"]["records"] == 12
    cols = read_records(tmp_path / "out")["img-01.parquet"]
    assert cols["x_t"].shape == (6, 3, 16, 16) and cols["x_t"].dtype == np.float16
    assert cols["x_0"].min() >= -1 and cols["x_0"].max() <= 1


def test_gpu_pinning_gives_each_actor_its_own_gpu(tmp_path, make_cfg):
    """With Ray's fake GPUs (the session Ray has num_gpus=2) each actor gets a distinct id."""
    urls = _arrays(tmp_path, n_shards=4, n=2)
    m = run(
        make_cfg(
            "source=arrays",
            f"source.urls={urls}",
            f"output.dir={tmp_path}/out",
            "ray.gpus_per_actor=1",
            "ray.cpus_per_actor=0.5",
        )
    )
    workers = {e["worker"]["pid"]: tuple(e["worker"]["gpu_ids"]) for e in m["shards"].values()}
    ids = [g for g in workers.values()]
    assert all(len(g) == 1 for g in ids)
    assert len(set(workers)) == len(set(ids)), "two actors shared a GPU"
    assert {e["worker"]["device"] for e in m["shards"].values()} == {"cpu"}  # no CUDA here


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path, make_cfg):
    urls = _arrays(tmp_path, n_shards=1, n=2)
    cfg = make_cfg(
        "source=arrays",
        f"source.urls={urls}",
        f"output.dir={tmp_path}/out",
        "ray.device=cuda",
        "ray.gpus_per_actor=0",
    )
    with pytest.raises(ValueError, match="ray.gpus_per_actor"):
        run(cfg)


def test_quote_url_overrides():
    assert quote_url_overrides(["source.urls=/d/a-{0..3}.tar", "seed=1"]) == [
        "source.urls='/d/a-{0..3}.tar'",
        "seed=1",
    ]
    assert quote_url_overrides(["source.urls='x'"]) == ["source.urls='x'"]
    assert quote_url_overrides(["source.urls=[a,b]"]) == ["source.urls=[a,b]"]


def test_a_shard_that_runs_out_of_time_fails_without_retries(tmp_path, make_cfg):
    urls = _arrays(tmp_path, n_shards=1, n=4)
    args = ["source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out"]
    slow = ["source.shard_timeout_s=1e-9", "source.shape=[2,4,4]", "ray.max_shard_retries=2"]
    m = run(make_cfg(*args, *slow))
    entry = m["shards"]["lat-00"]
    assert m["exit_code"] == 1 and entry["status"] == "failed"
    assert entry["attempts"] == 1 and "source.shard_timeout_s" in entry["error"]


def test_glob_urls_run_and_missing_shards_are_refused_first(tmp_path, make_cfg):
    _arrays(tmp_path, n_shards=3, n=4)
    cfg = ["source=arrays", f"output.dir={tmp_path}/out"]
    m = run(make_cfg(*cfg, f"source.urls={tmp_path}/lat-0[0-2].tar"))
    assert m["exit_code"] == 0 and sorted(m["shards"]) == ["lat-00", "lat-01", "lat-02"]
    assert m["totals"]["records"] == 12
    t0 = time.perf_counter()
    gone = f"source.urls=[{tmp_path}/lat-00.tar,{tmp_path}/gone-1.tar,{tmp_path}/gone-2.tar]"
    with pytest.raises(
        ValueError, match=r"shard .*/gone-1.tar does not exist \(2 of the \d shards to read"
    ):
        run(make_cfg(*cfg, gone, "output.overwrite=true"))
    with pytest.raises(ValueError, match=r"the pattern '.*/nope-\*.tar' matches no file"):
        run(make_cfg(*cfg, f"source.urls={tmp_path}/nope-*.tar", "output.overwrite=true"))
    assert time.perf_counter() - t0 < 5  # no retries, no actor started


@pytest.mark.parametrize(
    "totals,expected",
    [
        ({"shards": 2, "failed": 2, "samples": 0, "rejected": 0}, "no shard could be read (2 f"),
        ({"shards": 2, "failed": 0, "samples": 5, "rejected": 5}, "every sample read was rejec"),
        ({"shards": 2, "failed": 1, "samples": 0, "rejected": 0}, "hold no sample; 1 shards f"),
    ],
)
def test_summary_without_records_says_what_happened(totals, expected):
    from pipeline.precompute import format_summary

    t = {"ok": 0, "partial": 0, "records": 0, "bytes": 0, **totals}
    text = format_summary({"totals": t, "config": {"output": {"dir": "/o"}}, "shards": {}})
    assert expected in text and ("rejected (see" in text) == (totals["rejected"] > 0)


def test_the_summary_throughput_counts_only_this_runs_samples():
    """A resume keeps committed shards: their samples are not this run's throughput (a rerun of
    a finished job printed 1155.6 samples/s for 0.0 s of work)."""
    from pipeline.precompute import format_summary

    t = {"shards": 3, "ok": 3, "partial": 0, "failed": 0, "samples": 36, "records": 72,
         "rejected": 0, "bytes": 0}  # fmt: skip
    m = {"totals": t, "config": {"output": {"dir": "/o"}}, "shards": {}, "wall_seconds": 10.0}
    assert "throughput: 3.6 samples/s" in format_summary(m)
    text = format_summary({**m, "resumed_samples": 12})
    assert "throughput: 2.4 samples/s (24 samples this run, 12 kept from committed shards)" in text
    assert "throughput: 0.0 samples/s (0 samples this run, 36" in format_summary(
        {**m, "resumed_samples": 36, "wall_seconds": 0.01}
    )
