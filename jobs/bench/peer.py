"""The peer of the benchmark: the precompute as a Ray user would write it with Ray Data.

``python -m jobs.bench.peer --resolution 64 --out DIR SHARD.tar [...]`` (from the repository root)

``ray.data.read_webdataset(paths, decoder=one_payload)`` (raw member bytes: Ray Data's default
decoder would turn images into uint8 arrays at full size and ``np.load`` arrays without checks)
-> ``map_batches(RecordMaker, concurrency=cores, num_cpus=1)``, an actor class that decodes a
batch and computes the record columns -> ``write_parquet(out)``. Local Ray with
``num_cpus=os.cpu_count()``: the same cores as the project and the floor.

The record computation is the floor's (``jobs/bench/floor.py``), so the three systems differ only
in how the work is run. Two things a Ray Data pipeline does not give directly are taken as a Ray
user would: the shard id comes from the ``__url__`` column (keyed noise is per shard), and a
sample's ordinal in its shard (the ``index`` column) is parsed from the benchmark's keys, which
end in ``_<ordinal>`` (``pipeline.demo`` and ``jobs/bench/measure.py`` write them so). Files are
laid out as Ray Data writes them (one per write task), not one per shard.

Resources: one actor per core (``--actor-cpus 1``) and read tasks that reserve no CPU
(``--read-cpus 0``). With every CPU held by actors, read tasks that ask for CPU are never
scheduled and the dataset hangs (ray-project/ray#44687); giving the actors 0.75 CPU and the
reads 0.25 instead was slower here (2,000 photos: 34 s against 27 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import floor as bench_floor

PAYLOADS = ("jpg", "jpeg", "png", "npy")


def one_payload(sample: dict) -> dict:
    """read_webdataset's per-sample decoder: the payload member as (ext, data) columns.

    Without it a shard mixing .jpg and .png samples gives two half-null columns, which Ray Data
    cannot turn into Arrow and pickles ("falling back to serialize as pickled python objects")."""
    ext = next(e for e in PAYLOADS if e in sample)
    return {
        "__key__": sample["__key__"],
        "__url__": sample["__url__"],
        "ext": ext,
        "data": sample[ext],
    }


class RecordMaker:
    """The map_batches actor: a pyarrow batch of raw samples -> a pyarrow table of records."""

    def __init__(self, resolution: int, seed: int = 0):
        self.resolution, self.seed = resolution, seed
        self.tables = bench_floor.Tables()

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("__key__").to_pylist()
        urls = batch.column("__url__").to_pylist()
        exts = batch.column("ext").to_pylist()
        data = batch.column("data").to_pylist()
        xs = [bench_floor.decode(e, d, self.resolution) for e, d in zip(exts, data)]
        index = [int(k.rsplit("_", 1)[1]) for k in keys]
        out = []
        shards = [bench_floor.shard_name(u) for u in urls]
        start = 0
        for end in range(1, len(keys) + 1):  # a batch may span shards: one table per run
            if end == len(keys) or shards[end] != shards[start]:
                sl = slice(start, end)
                out.append(
                    bench_floor.record_table(
                        self.tables, self.seed, shards[start], keys[sl], index[sl],
                        np.stack(xs[sl]),
                    )
                )  # fmt: skip
                start = end
        return pa.concat_tables(out)


def run(
    paths: list[str],
    out: str,
    resolution: int,
    seed: int = 0,
    batch_size: int = 256,
    actor_cpus: float = 1.0,
    read_cpus: float = 0.0,
    concurrency: int | None = None,
) -> dict:
    import ray

    start = time.perf_counter()
    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.read_webdataset(paths, decoder=one_payload, num_cpus=read_cpus).map_batches(
        RecordMaker,
        fn_constructor_kwargs={"resolution": resolution, "seed": seed},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=concurrency or max(1, int(cores // actor_cpus)),
        num_cpus=actor_cpus,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    ds.write_parquet(
        out, row_group_size=bench_floor.ROWS_PER_GROUP, **bench_floor.parquet_options()
    )
    ray.shutdown()
    files = list(Path(out).rglob("*.parquet"))
    return {
        "bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--read-cpus", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=None, help="actors; default cores/actor-cpus")
    p.add_argument("shards", nargs="+")
    a = p.parse_args(argv)
    res = run(
        a.shards, a.out, a.resolution, a.seed, a.batch_size, a.actor_cpus, a.read_cpus,
        a.concurrency,
    )  # fmt: skip
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
