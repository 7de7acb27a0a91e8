"""The typed contracts across processes (pipeline/output/contracts.py): commit markers round-trip
through JSON, markers of every earlier format still read, and a worker's result names its files."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.output.contracts import MARKER_FORMAT, CommitMarker, DataFile, ShardResult

OLD = {  # a marker as written before checksums (and before the format field)
    "url": "/in/a-0.tar", "file": "a-0.parquet", "status": "ok", "samples": 5, "records": 10,
    "rejected": 1, "error": None, "seconds": 0.5, "worker": {"pid": 1}, "config_hash": "h",
    "source_identity": [10, 2.0], "library_version": "0.1", "bytes": 1234,
}  # fmt: skip


def test_an_old_marker_reads_as_format_1_and_writes_back_what_it_held():
    m = CommitMarker.from_json(OLD)
    assert (m.format, m.status, m.checksum, m.bytes, m.files) == (1, "ok", None, 1234, None)
    assert m.data_files("a-0") == [DataFile("a-0.parquet", 10, 1234, None)]
    assert m.to_json() == {"format": 1, **OLD}
    older = CommitMarker.from_json({k: v for k, v in OLD.items() if k not in ("file", "bytes")})
    assert older.data_files("a-0") == [DataFile("a-0.parquet", 10, None, None)]  # by row count


def test_a_bucketed_marker_round_trips_and_keeps_unknown_fields():
    files = [
        {"name": "b.8x16.parquet", "bucket": [8, 16], "shape": [4, 1, 2], "records": 4,
         "bytes": 100, "checksum": "sha256:aa"},
        {"name": "b.16x8.parquet", "bucket": [16, 8], "shape": [4, 2, 1], "records": 6,
         "bytes": 120, "checksum": "sha256:bb"},
    ]  # fmt: skip
    d = {**OLD, "format": MARKER_FORMAT, "files": files, "bytes": 220, "future": {"x": 1}}
    del d["file"]
    m = CommitMarker.from_json(json.loads(json.dumps(d)))
    assert [f.bucket for f in m.data_files("b")] == [[8, 16], [16, 8]]
    assert m.extra == {"future": {"x": 1}}
    assert m.to_json() == d and CommitMarker.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    "bad, said",
    [
        ({"files": "a.parquet"}, "its 'files' a.parquet is not a list of entries with a 'name'"),
        ({"files": [{"bytes": 3}]}, "is not a list of entries with a 'name'"),
        ({"side_files": ["_text/a.parquet"]}, "its 'side_files'"),
        ({"format": "two"}, "its 'format' 'two' is not a version number"),
    ],
)
def test_json_without_a_markers_shape_is_refused_saying_what_is_wrong(bad, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        CommitMarker.from_json({**OLD, **bad})


def test_the_attested_part_keeps_what_the_files_are_checked_against():
    d = {**OLD, "checksum": "sha256:dd", "side_files": {"_text/a-0.parquet": {"bytes": 1}},
         "text": {"captions": 5}, "future": 1}  # fmt: skip
    m = CommitMarker.from_json(d)
    a = m.attested()
    assert (a.status, a.records, a.config_hash, a.side_files) == ("ok", 10, "h", d["side_files"])
    assert a.data_files("a-0") == m.data_files("a-0")
    assert (a.url, a.worker, a.source_identity, a.text, a.extra) == (None, None, None, None, {})


def test_a_new_marker_omits_what_it_does_not_have():
    m = CommitMarker(url="u", status="partial", samples=3, records=3, file="s.parquet", bytes=9,
                     checksum="sha256:cc", error="truncated")  # fmt: skip
    j = m.to_json()
    assert j["format"] == MARKER_FORMAT and j["error"] == "truncated"
    assert not {"files", "side_files", "text"} & set(j)
    assert CommitMarker.from_json(j) == m


def test_a_results_temporaries_are_its_data_and_side_files():
    r = ShardResult("u", "s", files=[DataFile("s.parquet", 3, tmp="s.parquet.tmp-1")],
                    side_files=[("_text/s.parquet.tmp-2", "_text/s.parquet")])  # fmt: skip
    assert r.temporaries() == ["s.parquet.tmp-1", "_text/s.parquet.tmp-2"]
