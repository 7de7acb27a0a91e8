"""The validator on a bucketed dataset (one file per shard and bucket): every check passes on a
clean one, per-pixel identities hold in every bucket, completeness counts a shard's records
across its bucket files, and the ``buckets`` check catches a target_size that is not a bucket
and a crop offset outside the image; the report has the bucket histogram as a table and a plot."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.pins import check_description_pin
from test_bucket_output import BUCKETS, bucket_shards

from pipeline import validate
from pipeline.output.manifest import OutputDir
from pipeline.precompute import run
from pipeline.run.config import compose

pytestmark = pytest.mark.usefixtures("ray_session")
# sha256 of the process description of each job's files and manifest (tests/fixtures/pins.py:
# tmp paths and the NumPy version normalised, with text also the tiny CLIP's file hashes and so
# the config hash, each checked first; every other field as written), computed by the code at
# commit 098a8ff. A change to any field fails the test that pins it.
DESCRIPTION_PINS = {
    "clean": "f306d8fbc15fda1228916713d48779a59745fe1fdbb64aac9e442a8d6bbb2602",
    "text-buckets": "1dacf34043436fdd475fbf68b19fe847b19bc76b07dd90d6376f20df6a708dd9",
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """3 shards x 16 images of aspects 0.25..4, K=2, x_0 stored, random crop and flip."""
    tmp = tmp_path_factory.mktemp("vb")
    urls = bucket_shards(tmp, n_shards=3, n=16)
    cfg = compose(["progress=false", urls, f"output.dir={tmp}/o", *BUCKETS, "source.flip=random",
                   "source.crop=random", "sampling.draws_per_sample=2", "output.store_x0=true",
                   "schedule.num_timesteps=100"])  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    return tmp / "o"


def _validate(path, *overrides):
    cfg = validate.load_config([f"output.dir={path}", "progress=false", "plots=false", *overrides])
    report = validate.run(cfg)
    return report, {c["name"]: c for c in report["checks"]}


def test_a_clean_bucketed_dataset_passes_every_check(clean, tmp_path):
    check_description_pin(clean, DESCRIPTION_PINS["clean"], {"tmp": clean.parent})
    report, checks = _validate(clean, "plots=true", f"output.report_dir={tmp_path}/rep")
    failed = {n: c["summary"] for n, c in checks.items() if not c["passed"]}
    assert not failed and report["exit_code"] == 0
    b = checks["buckets"]
    assert b["severity"] == "info"
    hist = {h["bucket"]: h["records"] for h in b["detail"]["histogram"]}
    assert sum(hist.values()) == report["summary"]["records"] == 96
    assert len([n for n in hist.values() if n]) >= 3
    assert b["detail"]["flip"]["samples"] == 48
    # completeness counted each shard's rows across its bucket files
    assert checks["completeness"]["statistic"] == 0
    # every record's x_t recomputed from its x_0 and eps, in every bucket
    rc = checks["record_consistency"]
    assert rc["passed"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| bucket (H x W) | records | share |" in md
    assert "hist_buckets.png" in report["plots"]


def _plant(src, dst, column, value):
    """A copy of ``src`` where the first record of the first 32x32 file has ``column`` =
    ``value``, re-committed (its marker's size and checksum updated)."""
    shutil.copytree(src, dst)
    out = OutputDir(str(dst))
    name = sorted(p.name for p in dst.glob("*.32x32.parquet"))[0]
    table = pq.read_table(dst / name)
    col = table[column].to_pylist()
    col[0] = value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(col, table.schema.field(i).type))
    pq.write_table(table, dst / name)
    shard = name.split(".")[0]
    marker = out.read_json(out.marker_name(shard))
    for f in marker["files"]:
        if f["name"] == name:
            f.update(bytes=out.size(name), checksum=out.checksum(name))
    out.write_json(out.marker_name(shard), marker)
    manifest = json.loads((dst / "_manifest.json").read_text())
    manifest["shards"][shard]["files"] = marker["files"]
    (dst / "_manifest.json").write_text(json.dumps(manifest))
    return name


def test_the_buckets_check_catches_a_target_size_that_is_no_bucket(clean, tmp_path):
    name = _plant(clean, tmp_path / "d", "target_size", [24, 40])
    _, checks = _validate(tmp_path / "d")
    b = checks["buckets"]
    assert not b["passed"]
    bad = {i["quantity"]: i for i in b["detail"]["items"] if not i["passed"]}
    assert bad["target_size not a configured bucket"]["value"] == 1
    assert "target_size [24, 40]" in bad["target_size not a configured bucket"]["examples"][0]
    assert "record in the file of another bucket" not in bad  # unknown bucket: not counted twice
    assert checks["completeness"]["passed"], name  # re-committed: only the defect is wrong


def test_the_buckets_check_catches_a_crop_offset_outside_the_image(clean, tmp_path):
    _plant(clean, tmp_path / "d", "crop_top_left", [0, 500])
    _, checks = _validate(tmp_path / "d")
    bad = {i["quantity"]: i for i in checks["buckets"]["detail"]["items"] if not i["passed"]}
    assert set(bad) == {"crop outside the resized image"}
    assert "crop_top_left [0, 500]" in bad["crop outside the resized image"]["examples"][0]


def test_completeness_names_a_missing_and_a_stray_bucket_file(clean, tmp_path):
    d = shutil.copytree(clean, tmp_path / "d")
    marker = json.loads((d / "_shards" / "b-1.json").read_text())
    gone = marker["files"][0]["name"]
    (d / gone).unlink()
    (d / "b-2.640x16.parquet").write_bytes((d / marker["files"][1]["name"]).read_bytes())
    _, checks = _validate(d)
    c = checks["completeness"]
    bad = {i["quantity"]: i for i in c["detail"]["items"] if not i["passed"]}
    assert any(gone in e for e in bad["missing files"]["examples"])
    assert any("b-2.640x16.parquet" in e for e in bad["files not in the manifest"]["examples"])


def test_text_embeddings_with_buckets_validate_and_load_by_shard(tmp_path):
    """Captions with buckets: the text check reads a shard's records across its bucket files,
    and the loader joins each bucket file's records to its shard's text table."""
    from shards import encode_image, random_image, write_tar
    from test_bucket_output import SIZES

    from jobs.bench.textmodels import make_clip
    from pipeline.consume.dataset import PrecomputedDataset

    clip = make_clip(tmp_path / "clip")
    members = []
    for i in range(10):
        w, h = SIZES[i % len(SIZES)]
        members.append((f"t{i:03d}.png", encode_image(random_image((w, h), seed=i), "png")))
        members.append((f"t{i:03d}.txt", f"a photo number {i % 3}".encode()))
    write_tar(tmp_path / "c-0.tar", members)
    cfg = compose(["progress=false", f"source.urls={tmp_path}/c-0.tar", f"output.dir={tmp_path}/o",
                   *BUCKETS, "text=clip", f"text.model={clip}", "text.encoders.0.max_length=16",
                   "ray.num_actors=1"])  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    assert len(list((tmp_path / "o").glob("c-0.*x*.parquet"))) >= 3
    check_description_pin(tmp_path / "o", DESCRIPTION_PINS["text-buckets"], {"tmp": tmp_path}, cfg)
    report, checks = _validate(tmp_path / "o")
    assert checks["text"]["passed"] and checks["buckets"]["passed"], checks["text"]["summary"]
    ds = PrecomputedDataset(tmp_path / "o", columns=["key", "txt", "clip_pooled"], shuffle=False)
    pooled = {}
    for r in ds:
        pooled.setdefault(r["txt"], []).append(r["clip_pooled"])
    assert len(pooled) == 3 and sum(map(len, pooled.values())) == 10
    for same in pooled.values():  # one caption, one embedding, whatever the bucket
        assert all(torch_equal(same[0], x) for x in same)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_positional_statistics_take_the_most_populated_bucket():
    """The metadata's shape is the largest configured bucket, which may hold no record: the
    statistics per position take the shape of the bucket with the most records."""
    from pipeline.validate.driver import positional

    process = {"shape": [4, 48, 12], "dtype": "float16"}
    rows = [
        {"size": [96, 24], "shape": [4, 48, 12], "records": 0, "files": 0},
        {"size": [64, 32], "shape": [4, 32, 16], "records": 20, "files": 2},
        {"size": [48, 48], "shape": [4, 24, 24], "records": 30, "files": 3},
        {"size": [32, 64], "shape": [4, 16, 32], "records": 30, "files": 3},
    ]
    assert positional({"process": process, "buckets": rows}) == [4, 24, 24]
    assert positional({"process": process}) is None  # not bucketed, or no final table


def test_the_shared_noise_test_runs_on_a_bucketed_dataset(clean):
    report, checks = _validate(clean)
    notes = " ".join(checks["noise_independence"].get("notes") or [])
    assert "NOT tested" not in notes
    shape = report["summary"]["shape"]
    table = json.loads((clean / "_manifest.json").read_text())["buckets"]
    assert shape == max(table, key=lambda r: r["records"])["shape"]


def dying_b1_scan(out, shard, plan):
    """executor.scan_task, except that the scan of shard b-1 kills its process."""
    import os

    from pipeline.validate.scan import scan_shard

    if shard == "b-1":
        os._exit(9)
    return scan_shard(out, shard, plan)


def test_a_dead_scan_of_a_bucketed_shard_names_the_files_it_wrote(clean, monkeypatch):
    """A shard whose scan process dies (twice: then it counts as unreadable) is reported by the
    files the shard wrote, one per bucket (``b-1.{HxW,...}.parquet``), not by a
    ``b-1.parquet`` that a bucketed shard never has."""
    from pipeline.validate import executor

    monkeypatch.setattr(executor, "scan_task", dying_b1_scan)
    _, checks = _validate(clean, "executor=local", "workers=1")
    c = checks["completeness"]
    bad = {i["quantity"]: i for i in c["detail"]["items"] if not i["passed"]}
    assert set(bad) == {"unreadable files"}
    (example,) = bad["unreadable files"]["examples"]
    files = [f["name"] for f in json.loads((clean / "_shards" / "b-1.json").read_text())["files"]]
    assert len(files) >= 2 and not (clean / "b-1.parquet").exists()
    buckets = ",".join(sorted(name.split(".")[1] for name in files))  # b-1.<H>x<W>.parquet
    assert example.startswith(f"{clean}/b-1.{{{buckets}}}.parquet: ")
    assert "process died" in example
