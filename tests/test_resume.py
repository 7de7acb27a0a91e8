"""Output-directory safety and resume (pipeline/output/resume.py, pipeline/output/lease.py): the
pipeline deletes only what it wrote, never writes among foreign files, lets one driver at a time
write a directory, refuses markers of another config or input, and redoes committed shards whose
input changed or whose file is gone. Also the exit codes of data that is lost silently otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from shards import flip_an_x_t_sign, npy_bytes, write_array_shard, write_tar

from pipeline.output import resume
from pipeline.output.lease import LEASE
from pipeline.output.manifest import (
    MANIFEST,
    CorruptFileError,
    OutputDir,
    OutsideOutputError,
    is_shard_id,
)
from pipeline.precompute import JobError, run
from pipeline.read.source import shard_id
from pipeline.run.config import compose

pytestmark = pytest.mark.usefixtures("ray_session")


def _job(tmp_path, *extra, n_shards=2, n=4):
    for i in range(n_shards):
        write_array_shard(tmp_path / f"lat-{i:02d}.tar", n, shape=(2, 4, 4), seed=i)
    urls = f"{tmp_path}/lat-{{00..{n_shards - 1:02d}}}.tar"
    return ["source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out", *extra]


@pytest.fixture(scope="module")
def committed(tmp_path_factory, ray_session):
    """The shards of :func:`_job` and the output of one clean run of them, made once per module:
    the tests that only damage the output or refuse a re-run start from a copy of it."""
    root = tmp_path_factory.mktemp("resume-committed")
    args = _job(root)
    assert run(compose(["progress=false", *args]))["exit_code"] == 0
    return root


@pytest.fixture
def rerun_args(committed, tmp_path) -> list[str]:
    """A copy of the committed output in ``tmp_path/out``; the arguments of a re-run of its job
    (reading the module's shards, which no test changes)."""
    shutil.copytree(committed / "out", tmp_path / "out")
    urls = f"{committed}/lat-{{00..01}}.tar"
    return ["source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out"]


def test_overwrite_deletes_only_what_the_pipeline_wrote(tmp_path, make_cfg, rerun_args):
    args = rerun_args
    out = tmp_path / "out"
    (out / "mine.parquet").write_bytes(b"a user's own file")
    (out / ".notes.tmp-1").write_bytes(b"not a temporary of ours")
    (out / "_shards" / "keep.txt").write_bytes(b"also mine")
    m = run(make_cfg(*args, "seed=7", "output.overwrite=true"))
    assert m["exit_code"] == 0
    assert (out / "mine.parquet").read_bytes() == b"a user's own file"
    assert (out / ".notes.tmp-1").exists() and (out / "_shards" / "keep.txt").exists()
    assert json.loads((out / MANIFEST).read_text())["config"]["seed"] == 7


def test_a_foreign_non_empty_directory_is_refused(tmp_path, make_cfg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(JobError, match=r"not empty and holds no manifest.*holiday\.jpg"):
        run(make_cfg(*_job(tmp_path)))
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]  # nothing written


def test_a_live_lease_refuses_a_second_driver_and_a_dead_one_is_taken_over(tmp_path, make_cfg):
    args = _job(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    live = {
        "token": "x",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "heartbeat": time.time(),
    }
    (out / LEASE).write_text(json.dumps(live))
    with pytest.raises(JobError, match="being written by another run"):
        run(make_cfg(*args))
    assert not (out / MANIFEST).exists()  # refused before looking at or writing anything
    # the same driver killed (its pid is gone): the re-run takes the lease over and resumes
    dead = {**live, "pid": 2**22 + 12345}
    (out / LEASE).write_text(json.dumps(dead))
    assert run(make_cfg(*args))["exit_code"] == 0
    assert not (out / LEASE).exists()  # released at the end
    # another host's lease: stale only after output.lease_timeout_s without a heartbeat
    other = {**live, "host": "elsewhere", "heartbeat": time.time() - 30}
    (out / LEASE).write_text(json.dumps(other))
    with pytest.raises(JobError, match="another run"):
        run(make_cfg(*args))
    assert run(make_cfg(*args, "output.lease_timeout_s=10"))["exit_code"] == 0


def test_a_marker_of_another_config_is_refused(tmp_path, make_cfg, rerun_args):
    args = rerun_args
    marker = tmp_path / "out" / "_shards" / "lat-00.json"
    body = json.loads(marker.read_text())
    marker.write_text(json.dumps({**body, "config_hash": "0123456789abcdef"}))
    with pytest.raises(JobError, match=r"lat-00\.json was committed by another config"):
        run(make_cfg(*args))


def test_same_shard_name_from_another_url_is_refused(tmp_path, make_cfg, committed, rerun_args):
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_array_shard(other / "lat-00.tar", 4, shape=(2, 4, 4), seed=9)
    urls = f"[{other}/lat-00.tar,{committed}/lat-01.tar]"
    with pytest.raises(JobError, match=r"shard lat-00 .* was made from .*mix two inputs"):
        run(make_cfg("source=arrays", f"source.urls={urls}", f"output.dir={tmp_path}/out"))


def test_changed_input_is_redone_and_said(tmp_path, make_cfg, caplog):
    args = _job(tmp_path)
    run(make_cfg(*args))
    write_array_shard(tmp_path / "lat-00.tar", 6, shape=(2, 4, 4), seed=5)  # new content
    m = run(make_cfg(*args))
    assert m["exit_code"] == 0 and m["shards"]["lat-00"]["records"] == 6
    assert pq.read_metadata(tmp_path / "out" / "lat-00.parquet").num_rows == 6
    assert "lat-00 is redone: its input" in caplog.text


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip", "rewrite", "old-marker"])
def test_a_missing_or_damaged_committed_file_is_rebuilt(
    tmp_path, make_cfg, damage, caplog, rerun_args
):
    """A flipped sign in one x_t value (same size, still valid Parquet) and a file rewritten by
    pyarrow fail the marker's checksum: rebuilt. A marker of an older version (no checksum)
    is checked by its size only, as before."""
    args = rerun_args
    path = tmp_path / "out" / "lat-01.parquet"
    good, table = path.read_bytes(), pq.read_table(path)
    marker = json.loads((tmp_path / "out" / "_shards" / "lat-01.json").read_text())
    assert marker["checksum"] == "sha256:" + hashlib.sha256(good).hexdigest()
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage in ("flip", "old-marker"):
        flip_an_x_t_sign(path)
        assert path.stat().st_size == len(good) and not pq.read_table(path).equals(table)
    else:
        pq.write_table(table, path, compression="snappy")
    if damage == "old-marker":
        out = OutputDir(str(tmp_path / "out"))
        del marker["checksum"]
        out.write_json(out.marker_name("lat-01"), marker)
        out.remove(MANIFEST)  # the index would hold the marker with its checksum
        run(make_cfg(*args, "output.overwrite=false"))
        assert path.read_bytes() != good  # size only: not seen
        return
    m = run(make_cfg(*args))
    assert m["exit_code"] == 0 and pq.read_table(path).equals(table)
    assert path.read_bytes() == good
    if damage in ("flip", "rewrite"):
        assert "lat-01 is redone: its file" in caplog.text


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        (MANIFEST, b"garbage{", r"_manifest\.json is not valid JSON"),
        (MANIFEST, b"[1, 2]", r"_manifest\.json is a JSON list"),
        ("_shards/lat-00.json", b"\x00\x01", r"lat-00\.json is not valid JSON"),
    ],
)
def test_damaged_pipeline_files_are_named(tmp_path, make_cfg, name, content, pattern, rerun_args):
    args = rerun_args
    (tmp_path / "out" / name).write_bytes(content)
    with pytest.raises(JobError, match=pattern):
        run(make_cfg(*args))


def test_float16_overflow_is_a_reject_naming_float32(tmp_path, make_cfg):
    big = np.full((2, 4, 4), 1e6, np.float32)  # finite, but above float16's 65504
    members = [(f"k{i}.npy", npy_bytes(np.zeros((2, 4, 4), np.float32) + i)) for i in range(3)]
    write_tar(tmp_path / "a.tar", [*members[:1], ("big.npy", npy_bytes(big)), *members[1:]])
    args = ["source=arrays", f"source.urls={tmp_path}/a.tar", f"output.dir={tmp_path}/out"]
    m = run(make_cfg(*args, "sampling.draws_per_sample=2"))
    assert m["exit_code"] == 0
    assert m["totals"] == {**m["totals"], "samples": 4, "records": 6, "rejected": 1}
    rej = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rej] == ["big"] and "output.dtype=float32" in rej[0]["reason"]
    table = pq.read_table(tmp_path / "out" / "a.parquet")
    assert "big" not in table.column("key").to_pylist()
    # float32 holds it
    m = run(
        make_cfg(
            *args,
            "sampling.draws_per_sample=2",
            "output.dtype=float32",
            f"output.dir={tmp_path}/out32",
        )
    )
    assert m["totals"]["records"] == 8 and m["totals"]["rejected"] == 0


def test_zero_records_written_is_exit_1(tmp_path, make_cfg):
    members = [(f"k{i}.npy", npy_bytes(np.full((2, 2), np.nan, np.float32))) for i in range(3)]
    write_tar(tmp_path / "a.tar", members)
    args = ["source=arrays", "source.shape=[2,2]", f"source.urls={tmp_path}/a.tar"]
    m = run(make_cfg(*args, f"output.dir={tmp_path}/o"))
    assert m["totals"]["records"] == 0 and m["exit_code"] == 1


def test_relative_output_dir_is_made_absolute_on_the_driver(tmp_path, make_cfg, monkeypatch):
    write_array_shard(tmp_path / "a.tar", 2, shape=(2, 2))
    monkeypatch.chdir(tmp_path)
    m = run(make_cfg("source=arrays", f"source.urls={tmp_path}/a.tar", "output.dir=rel/out"))
    assert m["exit_code"] == 0 and m["config"]["output"]["dir"] == str(tmp_path / "rel" / "out")


def test_non_finite_config_values_are_config_errors(tmp_path, make_cfg):
    for bad in ("source.scale=nan", "source.shift=inf"):
        with pytest.raises(
            ValueError, match=r"config key source\.(scale|shift): must be a finite number"
        ):
            run(make_cfg("source=arrays", "source.urls=x.tar", f"output.dir={tmp_path}/o", bad))


def test_markers_carry_the_config_hash_and_the_input_identity(tmp_path, make_cfg):
    args = _job(tmp_path, n_shards=1)
    m = run(make_cfg(*args))
    marker = OutputDir(str(tmp_path / "out")).read_json("_shards/lat-00.json")
    assert marker["config_hash"] == m["config_hash"]
    st = os.stat(tmp_path / "lat-00.tar")
    assert marker["source_identity"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def test_ids_read_back_from_disk_never_name_a_file_outside(tmp_path, make_cfg, rerun_args):
    """A crafted _manifest.json whose shard ids are ``../victim`` and an absolute path used to
    make output.overwrite=true delete those .parquet files outside output.dir."""
    args = rerun_args
    out = tmp_path / "out"
    (tmp_path / "victim.parquet").write_bytes(b"a user's file beside output.dir")
    (tmp_path / "elsewhere").mkdir()
    absolute = tmp_path / "elsewhere" / "victim2"
    (tmp_path / "elsewhere" / "victim2.parquet").write_bytes(b"a user's file elsewhere")
    manifest = json.loads((out / MANIFEST).read_text())
    for sid in ("../victim", str(absolute)):
        manifest["shards"][sid] = {"status": "ok", "records": 1}
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(JobError, match=r"_manifest.json names a shard '\.\./victim' that is no"):
        run(make_cfg(*args, "seed=7", "output.overwrite=true"))
    assert (tmp_path / "victim.parquet").read_bytes() == b"a user's file beside output.dir"
    assert (tmp_path / "elsewhere" / "victim2.parquet").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing
    # the same ids handed to the deletion itself (not read through read_manifest)
    o = OutputDir(str(out))
    with pytest.raises(CorruptFileError, match="no shard id"):
        resume.clear(o, manifest)
    # a marker named after no shard id, and names outside the directory, at the one deletion
    (out / "_shards" / "a b.json").write_text("{}")
    with pytest.raises(CorruptFileError, match=r"_shards/a b.json names a shard 'a b'"):
        o.own_names(None)
    for name in ("../victim.parquet", str(tmp_path / "victim.parquet"), "a/../../victim.parquet"):
        with pytest.raises(OutsideOutputError, match="does not resolve inside output.dir"):
            o.remove(name)
    (out / "link").symlink_to(tmp_path / "elsewhere")  # a directory link leading outside
    with pytest.raises(OutsideOutputError):
        o.remove("link/victim2.parquet")
    assert (tmp_path / "victim.parquet").exists() and (
        tmp_path / "elsewhere/victim2.parquet"
    ).exists()
    # file names read back from a marker: resume deletes them when the shard is redone
    (out / "_shards" / "a b.json").unlink()
    marker = json.loads((out / "_shards" / "lat-00.json").read_text())
    (out / "mine.parquet").write_bytes(b"a user's file in output.dir")
    for crafted in (
        {"file": "mine.parquet"},
        {"files": [{"name": "../victim.parquet", "bytes": 1}]},
        {"side_files": {"_text/other.parquet": {"bytes": 1}}},
    ):
        (out / "_shards" / "lat-00.json").write_text(json.dumps({**marker, **crafted}))
        with pytest.raises(CorruptFileError, match=r"_shards/lat-00\.json names a file '"):
            resume.committed_shards(o, {"lat-00": marker["url"]}, marker["config_hash"])
    assert (out / "mine.parquet").exists() and (out / "lat-00.parquet").exists()
    assert not any(map(is_shard_id, ["..", ".", "../x", "/x", "a/b", "x.", ""]))
    assert all(is_shard_id(shard_id(u)) for u in ["../..", "/x/.tar", "pipe:cat ../a b.tar", "."])
