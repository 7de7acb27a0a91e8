"""Smoke tests of the benchmark harness (jobs/bench/) on tiny inputs: its pieces run, and the
floor and the Ray Data peer's batch function compute the project's records. Behaviour only,
never speed."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards import npy_bytes, write_tar

from jobs.bench import floor as bench_floor
from jobs.bench import measure as bench_measure
from jobs.bench import peer as bench_peer
from jobs.bench import profile as bench_profile
from jobs.bench import report as bench_report
from jobs.bench import run as bench
from pipeline.demo import write_photo_shards
from pipeline.output.records import TENSOR_COLUMNS, tensor_to_numpy

SCALARS = ("key", "index", "draw", "t", "posterior_variance", "posterior_log_variance", "alpha_bar")


def _columns(path) -> dict:
    table = pq.read_table(path)
    return {
        c: tensor_to_numpy(table.column(c)) if c in TENSOR_COLUMNS else table.column(c).to_pylist()
        for c in table.column_names
    }


def _assert_same_records(got: dict, want: dict) -> None:
    """Scalars equal; float16 tensors equal within one float16 rounding step."""
    for c in SCALARS:
        assert got[c] == want[c], c
    for c in TENSOR_COLUMNS:
        a, b = got[c], want[c]
        assert a.dtype == b.dtype == np.float16 and a.shape == b.shape, c
        ulp = np.spacing(np.abs(b)).astype(np.float32)
        assert np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= ulp), c


@pytest.fixture(scope="module")
def photo_shard(tmp_path_factory) -> str:
    """16 photo crops (seed 4: RGB and grayscale JPEGs, 3 RGBA PNGs), some large enough for
    JPEG draft decoding and a reducing gap at 32 px."""
    d = tmp_path_factory.mktemp("photos")
    write_photo_shards(d, 1, 16, seed=4, min_crop=40, max_crop=160, prefix="ph", labels=False)
    path = str(next(d.glob("*.tar")))
    with tarfile.open(path) as tar:
        assert any(m.name.endswith(".png") for m in tar)  # the alpha path is exercised
    return path


def _project(url, out, resolution=32, kind="images") -> dict:
    summary = bench_profile._project(url, str(out), resolution, kind)
    assert summary["status"] == "ok" and summary["rejected"] == 0
    return _columns(Path(out) / summary["file"])


def test_floor_computes_the_project_records_for_photos(photo_shard, tmp_path):
    want = _project(photo_shard, tmp_path / "project")
    (tmp_path / "floor").mkdir()
    done = bench_floor.process_shard((photo_shard, str(tmp_path / "floor"), 32, 0))
    assert done["samples"] == 16
    _assert_same_records(_columns(tmp_path / "floor" / f"{done['shard']}.parquet"), want)


def test_floor_computes_the_project_records_for_arrays(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((4, 8, 8), np.float32) for _ in range(7)]
    members = [(f"z_{i:06d}.npy", npy_bytes(x)) for i, x in enumerate(arrays)]
    url = str(write_tar(tmp_path / "lat-0003.tar", members))
    want = _project(url, tmp_path / "project", kind="arrays")
    (tmp_path / "floor").mkdir()
    done = bench_floor.process_shard((url, str(tmp_path / "floor"), 64, 0))
    _assert_same_records(_columns(tmp_path / "floor" / "lat-0003.parquet"), want)
    assert done == {**done, "shard": "lat-0003", "samples": 7}


def test_peer_batch_function_computes_the_project_records(photo_shard, tmp_path):
    """RecordMaker on a batch shaped as read_webdataset(decoder=one_payload) yields it."""
    want = _project(photo_shard, tmp_path / "project")
    rows = []
    with tarfile.open(photo_shard) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            sample = {"__key__": key, "__url__": photo_shard, ext: tar.extractfile(m).read()}
            rows.append(bench_peer.one_payload(sample))
    batch = pa.Table.from_pylist(rows)
    out = bench_peer.RecordMaker(resolution=32)(batch)
    got = {
        c: tensor_to_numpy(out.column(c)) if c in TENSOR_COLUMNS else out.column(c).to_pylist()
        for c in out.column_names
    }
    _assert_same_records(got, want)


def test_monitor_times_a_process_tree_and_its_memory(tmp_path):
    code = (
        "import multiprocessing as mp, time\n"
        "x = bytearray(80 * 2**20)\n"
        "p = mp.get_context('fork').Process(target=time.sleep, args=(0.8,))\n"
        "p.start(); p.join()\n"
    )
    m = bench_measure.run_measured([sys.executable, "-c", code], tmp_path / "log", interval=0.05)
    assert m["exit_code"] == 0 and m["wall_s"] >= 0.8
    assert m["driver_peak_rss"] >= 80 * 2**20 and m["cpu_s"] > 0
    assert 0 < m["cpu_util"] <= 1
    assert len(m["worker_peak_rss"]) == 1 and m["actor_peak_rss"] == []
    assert m["leftover_pids"] == []


def test_dirty_paths_keep_the_first_character():
    porcelain = " M pipeline/precompute.py\n?? docs/new.md\nM  jobs/bench.py\n"
    assert bench_measure.dirty_paths(porcelain) == [
        "docs/new.md",
        "jobs/bench.py",
        "pipeline/precompute.py",
    ]


def test_dataset_cache_and_parquet_stats(tmp_path):
    paths = bench_measure.dataset(tmp_path, "arrays", 2, 3, shape=(4, 2, 2))
    assert [Path(p).name for p in paths] == ["shard-0000.tar", "shard-0001.tar"]
    mtime = Path(paths[0]).stat().st_mtime
    assert bench_measure.dataset(tmp_path, "arrays", 1, 3, shape=(4, 2, 2)) == paths[:1]
    assert Path(paths[0]).stat().st_mtime == mtime  # cached, not rebuilt
    assert bench_measure.brace_url(paths).endswith("shard-{0000..0001}.tar")
    res = bench_floor.run(paths, str(tmp_path / "out"), 64, processes=1)
    assert res["samples"] == 6
    stats = bench_measure.parquet_stats(tmp_path / "out")
    assert stats["files"] == 2 and stats["rows"] == 6 and stats["bytes"] == res["bytes"]


def test_plan_and_commands():
    full = bench.plan(quick=False, repeats_headline=3, repeats=2)
    head = [s for s in full if s.group == "headline"]
    assert [(s.shards, s.per_shard, s.resolution, s.repeats) for s in head] == [(16, 1000, 64, 3)]
    assert {(s.shards, s.per_shard) for s in full if s.group == "samples"} == {
        (2, 250),
        (2, 10_000),
    }
    cmd = bench.command("project", head[0], ["/d/shard-0000.tar", "/d/shard-0001.tar"], Path("/o"))
    assert cmd[1:3] == ["-m", "pipeline.precompute"]
    assert "source.urls=/d/shard-{0000..0001}.tar" in cmd and "progress=false" in cmd
    (long,) = [s for s in full if s.group == "long"]
    assert (long.shards, long.per_shard, long.systems) == (64, 1000, ("project", "floor"))


def test_profile_stages():
    stack = (
        "<module> (x.py:1);ShardWorker.process (pipeline/run/worker.py:230);"
        "_iter_shard (pipeline/read/source.py:400);"
        "ImageDecoder.__call__ (pipeline/read/source.py:140);"
        "ImageDecoder._decode (pipeline/read/source.py:160);Image.resize (PIL/Image.py:2300)"
    )
    assert bench_profile.classify(stack) == "resize (PIL)"
    assert bench_profile.classify("<module> (x.py:1);setup (pipeline/run/worker.py:9)") is None
    raw = f"{stack} 3\n<module> (x.py:1);ShardWorker.process (pipeline/run/worker.py:230) 1\n"
    assert bench_profile.breakdown(raw) == {"resize (PIL)": 3, "other": 1}


def _fake_results() -> dict:
    runs = []
    for name, group, shards, per, scale in [
        ("photos64 16x1000", "headline", 16, 1000, 1.0),
        ("photos64 2x1000", "shards", 2, 1000, 0.5),
        ("photos64 2x10000", "samples", 2, 10_000, 0.9),
        ("photos64 64x1000", "long", 64, 1000, 1.2),
    ]:
        for system, sps, rss in [("project", 400, 500), ("floor", 450, 200), ("peer", 150, 300)]:
            if group == "long" and system == "peer":
                continue  # the long job runs project and floor only
            procs = [
                {"role": "actor", "cpu": 10.0},
                {"role": "actor", "cpu": 11.0},
                {"role": "driver", "cpu": 4.0},
                {"role": "ray-system", "cpu": 2.5},
            ]
            rss_mib = rss * (1.1 if per == 10_000 else 1.0) * 2**20
            runs.append({
                "name": name, "group": group, "system": system, "data": {"kind": "photos"},
                "resolution": 64, "shards": shards, "per_shard": per, "samples": shards * per,
                "ok": True, "wall_s": shards * per / (sps * scale),
                "samples_per_s": sps * scale, "mb_per_s": 30.0, "cpu_util": 0.9,
                "driver_peak_rss": 300 * 2**20, "actor_peak_rss": [rss_mib, rss_mib],
                "worker_peak_rss": [], "tree_peak_rss": 2**31, "load_before": 0.5,
                "procs": procs, "cpu_s": 27.5,
            })  # fmt: skip
    machine = {"cpu": "test cpu", "cores": 2, "memory_gb": 24, "os": "Linux", "python": "3",
               "versions": dict.fromkeys(("ray", "pyarrow", "numpy", "torch", "PIL"), "1"),
               "commit": "abc1234", "dirty": []}  # fmt: skip
    phases = {p: {"median": 1.5, "min": 1.0, "max": 2.0} for p in ("ray_init", "total")}
    return {"command": "python jobs/bench.py", "date": "today", "machine": machine, "runs": runs,
            "profile": {"project": {"stages": {"resize (PIL)": 1.0}, "seconds": 2.0}},
            "startup": {"repeats": 3, "phases": phases}}  # fmt: skip


def test_report_tables_goals_and_kept_notes(tmp_path):
    results = _fake_results()
    rows = bench_report.aggregate(results)
    _, vals = bench_report.goals(rows)
    assert vals["project_over_floor"] == pytest.approx(400 / 450)
    assert vals["project_over_peer"] == pytest.approx(400 / 150)
    assert vals["actor_rss_growth"] == pytest.approx(1.1)
    md = tmp_path / "benchmark.md"
    md.write_text(
        "# notes by hand\n\n" + bench_report.BEGIN + "\nold\n" + bench_report.END + "\ntail\n"
    )
    bench_report.write(results, tmp_path)
    text = md.read_text()
    assert text.startswith("# notes by hand") and text.rstrip().endswith("tail")
    assert "old" not in text and "0.89x (met)" in text and "2.67x (met)" in text
    assert "| (a 4x longer job, photos64 64x1000: project / floor) | | 0.89x |" in text
    assert (
        "| `ray.init`: GCS, raylet, API server, dashboard + runtime-env agents | 1.5 | 1.0-2.0 |"
        in text
    )
    assert "| project | 21.0 | 4.0 | 0.0 | 2.5 | 27.5 |" in text  # core-seconds by role
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
    json.dumps(results)  # what bench.py saves


def test_marginal_rate_is_delta_samples_over_delta_wall():
    rows = bench_report.aggregate(_fake_results())
    m = bench_report.marginal(rows, "headline", "long")
    p_walls = (16_000 / 400, 64_000 / 480)
    f_walls = (16_000 / 450, 64_000 / 540)
    assert m["project"] == pytest.approx(48_000 / (p_walls[1] - p_walls[0]))
    assert m["floor"] == pytest.approx(48_000 / (f_walls[1] - f_walls[0]))
    assert m["ratio"] == pytest.approx(m["project"] / m["floor"])
    assert bench_report.marginal(rows, "headline", "arrays48") is None  # no such run
    table, _ = bench_report.goals(rows)
    assert "marginal rate, photos64 16x1000 -> photos64 64x1000: project / floor" in table
    (arrays48,) = [s for s in bench.plan(False, 3, 2) if s.group == "arrays48"]
    assert (arrays48.shards, arrays48.systems) == (48, ("project", "floor"))
