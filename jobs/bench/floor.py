"""The floor of the benchmark: the precompute's work written as plainly as possible.

``python -m jobs.bench.floor --resolution 64 --out DIR SHARD.tar [...]``

A ``multiprocessing.Pool(os.cpu_count())`` over shards; each worker streams its tar with
``tarfile``, decodes (PIL with ``draft`` for JPEG, shorter side resized bicubic + centre crop in
one ``resize(box=...)``, to float32 [-1, 1]; arrays: ``np.load``), draws ``t`` and ``eps``, computes
``x_t`` and the posterior in float32 numpy from the float64 tables of
:mod:`pipeline.noising.schedule`, casts to float16 and writes one Parquet file per shard
(``arrow.fixed_shape_tensor`` columns, the project's columns and codecs) in row groups of 256. No
framework, no checks, no manifest. The one piece of the project it uses besides the schedule's
tables is the ~10-line Arrow wrapper :func:`pipeline.output.records.tensor_array` (numpy buffer ->
tensor column, zero-copy): plain pyarrow that the floor would otherwise write out the same way.

The draws follow the project's record identity (``pipeline.noising.noise``: BLAKE2b of (seed, shard,
key, draw) keys a Philox stream for eps and gives t), re-implemented inline so that the floor's
records are the project's records (``tests/test_bench.py`` checks it): a keyed Philox stream costs
the same as one ``default_rng`` stream per shard (both ~0.25 ms per 64 px sample here). Only the
default sampler is covered: ``uniform`` timesteps, one draw per sample, ``float16`` output.

Functions here are shared by the Ray Data peer (``jobs/bench/peer.py``), so that floor, peer and
project differ only in how the work is run, not in the work.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.noising.schedule import make_schedule
from pipeline.output.records import tensor_array, tensor_type

PERSON = b"ddpm-precompute"  # the BLAKE2b personalisation of pipeline.noising.noise
ROWS_PER_GROUP = 256  # the project's output.rows_per_group default
TENSORS = ("x_t", "epsilon", "posterior_mean")
SCALARS = ("posterior_variance", "posterior_log_variance", "alpha_bar")


# ---------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, r: int) -> np.ndarray:
    """JPEG/PNG bytes -> float32 [3, r, r] in [-1, 1], as pipeline.read.decoders.ImageDecoder does
    for RGB, L and RGBA photos without EXIF (alpha composited over white)."""
    im = Image.open(io.BytesIO(data))
    side = min(im.size)
    if side >= 2 * r:  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, never below r
        im.draft(None, (math.ceil(im.width * r / side), math.ceil(im.height * r / side)))
    if "A" in im.getbands() or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255,) * 4), im.convert("RGBA"))
    if im.mode != "RGB":
        im = im.convert("RGB")
    side = min(im.size)
    if im.size != (r, r):
        left, top = (im.width - side) / 2, (im.height - side) / 2
        gap = 3.0 if side >= 3 * r else None
        box = (left, top, left + side, top + side)
        im = im.resize((r, r), Image.Resampling.BICUBIC, box=box, reducing_gap=gap)
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
    return x / np.float32(127.5) - np.float32(1)


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data)).astype(np.float32, copy=False)


def decode(ext: str, data: bytes, resolution: int) -> np.ndarray:
    return decode_array(data) if ext == "npy" else decode_image(data, resolution)


# ------------------------------------------------------------------------------ the records
class Tables:
    """float32 gathers from the float64 schedule tables (the project's default: linear, T=1000)."""

    def __init__(self, name: str = "linear", num_timesteps: int = 1000):
        s = make_schedule(name, num_timesteps)
        self.T = num_timesteps
        self.a, self.s = s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod
        self.c1, self.c2 = s.posterior_mean_coef1, s.posterior_mean_coef2
        self.var, self.logvar = s.posterior_variance, s.posterior_log_variance_clipped
        self.ab = s.alphas_cumprod


def _digest(seed: int, shard: str, key: str) -> bytes:
    msg = f"{seed}\x1f{shard}\x1f{key}\x1f0".encode()
    return hashlib.blake2b(msg, digest_size=32, person=PERSON).digest()


def draw(seed: int, shard: str, keys: list[str], T: int, shape: tuple) -> tuple:
    """(t int64 [N], eps float32 [N, *shape]) keyed by (seed, shard, key, draw=0)."""
    digests = b"".join(_digest(seed, shard, k) for k in keys)
    words = np.frombuffer(digests, dtype="<u8").reshape(len(keys), 4)
    t = ((words[:, 2] >> np.uint64(11)).astype(np.float64) * 2.0**-53 * T).astype(np.int64)
    eps = np.empty((len(keys), *shape), dtype=np.float32)
    for i in range(len(keys)):
        gen = np.random.Generator(np.random.Philox(key=words[i, :2]))
        gen.standard_normal(dtype=np.float32, out=eps[i])
    return t, eps


def record_table(tab: Tables, seed: int, shard: str, keys, index, x0: np.ndarray) -> pa.Table:
    """The project's record columns for a batch [N, C, ...] of one shard."""
    t, eps = draw(seed, shard, keys, tab.T, x0.shape[1:])
    bshape = (-1,) + (1,) * (x0.ndim - 1)

    def g(table):  # table[t] in float32, broadcastable against x0
        return table[t].astype(np.float32).reshape(bshape)

    x_t = g(tab.a) * x0 + g(tab.s) * eps
    mean = g(tab.c1) * x0 + g(tab.c2) * x_t
    # cast here, in numpy (the floor's float16 cast); tensor_array then only wraps the buffers
    tt = tensor_type(x0.shape[1:], "float16")
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "index": pa.array(np.asarray(index, dtype=np.int64)),
            "draw": pa.array(np.zeros(len(keys), dtype=np.int32)),
            "t": pa.array(t.astype(np.int32)),
            "x_t": tensor_array(x_t.astype(np.float16), tt),
            "epsilon": tensor_array(eps.astype(np.float16), tt),
            "posterior_mean": tensor_array(mean.astype(np.float16), tt),
            "posterior_variance": pa.array(tab.var[t].astype(np.float32)),
            "posterior_log_variance": pa.array(tab.logvar[t].astype(np.float32)),
            "alpha_bar": pa.array(tab.ab[t].astype(np.float32)),
        }
    )


def parquet_options() -> dict:
    """The project's codecs: zstd for scalars, none for tensors, dictionary for keys only."""
    scalars = ["key", "index", "draw", "t", *SCALARS]
    return {
        "compression": {**dict.fromkeys(scalars, "zstd"), **dict.fromkeys(TENSORS, "none")},
        "use_dictionary": ["key"],
        "write_statistics": scalars,
    }


# ------------------------------------------------------------------------------- the floor
def shard_name(path: str) -> str:
    return os.path.basename(path).split(".tar")[0]


def process_shard(job: tuple) -> dict:
    """One shard -> ``<out>/<shard>.parquet``; returns {shard, samples, bytes}."""
    path, out, resolution, seed = job
    tab, shard = Tables(), shard_name(path)
    dest = os.path.join(out, f"{shard}.parquet")
    writer, keys, index, xs, n = None, [], [], [], 0

    def flush():
        nonlocal writer
        table = record_table(tab, seed, shard, keys, index, np.stack(xs))
        if writer is None:
            writer = pq.ParquetWriter(dest, table.schema, **parquet_options())
        writer.write_table(table, row_group_size=ROWS_PER_GROUP)
        keys.clear(), index.clear(), xs.clear()

    with tarfile.open(path, "r|") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            xs.append(decode(ext, tar.extractfile(member).read(), resolution))
            keys.append(key)
            index.append(n)
            n += 1
            if len(xs) == ROWS_PER_GROUP:
                flush()
            tar.members = []
    if xs:
        flush()
    writer.close()
    return {"shard": shard, "samples": n, "bytes": os.path.getsize(dest)}


def run(paths: list[str], out: str, resolution: int, seed: int = 0, processes=None) -> dict:
    Path(out).mkdir(parents=True, exist_ok=True)
    jobs = [(p, out, resolution, seed) for p in paths]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(processes or os.cpu_count()) as pool:
        done = list(pool.imap_unordered(process_shard, jobs))
    secs = time.perf_counter() - start
    samples = sum(d["samples"] for d in done)
    return {"samples": samples, "bytes": sum(d["bytes"] for d in done), "seconds": secs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=64, help="images: output side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=None, help="default: os.cpu_count()")
    p.add_argument("shards", nargs="+")
    a = p.parse_args(argv)
    print(json.dumps(run(a.shards, a.out, a.resolution, a.seed, a.processes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
