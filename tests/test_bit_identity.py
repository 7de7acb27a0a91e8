"""Records stay bit-identical across refactors and optimisations: the digests below were
computed from the same jobs by the code before this round (commit edee8eb). Any change to
x_t, eps, t, the posterior columns, keys, indices or draws, for the same config and input,
fails here."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest
from shards import write_array_shard, write_image_shard

from pipeline.precompute import run

pytestmark = pytest.mark.usefixtures("ray_session")

COLUMNS = ("key", "index", "draw", "t", "x_t", "epsilon", "posterior_mean",
           "posterior_variance", "posterior_log_variance", "alpha_bar")  # fmt: skip
JOBS = {
    "arrays-f16": (
        ["source=arrays", "lat-{0..1}", "seed=5", "sampling.draws_per_sample=2",
         "schedule=cosine", "schedule.num_timesteps=100"],
        "38114e71c217dd94affe6bf03b015183b4bc1af88a1985ceac40aad036f3a194",
    ),
    "arrays-f32": (
        ["source=arrays", "lat-{0..1}", "seed=9", "output.dtype=float32",
         "sampling.timesteps=stratified"],
        "6c6055d2d4406ca22697d1fc79fc221df2dcea958a71f263ad2f7786b37ce883",
    ),
    "images-f16": (
        ["source=images", "img-0", "source.resolution=8", "seed=3",
         "sampling.draws_per_sample=3", "schedule=scaled_linear"],
        "6a8137b8b8034278d26fa66d4fc2ee7a4a7b2b22fb80d08ce40098ca553616b5",
    ),
}  # fmt: skip


def _digest(out) -> str:
    h = hashlib.sha256()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path)
        for name in COLUMNS:
            col = table.column(name).combine_chunks()
            if hasattr(col.type, "shape"):  # fixed_shape_tensor: its values, row-major
                h.update(col.storage.flatten().to_numpy(zero_copy_only=False).tobytes())
            elif name == "key":
                h.update("\x1f".join(col.to_pylist()).encode())
            else:
                h.update(col.to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("job", sorted(JOBS))
def test_records_are_bit_identical_to_the_previous_code(tmp_path, make_cfg, job):
    write_array_shard(tmp_path / "lat-0.tar", 6, shape=(2, 4, 4), seed=1, key_prefix="a")
    write_array_shard(tmp_path / "lat-1.tar", 5, shape=(2, 4, 4), seed=2, key_prefix="b")
    write_image_shard(tmp_path / "img-0.tar", 5, size=(20, 14), seed=3)
    (kind, shards, *args), expected = JOBS[job]
    cfg = make_cfg(kind, f"source.urls={tmp_path}/{shards}.tar", f"output.dir={tmp_path}/o", *args)
    assert run(cfg)["exit_code"] == 0
    assert _digest(tmp_path / "o") == expected
