"""End to end: hostile shards through precompute and the validator's completeness check.

Every input sample ends up as records or as a rejects.jsonl line with a key, so the manifest's
samples = records / draws + rejected and the validator's completeness check passes.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from shards import npy_bytes, write_tar

from pipeline import validate
from pipeline.precompute import run

pytestmark = pytest.mark.usefixtures("ray_session")


def _member(name: str, data: bytes = b"", **attrs) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    for key, value in attrs.items():
        setattr(info, key, value)
    pad = bytes(-len(data) % 512) if info.isreg() else b""
    block = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return block + (data + pad if info.isreg() else b"")


def _precompute(make_cfg, tmp_path, urls: str) -> tuple[dict, list[dict]]:
    manifest = run(
        make_cfg(
            "source=arrays",
            f"source.urls={urls}",
            f"output.dir={tmp_path}/out",
            "source.shape=[2,3]",
            "sampling.draws_per_sample=2",
        )
    )
    lines = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    return manifest, [json.loads(line) for line in lines]


def _completeness(tmp_path) -> dict:
    cfg = validate.load_config(
        [f"output.dir={tmp_path}/out", "progress=false", "plots=false", "max_consistency_records=0"]
    )
    report = validate.run(cfg)
    return {c["name"]: c for c in report["checks"]}["completeness"]


def _good(value: float) -> bytes:
    return npy_bytes(np.full((2, 3), value, np.float32))


def test_stray_member_is_counted_as_a_rejected_sample(tmp_path, make_cfg):
    """A README in a shard was counted as a sample but not as a reject: precompute exited 0 and
    the validator's completeness check then failed (samples != records / K + rejected)."""
    members = [("a.npy", _good(1)), ("README", b"about this shard"), ("b.npy", _good(2))]
    write_tar(tmp_path / "s-00.tar", members)
    manifest, rejects = _precompute(make_cfg, tmp_path, f"{tmp_path}/s-00.tar")
    assert manifest["exit_code"] == 0
    entry = manifest["shards"]["s-00"]
    assert (entry["samples"], entry["records"], entry["rejected"]) == (3, 4, 1)
    assert [(r["key"], r["index"]) for r in rejects] == [("README", 1)]
    check = _completeness(tmp_path)
    assert check["passed"], check


def test_hostile_shard_keeps_its_good_samples_and_reconciles(tmp_path, make_cfg):
    """One shard with a member of each hostile kind: only the good samples become records, every
    other sample is a keyed reject, and the shard is committed (a non-UTF-8 name used to fail the
    whole shard in the worker, with UnicodeEncodeError when its key was hashed)."""
    bad_name = b"\xff\xfe.npy".decode("utf-8", "surrogateescape")
    path = tmp_path / "h-00.tar"
    path.write_bytes(
        b"".join(
            [
                _member("a.npy", _good(1)),
                _member("README"),
                _member(bad_name, _good(2)),
                _member("c.npy", type=tarfile.LNKTYPE, linkname="a.npy"),
                _member("d.npy", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                _member("a/" * 50_000 + "e.npy", _good(3)),
                _member("f.npy", npy_bytes(np.zeros((2, 0), np.float32))),
                _member("g.npy", _good(4)),
                bytes(1024),
            ]
        )
    )
    manifest, rejects = _precompute(make_cfg, tmp_path, str(path))
    assert manifest["exit_code"] == 0
    entry = manifest["shards"]["h-00"]
    assert entry["status"] == "ok"
    assert (entry["samples"], entry["records"], entry["rejected"]) == (8, 4, 6)
    assert [r["index"] for r in rejects] == [1, 2, 3, 4, 5, 6]
    keys = [r["key"] for r in rejects]
    assert keys[:4] == ["README", "\\xff\\xfe", "c", "d"] and keys[5] == "f"
    assert keys[4].startswith("a/a/") and len(keys[4]) == 203
    reasons = [r["reason"] for r in rejects]
    assert "no extension" in reasons[0] and "not valid UTF-8" in reasons[1]
    assert "hard link" in reasons[2] and "symbolic link" in reasons[3]
    assert "max_name_bytes" in reasons[4] and "zero-size dimension" in reasons[5]
    check = _completeness(tmp_path)
    assert check["passed"], check
