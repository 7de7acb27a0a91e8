"""The driver at many shards (issue "The driver at 100,000 shards"): the periodic manifest does
not grow with the committed shards, resume reads an index and a few listings instead of one
marker and one stat per shard, input identities come from one listing per directory."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline import fs
from pipeline.output import resume
from pipeline.output.contracts import CommitMarker
from pipeline.output.description import ProcessMetadata
from pipeline.output.manifest import MANIFEST, SEGMENT, OutputDir
from pipeline.precompute import JobState, ShardTask

CHASH = "feedfacecafebeef"


class _Lease:
    def refresh(self) -> None:
        pass


def _summary(url: str, nbytes: int, **extra) -> dict:
    return {
        "url": url,
        "status": "ok",
        "samples": 1,
        "records": 1,
        "rejected": 0,
        "bytes": nbytes,
        "seconds": 0.01,
        "config_hash": CHASH,
        "source_identity": fs.identity(url),
        **extra,
    }


def _job(make_cfg, out: OutputDir, n: int, committed: int) -> JobState:
    cfg = make_cfg("source=arrays", "source.urls=x.tar", f"output.dir={out.root}")
    shards = [ShardTask(f"/in/s{i:06d}.tar", f"s{i:06d}") for i in range(n)]
    summaries = {s.id: CommitMarker.from_json(_summary(s.url, 100)) for s in shards[:committed]}
    meta = ProcessMetadata(schedule={}, noise={}, dtype="float16", shape=[1], config_hash=CHASH)
    return JobState(cfg, out, _Lease(), meta, shards, summaries)


def test_periodic_manifest_size_does_not_grow_with_committed_shards(tmp_path, make_cfg):
    sizes = {}
    for committed in (10, 2000):
        out = OutputDir(str(tmp_path / f"o{committed}"))
        out.makedirs("_shards")
        job = _job(make_cfg, out, committed + 5, committed)
        for s in list(job.open.values())[:3]:  # attempted, not committed: listed
            s.attempts = 1
        job.write_manifest(final=False)
        m = out.read_json(MANIFEST)
        sizes[committed] = len(out.read_bytes(MANIFEST))
        assert sorted(m["shards"]) == [s.id for s in job.shards[committed : committed + 3]]
        assert m["totals"]["ok"] == committed and m["totals"]["pending"] == 5
        assert m["totals"]["records"] == committed and m["shards_scope"] == "uncommitted"
    assert abs(sizes[2000] - sizes[10]) < 200, sizes  # a few digits more in the totals


def test_segments_hold_new_markers_and_the_final_manifest_compacts_them(tmp_path, make_cfg):
    out = OutputDir(str(tmp_path / "o"))
    out.makedirs("_shards")
    job = _job(make_cfg, out, 6, 2)
    job.write_manifest(final=False)  # first segment: the 2 resumed markers
    job.write_manifest(final=False)  # nothing new: no segment
    time.sleep(0.01)
    for s in job.shards[2:5]:
        s.attempts = 1
        job.committed(s, CommitMarker.from_json(_summary(s.url, 100)))
    job.write_manifest(final=False)
    segs = sorted(n for n in out.list("_shards") if SEGMENT.match(os.path.basename(n)))
    assert [len(out.read_jsonl(n)) for n in segs] == [2, 3]
    final = job.write_manifest(final=True)
    assert not any(SEGMENT.match(os.path.basename(n)) for n in out.list("_shards"))
    assert len(final["shards"]) == 6 and final["shards"]["s000005"]["status"] == "failed"
    assert final["totals"]["ok"] == 5 and final["shards_scope"] == "all"


def _committed_dir(tmp_path, n: int) -> tuple[OutputDir, dict, dict]:
    """An output dir of n committed shards as a finished run leaves it (inputs, files, markers
    older than the final manifest); returns it, the manifest and shard id -> URL."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = OutputDir(str(tmp_path / "out"))
    out.makedirs("_shards")
    urls, entries = {}, {}
    past = time.time_ns() - 10**10
    for i in range(n):
        sid = f"s{i:05d}"
        url = str(inputs / f"{sid}.tar")
        with open(url, "wb") as f:
            f.write(b"x" * (10 + i))
        out.write_bytes(out.data_name(sid), b"p" * (20 + i))
        summary = _summary(url, 20 + i)
        out.write_json(out.marker_name(sid), summary)
        out.write_bytes(out.rejects_name(sid), b"")
        os.utime(out.path(out.marker_name(sid)), ns=(past, past))
        urls[sid], entries[sid] = url, {**summary, "attempts": 1}
    manifest = {"format": "ddpm-manifest/1", "complete": True, "shards": entries}
    out.write_json(MANIFEST, manifest)
    return out, manifest, urls


class _Calls:
    """Counts reads, listings, stats and input stats made through OutputDir and pipeline.fs."""

    def __init__(self, monkeypatch):
        self.n = {"read": 0, "list": 0, "stat": 0, "input_stat": 0}

        def counted(kind, fn):
            def wrapper(*a, **k):
                self.n[kind] += 1
                return fn(*a, **k)

            return wrapper

        for name, kind in (
            ("read_bytes", "read"),
            ("list_info", "list"),
            ("list", "list"),
            ("exists", "stat"),
            ("size", "stat"),
        ):
            monkeypatch.setattr(OutputDir, name, counted(kind, getattr(OutputDir, name)))
        monkeypatch.setattr(fs, "identity", counted("input_stat", fs.identity))


@pytest.mark.parametrize("n", [3, 60])
def test_resume_with_a_current_index_makes_a_constant_number_of_requests(tmp_path, monkeypatch, n):
    out, manifest, urls = _committed_dir(tmp_path, n)
    calls = _Calls(monkeypatch)
    kept = resume.committed_shards(out, urls, CHASH, manifest)
    assert sorted(kept) == sorted(urls)
    assert out.marker_reads == 0
    # one listing of _shards/, one of the output dir (the inputs' directory is listed by pyarrow
    # in pipeline.fs.identities, never one stat per input)
    assert calls.n == {"read": 0, "list": 2, "stat": 0, "input_stat": 0}


def test_resume_reads_only_markers_newer_than_the_index(tmp_path, monkeypatch):
    out, manifest, urls = _committed_dir(tmp_path, 10)
    body = out.read_json(out.marker_name("s00003"))
    out.write_json(out.marker_name("s00003"), {**body, "records": 1})  # rewritten since: newer
    calls = _Calls(monkeypatch)
    assert len(resume.committed_shards(out, urls, CHASH, manifest)) == 10
    assert out.marker_reads == 1 and calls.n["read"] == 1
    out.write_json(out.marker_name("s00004"), {**body, "config_hash": "0123456789abcdef"})
    with pytest.raises(resume.OutputRefused, match=r"s00004\.json was committed by another"):
        resume.committed_shards(out, urls, CHASH, manifest)


def test_resume_redoes_a_file_whose_size_differs_from_its_marker(tmp_path, caplog):
    out, manifest, urls = _committed_dir(tmp_path, 4)
    out.write_bytes(out.data_name("s00001"), b"p" * 5)  # truncated
    out.remove(out.data_name("s00002"))
    with open(urls["s00003"], "ab") as f:  # the input changed
        f.write(b"more")
    kept = resume.committed_shards(out, urls, CHASH, manifest)
    assert sorted(kept) == ["s00000"]
    assert "has 5 bytes, its marker says 21" in caplog.text and "s00002.parquet is missing" in (
        caplog.text
    )
    assert "s00003 is redone: its input" in caplog.text
    assert not out.exists(out.marker_name("s00001"))


def test_identities_list_each_directory_once_and_stat_what_cannot_be_listed(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"a{i}.tar").write_bytes(b"x" * i)
    urls = [str(tmp_path / f"a{i}.tar") for i in range(3)]
    want = {u: fs.identity(u) for u in urls}
    calls = _Calls(monkeypatch)
    got = fs.identities([*urls, "pipe:cat x.tar", str(tmp_path / "gone.tar")])
    assert {u: got[u] for u in urls} == want
    assert got["pipe:cat x.tar"] is None and got[str(tmp_path / "gone.tar")] is None
    assert calls.n["input_stat"] == 2  # the pipe: URL and the file the listing did not show
    assert json.dumps(got)  # plain values, as the markers record them


def test_the_manifest_is_json_with_a_shard_per_line():
    """The manifest's encoding: valid JSON equal to the object, keys sorted, two levels
    indented and each shard entry on its own line (greppable; json's C encoder writes it)."""
    entry = {"status": "ok", "records": 2, "source_identity": {"size": 1, "mtime": 2.5}}
    m = {"format": 2, "shards": {"b": entry, "a": {**entry, "records": 4}}, "x": [], "y": {}}
    text = OutputDir.encode_json(m).decode()
    assert json.loads(text) == m and text.endswith("}\n")
    lines = text.splitlines()
    assert lines[0] == "{" and lines[1] == '  "format": 2,'
    shard_lines = [ln for ln in lines if ln.startswith('    "')]
    assert [json.loads("{" + ln.rstrip(",") + "}") for ln in shard_lines] == [
        {"a": {**entry, "records": 4}},
        {"b": entry},
    ]
    assert OutputDir.encode_json({}) == b"{}\n"
