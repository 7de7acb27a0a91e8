"""Aspect-ratio buckets end to end: one Parquet file per (shard, bucket), markers and manifest
listing them, an atomic commit per shard, resume and overwrite per shard, bit-identical records
across actor counts, batch sizes and reruns (random crop and flip), latents per bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures.pins import check_description_pin
from shards import encode_image, random_image, write_tar
from sources import source_group

from pipeline.output.manifest import MANIFEST, OutputDir, shard_files
from pipeline.output.records import file_shape
from pipeline.precompute import JobError, run
from pipeline.read.buckets import Grid
from pipeline.run.config import compose

pytestmark = pytest.mark.usefixtures("ray_session")

# (width, height): aspect 0.25 .. 4, each shard spread over several buckets
SIZES = [(40, 40), (80, 40), (40, 80), (160, 40), (40, 160), (60, 45), (45, 60), (100, 30)]
BUCKETS = ["source=images", "source.resolution=32", "source.buckets=auto", "source.bucket_step=16"]
# sha256 of the process description of each job's files and manifest (tests/fixtures/pins.py:
# tmp paths and the NumPy version normalised, with the VAE also its file hashes and so the
# config hash, each checked first; every other field as written), computed by the code at
# commit 098a8ff. A change to any field fails the test that pins it.
DESCRIPTION_PINS = {
    "buckets": "0996fd7513f0acc280bcf526413517e67de79b1aa1a41e3cb87052997ff2ce73",
    "vae-buckets": "d0c1ca241e3a4076f98c914994ca570b7e9f3da9aeaede3ed01330b3467c2296",
}


def bucket_shards(tmp_path, n_shards=2, n=12) -> str:
    """``n_shards`` shards of ``n`` noise images of the aspects in SIZES; returns the URL spec."""
    for s in range(n_shards):
        members = []
        for i in range(n):
            w, h = SIZES[(i + s) % len(SIZES)]
            img = random_image((w, h), seed=100 * s + i)
            members.append((f"s{s}k{i:04d}.png", encode_image(img, "png")))
        write_tar(tmp_path / f"b-{s}.tar", members)
    return f"source.urls={tmp_path}/b-{{0..{n_shards - 1}}}.tar"


def tables(out) -> dict:
    """file name -> table of every data file of ``out``."""
    return {p.name: pq.read_table(p) for p in sorted(out.glob("*.parquet"))}


def test_a_shard_is_one_file_per_bucket_listed_by_its_marker_and_the_manifest(tmp_path, make_cfg):
    urls = bucket_shards(tmp_path)
    m = run(make_cfg(urls, f"output.dir={tmp_path}/o", *BUCKETS, "sampling.draws_per_sample=2"))
    assert m["exit_code"] == 0
    check_description_pin(tmp_path / "o", DESCRIPTION_PINS["buckets"], {"tmp": tmp_path})
    out = OutputDir(str(tmp_path / "o"))
    grid = Grid.from_source(source_group("images", buckets="auto", resolution=32, bucket_step=16))
    listed = set()
    for sid in ("b-0", "b-1"):
        marker = out.read_json(out.marker_name(sid))
        files = shard_files(sid, marker)
        assert len(files) >= 3  # spread over buckets
        assert sum(f["records"] for f in files) == marker["records"] == 24
        assert sum(f["bytes"] for f in files) == marker["bytes"]
        for f in files:
            h, w = f["bucket"]
            assert f["name"] == f"{sid}.{h}x{w}.parquet" and (h, w) in grid.sizes
            assert out.checksum(f["name"]) == f["checksum"]
            table = pq.read_table(tmp_path / "o" / f["name"])
            assert table.num_rows == f["records"]
            assert file_shape(table.schema) == f["shape"] == [3, h, w]
            assert {tuple(v) for v in table.column("target_size").to_pylist()} == {(h, w)}
            listed.add(f["name"])
        assert m["shards"][sid]["files"] == marker["files"]
    assert listed == set(tables(tmp_path / "o"))  # no other data file
    table = {tuple(r["size"]): r for r in m["buckets"]}
    assert set(table) == set(grid.sizes)  # every configured bucket, used or not
    assert sum(r["records"] for r in table.values()) == m["totals"]["records"] == 48
    for (h, w), row in table.items():
        names = [n for n in listed if n.endswith(f".{h}x{w}.parquet")]
        assert row["files"] == len(names) and row["shape"] == [3, h, w]
        assert row["records"] == sum(pq.read_metadata(tmp_path / "o" / n).num_rows for n in names)
    largest = max(np.prod(r["shape"]) for r in m["buckets"])
    assert np.prod(m["process"]["shape"]) == largest == 3 * 32 * 32  # a largest bucket's
    assert [b["size"] for b in m["process"]["buckets"]] == [list(s) for s in grid.sizes]


def _digests(out) -> dict:
    return {name: t.to_pylist() for name, t in tables(out).items()}


def test_bucketed_records_are_bit_identical_across_actors_batch_sizes_and_reruns(
    tmp_path, make_cfg
):
    urls = bucket_shards(tmp_path, n_shards=3, n=10)
    common = [urls, *BUCKETS, "source.crop=random", "source.flip=random", "seed=11"]
    runs = {
        "a1-b1": ["ray.num_actors=1", "batch_size=1"],
        "a2-b4": ["ray.num_actors=2", "batch_size=4"],
        "a2-b4-again": ["ray.num_actors=2", "batch_size=4"],
        "a1-b64": ["ray.num_actors=1", "batch_size=64", "output.rows_per_group=3"],
    }
    got = {}
    for name, extra in runs.items():
        assert run(make_cfg(*common, f"output.dir={tmp_path}/{name}", *extra))["exit_code"] == 0
        got[name] = _digests(tmp_path / name)
    ref = got["a1-b1"]
    flips = [r["flipped"] for rows in ref.values() for r in rows]
    crops = [r["crop_top_left"] for rows in ref.values() for r in rows]
    assert 0 < sum(flips) < len(flips)  # random flips happened
    assert len({tuple(c) for c in crops}) > 2  # and random crops
    for name, digest in got.items():
        assert digest == ref, name
    for name in ("a2-b4", "a2-b4-again"):  # same row groups: the same bytes
        for f in ref:
            a = (tmp_path / "a1-b1" / f).read_bytes()
            assert (tmp_path / name / f).read_bytes() == a


def test_micro_conditioning_matches_the_decoded_images(tmp_path, make_cfg):
    urls = bucket_shards(tmp_path, n_shards=1, n=8)
    run(make_cfg(urls, f"output.dir={tmp_path}/o", *BUCKETS, "source.crop=random"))
    for name, t in tables(tmp_path / "o").items():
        for r in t.select(["key", "original_size", "crop_top_left", "target_size"]).to_pylist():
            i = int(r["key"][-4:])
            w, h = SIZES[i % len(SIZES)]
            assert r["original_size"] == [h, w]
            bh, bw = r["target_size"]
            assert name.endswith(f".{bh}x{bw}.parquet")
            scale = max(bh / h, bw / w)
            rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
            y, x = r["crop_top_left"]
            assert 0 <= y <= rh - bh and 0 <= x <= rw - bw


KILL = textwrap.dedent(
    """
    import os, sys
    from pipeline.run.config import compose
    from pipeline.output.manifest import OutputDir
    from pipeline.precompute import dataset_metadata, sample_shape
    from pipeline.run.config import actor_config, config_hash
    from pipeline.run.worker import ShardWorker

    cfg = compose(sys.argv[2:])
    url = sys.argv[1]
    renames = []
    real = OutputDir.commit

    def commit(self, tmp, name):  # the process dies right after its second bucket file
        real(self, tmp, name)
        if name.endswith(".parquet"):
            renames.append(name)
            if len(renames) == 2:
                os._exit(9)

    OutputDir.commit = commit
    meta = dataset_metadata(cfg, sample_shape(cfg, [url]), config_hash(cfg))
    OutputDir(cfg.output.dir).makedirs("_shards")
    ShardWorker(actor_config(cfg), meta).process(url)
    """
)


def test_a_shard_killed_between_two_bucket_files_is_never_trusted_and_is_redone(tmp_path, make_cfg):
    urls = bucket_shards(tmp_path, n_shards=2, n=12)
    args = [urls, *BUCKETS, "source.crop=random", "source.flip=random", "progress=false"]
    out = tmp_path / "o"
    # a first run commits both shards (the reference), then b-0 is redone by a worker killed
    # mid-commit
    assert run(make_cfg(*args, f"output.dir={out}"))["exit_code"] == 0
    assert len(list(out.glob("b-0.*.parquet"))) >= 3  # the killed shard has three buckets or more
    ref = _digests(out)
    (out / "_shards" / "b-0.json").unlink()
    for p in out.glob("b-0.*.parquet"):
        p.unlink()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", KILL, f"{tmp_path}/b-0.tar", *args, f"output.dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    placed = sorted(p.name for p in out.glob("b-0.*.parquet"))
    assert len(placed) == 2  # two of its bucket files are in place, the others not
    assert not (out / "_shards" / "b-0.json").exists()  # no marker: nothing of b-0 is trusted
    hidden = [p for p in out.iterdir() if p.name.startswith(".b-0.")]
    assert hidden  # temporaries of the bucket files not yet renamed
    # resume: b-1 stays, b-0 is redone; the result is the reference's, nothing else remains
    b1 = (out / "_shards" / "b-1.json").read_bytes()
    m = run(make_cfg(*args, f"output.dir={out}"))
    assert m["exit_code"] == 0 and m["shards"]["b-0"]["attempts"] == 1
    assert (out / "_shards" / "b-1.json").read_bytes() == b1
    assert _digests(out) == ref
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    names = {f["name"] for sid in ("b-0", "b-1") for f in m["shards"][sid]["files"]}
    assert names == set(tables(out))


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, ray_session):
    """The shards of :func:`bucket_shards` (2 x 12) and one clean run of them with BUCKETS,
    made once per module: the tests that damage the output or re-run into it start from a copy
    (:func:`copy_of_bucketed`)."""
    root = tmp_path_factory.mktemp("bucketed")
    urls = bucket_shards(root)
    cfg = compose(["progress=false", urls, f"output.dir={root}/o", *BUCKETS])
    assert run(cfg)["exit_code"] == 0
    return root, urls


def copy_of_bucketed(bucketed, tmp_path) -> list[str]:
    """A copy of the module's clean output in ``tmp_path/o``; the arguments of a re-run of its
    job (reading the module's shards, which no test changes)."""
    root, urls = bucketed
    shutil.copytree(root / "o", tmp_path / "o")
    return [urls, f"output.dir={tmp_path}/o", *BUCKETS]


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_resume_redoes_a_shard_one_of_whose_bucket_files_changed(
    tmp_path, make_cfg, damage, caplog, bucketed
):
    args = copy_of_bucketed(bucketed, tmp_path)
    before = _digests(tmp_path / "o")
    marker = json.loads((tmp_path / "o" / "_shards" / "b-1.json").read_text())
    victim = tmp_path / "o" / marker["files"][-1]["name"]
    if damage == "delete":
        victim.unlink()
    else:
        from shards import flip_an_x_t_sign

        flip_an_x_t_sign(victim)
    b0 = (tmp_path / "o" / "_shards" / "b-0.json").read_bytes()
    with caplog.at_level("WARNING", logger="pipeline.output.resume"):
        m = run(make_cfg(*args))
    assert m["exit_code"] == 0
    assert f"shard b-1 is redone: its file {victim}" in caplog.text
    assert (tmp_path / "o" / "_shards" / "b-0.json").read_bytes() == b0  # not redone
    assert _digests(tmp_path / "o") == before


def test_overwrite_deletes_the_bucket_files_and_keeps_foreign_ones(tmp_path, make_cfg, bucketed):
    args = copy_of_bucketed(bucketed, tmp_path)
    foreign = tmp_path / "o" / "mine.64x64.parquet"
    foreign.write_bytes(b"a user's file")
    assert len(list((tmp_path / "o").glob("b-*.parquet"))) > 3
    m = run(make_cfg(*args, "source.bucket_step=32", "output.overwrite=true"))
    assert m["exit_code"] == 0
    assert foreign.read_bytes() == b"a user's file"
    now = {p.name for p in (tmp_path / "o").glob("*.parquet")} - {foreign.name}
    assert now == {"b-0.32x32.parquet", "b-1.32x32.parquet"}  # step 32 at 32: the square only
    assert json.loads((tmp_path / "o" / MANIFEST).read_text())["totals"]["records"] == 24


def test_buckets_null_keeps_one_file_per_shard_and_no_bucket_columns(tmp_path, make_cfg):
    urls = bucket_shards(tmp_path, n_shards=1, n=4)
    m = run(make_cfg(urls, f"output.dir={tmp_path}/o", "source=images", "source.resolution=16"))
    assert sorted(tables(tmp_path / "o")) == ["b-0.parquet"]
    marker = m["shards"]["b-0"]
    assert "files" not in marker and marker["file"] == "b-0.parquet" and "buckets" not in m
    schema = pq.read_schema(tmp_path / "o" / "b-0.parquet")
    assert "target_size" not in schema.names and "buckets" not in m["process"]


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    import torch

    from jobs.bench.encoder import TINY, TINY_F8

    out = {}
    for name, config in (("f2", TINY), ("f8", TINY_F8)):
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp("models") / name
        diffusers.AutoencoderKL(**config).save_pretrained(folder, safe_serialization=True)
        out[name] = folder
    return out


def test_vae_latents_have_each_buckets_shape(tmp_path, make_cfg, vae_dirs):
    urls = bucket_shards(tmp_path, n_shards=1, n=8)
    vae = ["encoder=vae", f"encoder.model={vae_dirs['f2']}", "encoder.batch_size=2"]
    cfg = make_cfg(urls, f"output.dir={tmp_path}/o", *BUCKETS, *vae)
    m = run(cfg)
    assert m["exit_code"] == 0
    roots = {"tmp": tmp_path, "vae": vae_dirs["f2"]}
    check_description_pin(tmp_path / "o", DESCRIPTION_PINS["vae-buckets"], roots, cfg)
    for f in m["shards"]["b-0"]["files"]:
        h, w = f["bucket"]
        assert f["shape"] == [4, h // 2, w // 2]
        t = pq.read_table(tmp_path / "o" / f["name"])
        assert file_shape(t.schema) == [4, h // 2, w // 2]
        x = t.column("x_t").combine_chunks().to_numpy_ndarray()
        assert x.shape[1:] == (4, h // 2, w // 2) and np.isfinite(x).all()
    assert np.prod(m["process"]["shape"]) == 4 * 16 * 16
    assert {tuple(b["shape"]) for b in m["buckets"]} == {
        (4, h // 2, w // 2) for h, w in [b["size"] for b in m["buckets"]]
    }


def test_a_step_that_cuts_latent_cells_is_refused_naming_the_key(tmp_path, make_cfg, vae_dirs):
    urls = bucket_shards(tmp_path, n_shards=1, n=2)
    vae = ["encoder=vae", f"encoder.model={vae_dirs['f8']}"]
    args = [urls, f"output.dir={tmp_path}/o", *BUCKETS, *vae]
    with pytest.raises(JobError, match=r"source.bucket_step: .*not multiples of the encoder's "
                       r"8-pixel latent cell"):  # fmt: skip
        run(make_cfg(*args, "source.bucket_step=4"))
    with pytest.raises(JobError, match=r"source.buckets: buckets \[\[20, 40\]\]"):
        run(make_cfg(*args, "source.buckets=[[32,32],[20,40]]"))
    assert not list((tmp_path / "o").glob("*.parquet"))
