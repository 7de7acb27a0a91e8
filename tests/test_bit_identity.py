"""Records stay bit-identical across refactors and optimisations.

``JOBS`` pins two digests per job: ``columns`` over the forward-process columns (computed by the
code at commit edee8eb, for the first three jobs), and ``full`` over every column of every file
in schema order (names, Arrow types, values; conditioning included) and the sorted
``rejects.jsonl`` rows (computed by the code at commit a4c0f62). Any change to a record, a column's
type, the column order or a reject, for the same config and input, fails here."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards import encode_image, random_image, write_array_shard, write_image_shard, write_tar

from pipeline.precompute import run

pytestmark = pytest.mark.usefixtures("ray_session")

COLUMNS = ("key", "index", "draw", "t", "x_t", "epsilon", "posterior_mean",
           "posterior_variance", "posterior_log_variance", "alpha_bar")  # fmt: skip
VAE = ["encoder=vae", "source.resolution=8", "encoder.batch_size=4"]  # + encoder.model=<tiny VAE>
JOBS = {
    "arrays-f16": (
        ["source=arrays", "lat-{0..1}", "seed=5", "sampling.draws_per_sample=2",
         "schedule=cosine", "schedule.num_timesteps=100"],
        "38114e71c217dd94affe6bf03b015183b4bc1af88a1985ceac40aad036f3a194",
        "4d4e766774fcd3d1a61ad4131bae8931081227e7f4250f3318f08c62aab93a97",
    ),
    "arrays-f32": (
        ["source=arrays", "lat-{0..1}", "seed=9", "output.dtype=float32",
         "sampling.timesteps=stratified"],
        "6c6055d2d4406ca22697d1fc79fc221df2dcea958a71f263ad2f7786b37ce883",
        "4062b5f6ddf772fc20d5be591fad74a926012f306b68bacd7164f6276595f350",
    ),
    "images-f16": (
        ["source=images", "img-0", "source.resolution=8", "seed=3",
         "sampling.draws_per_sample=3", "schedule=scaled_linear"],
        "6a8137b8b8034278d26fa66d4fc2ee7a4a7b2b22fb80d08ce40098ca553616b5",
        "fcec8eae9ae686faa8d572a68f8b3b51250fbbc5d5b7ab06b49e8de5a7372800",
    ),
    "arrays-x0": (
        ["source=arrays", "lat-{0..1}", "seed=2", "output.store_x0=true",
         "sampling.draws_per_sample=2"],
        None,
        "b4d477ffff099b78933df8269874538d718fc4ee2a98a00593c20451130c5762",
    ),
    "images-keep": (
        ["source=images", "cond-0", "source.resolution=8", "seed=4", "output.store_x0=true",
         "sampling.draws_per_sample=2", "source.keep=[cls,txt,json]"],
        None,
        "db2f1817259a68117c667d58025ca77f18327d1c7700765b144c21feec361796",
    ),
    "vae-sample-dist": (
        [*VAE, "cond-0", "seed=6", "sampling.draws_per_sample=3", "encoder.store_dist=true",
         "output.store_x0=true"],
        None,
        "e34e8d515482aff3a1b626430c5dd49cd391a830683b89c93eeb7d77e0d7acbb",
    ),
    "vae-mean-f32": (
        [*VAE, "img-0", "seed=7", "encoder.latent=mean", "output.dtype=float32",
         "sampling.draws_per_sample=2", "encoder.store_dist=true"],
        None,
        "f75e5ecc156fd595d357b87c4a5dd886ba297a2c570632e414a657adefd54730",
    ),
    "vae-sample": (
        [*VAE, "img-0", "seed=8", "sampling.draws_per_sample=2"],
        None,
        "023bf6857ea26c34497b11d980fbc760496b1a5e0c17d20189e75e7bd8433e88",
    ),
}  # fmt: skip


def _update(h, col: pa.ChunkedArray, name: str) -> None:
    col = col.combine_chunks()
    if hasattr(col.type, "shape"):  # fixed_shape_tensor: its values, row-major
        h.update(col.storage.flatten().to_numpy(zero_copy_only=False).tobytes())
    elif name == "key":
        h.update("\x1f".join(col.to_pylist()).encode())
    else:
        h.update(col.to_numpy(zero_copy_only=False).tobytes())


def _digest(out) -> str:
    h = hashlib.sha256()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path)
        for name in COLUMNS:
            _update(h, table.column(name), name)
    return h.hexdigest()


def _full_digest(out) -> str:
    """Every column of every file (name, type, values; nulls as JSON) and the rejects."""
    h = hashlib.sha256()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path)
        for field in table.schema:
            h.update(f"{field.name}:{field.type}:{field.nullable}".encode())
            col = table.column(field.name)
            if col.null_count or pa.types.is_binary(col.type) or pa.types.is_string(col.type):
                h.update(json.dumps(col.to_pylist(), default=bytes.hex).encode())
            else:
                _update(h, col, field.name)
    rows = []
    for path in sorted(out.glob("**/*rejects*.jsonl")):
        rows += [line for line in path.read_text().splitlines() if line]
    h.update("\n".join(sorted(rows)).encode())
    return h.hexdigest()


def _cond_shard(path, n: int) -> None:
    """Images with varied conditioning: a label, a caption and JSON on most samples, some absent,
    every record finite."""
    members = []
    for i in range(n):
        key = f"c{i:06d}"
        members.append((f"{key}.png", encode_image(random_image((12 + i, 10), seed=40 + i), "png")))
        if i % 3:
            members.append((f"{key}.cls", str(i * 7 - 3).encode()))
        if i % 2:
            members.append((f"{key}.txt", f"caption {i} caf\u00e9".encode()))
        if i % 4 == 1:
            members.append((f"{key}.json", json.dumps({"i": i, "w": [i, 2]}).encode()))
    write_tar(path, members)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    import torch

    from jobs.bench.encoder import TINY

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "vae"
    vae = diffusers.AutoencoderKL(**TINY, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("job", sorted(JOBS))
def test_records_are_bit_identical_to_the_previous_code(tmp_path, make_cfg, request, job):
    write_array_shard(tmp_path / "lat-0.tar", 6, shape=(2, 4, 4), seed=1, key_prefix="a")
    write_array_shard(tmp_path / "lat-1.tar", 5, shape=(2, 4, 4), seed=2, key_prefix="b")
    write_image_shard(tmp_path / "img-0.tar", 5, size=(20, 14), seed=3)
    _cond_shard(tmp_path / "cond-0.tar", 7)
    args, expected, full = JOBS[job]
    if args[0] == "encoder=vae":
        args = [*args, f"encoder.model={request.getfixturevalue('tiny_vae')}"]
    shards = next(a for a in args if "=" not in a)
    rest = [a for a in args if "=" in a]
    cfg = make_cfg(f"source.urls={tmp_path}/{shards}.tar", f"output.dir={tmp_path}/o", *rest)
    assert run(cfg)["exit_code"] == 0
    if expected is not None:
        assert _digest(tmp_path / "o") == expected
    got = _full_digest(tmp_path / "o")
    assert got == full, f"{job}: full digest {got}"
