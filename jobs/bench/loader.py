"""``python -m jobs.bench.loader``: the training loader against a plain pyarrow read.

::

    python -m jobs.bench.loader                 # 16,384 records, 3 repeats: a table on stdout
    python -m jobs.bench.loader --json out.json --before /tmp/loader-before

Records: ``--records`` records of float16 ``[3, 64, 64]`` tensors in ``--files`` files with row
groups of ``--rows-per-group`` (256), written once with the project's writer options into
``--workdir`` (default ``bench-out/loader/``) and reused. The tensors are random normals (noise
does not compress; tensor columns are stored uncompressed, as the pipeline writes them).

A run is a fresh process that reads the columns ``x_t``, ``epsilon`` and ``t`` of every record
once per epoch, for ``--epochs`` (2) epochs, and times the last one (the first warms up the
allocator and lazy imports, as a training run's first epoch does); imports and reading the
directory's footers are not timed, the DataLoader's workers starting (every epoch) are:

* ``floor``: ``pq.ParquetFile(f).read_row_group(g, columns=...)`` over every row group and
  ``records.tensor_to_numpy`` of the tensor columns (``t`` to numpy): plain pyarrow, the floor
  of any reader of these files. With 2 workers, two forked processes each read every other row
  group (the data stays in them: a floor for the reading, not for handing batches over).
* ``floor+DataLoader`` (2 workers only): the same reads in DataLoader workers, each row group
  handed to the main process as it is (``batch_size=None``): what the DataLoader's hand-over
  (a copy into shared memory per batch) adds to the floor.
* ``record``: ``PrecomputedDataset(dir, columns=...)`` yielding records through
  ``DataLoader(ds, batch_size=64, num_workers=W)`` (``default_collate`` stacks the batch);
* ``batch``: ``PrecomputedDataset(dir, columns=..., batch_size=64)`` yielding ready batches
  through ``DataLoader(ds, batch_size=None, num_workers=W)``;

each with ``shuffle`` on (the default buffer of 1024 records) and off, and ``W`` = 0 and 2.
``--before DIR`` adds ``record`` runs of another checkout's ``pipeline`` (e.g. a ``git worktree``
of the commit before a change). Runs are interleaved (every case once, then again, ...), since
the machine may be shared; the table gives medians over ``--repeats``: records/s, MB/s of the
columns delivered (x_t and epsilon float16, t int32 as stored: 49,156 bytes per record), the
ratio to the floor with the same number of workers, and the CPU seconds of the process and its
DataLoader workers with the same ratio in CPU (the floor's CPU seconds / the case's), which
other work on a busy machine disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
COLUMNS = ["x_t", "epsilon", "t"]
SHAPE = (3, 64, 64)
BATCH = 64


def make_records(out: Path, num_records: int, files: int, rows_per_group: int) -> Path:
    """The benchmark's records directory (built once per set of parameters)."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.noising.noise import KeyedNoise
    from pipeline.noising.schedule import make_schedule
    from pipeline.output import records

    d = out / f"records-{num_records}-{files}-{rows_per_group}"
    if (d / "_done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    sched = make_schedule("linear", 1000)
    meta = records.make_metadata(
        schedule=sched, noise=KeyedNoise(0, 1000), dtype="float16", shape=SHAPE,
        store_x0=False, config_hash="bench-loader",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for f, rows in enumerate(np.array_split(np.arange(num_records), files)):
        n, shard = len(rows), f"bench-{f:03d}"
        schema = records.record_schema(
            SHAPE, "float16", False, {**meta, "source": {"shard": shard}}
        )
        t = rng.integers(0, 1000, n)
        cols = {
            "key": [f"{shard}/{i:08d}" for i in rows],
            "index": rows,
            "draw": np.zeros(n, np.int32),
            "t": t.astype(np.int32),
            "posterior_variance": np.full(n, 0.5, np.float32),
            "posterior_log_variance": np.full(n, np.log(0.5), np.float32),
            "alpha_bar": sched.alphas_cumprod[t].astype(np.float32),
            "snr": sched.snr[t].astype(np.float32),
        }
        for name in records.TENSOR_COLUMNS:
            cols[name] = rng.standard_normal((n, *SHAPE), dtype=np.float32).astype(np.float16)
        table = records.build_table(schema, cols)
        opts = records.writer_options(schema, "zstd", "none")
        pq.write_table(table, d / f"{shard}.parquet", row_group_size=rows_per_group, **opts)
    (d / "_done").touch()
    return d


def record_bytes() -> int:
    return 2 * 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] + 4  # x_t, epsilon float16; t int32


# -- one run (in a fresh process) ---------------------------------------------------------------


def _floor_part(path_units: list[tuple[str, int]]) -> int:
    import pyarrow.parquet as pq

    from pipeline.output.records import tensor_to_numpy

    rows, files = 0, {}
    for path, g in path_units:
        pf = files.get(path) or files.setdefault(path, pq.ParquetFile(path))
        table = pf.read_row_group(g, columns=COLUMNS)
        arrays = [tensor_to_numpy(table[c]) for c in COLUMNS[:2]] + [table["t"].to_numpy()]
        rows += len(arrays[0])
    return rows


def _units(d: Path) -> list[tuple[str, int]]:
    import pyarrow.parquet as pq

    units = []
    for path in sorted(str(p) for p in d.glob("*.parquet")):
        units += [(path, g) for g in range(pq.ParquetFile(path).num_row_groups)]
    return units


def run_floor(d: Path, workers: int) -> int:
    units = _units(d)
    if workers == 0:
        return _floor_part(units)
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return sum(pool.map(_floor_part, [units[w::workers] for w in range(workers)]))


def _row_groups_dataset(units: list[tuple[str, int]]):
    """The floor through a DataLoader: every row group read as plainly as the floor, handed over
    as one dict of tensors (the Arrow memory itself; a worker's DataLoader copies it into shared
    memory to send it), row groups dealt to workers in turn."""
    import warnings

    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    from pipeline.output.records import tensor_to_numpy

    class RowGroups(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            w, n = (info.id, info.num_workers) if info is not None else (0, 1)
            files = {}
            for path, g in units[w::n]:
                pf = files.get(path) or files.setdefault(path, pq.ParquetFile(path))
                table = pf.read_row_group(g, columns=COLUMNS)
                arrays = {c: tensor_to_numpy(table[c]) for c in COLUMNS[:2]}
                arrays["t"] = table["t"].to_numpy()
                with warnings.catch_warnings():  # read-only Arrow memory, only read
                    warnings.simplefilter("ignore", UserWarning)
                    yield {k: torch.from_numpy(v) for k, v in arrays.items()}

    return RowGroups()


def make_loader(d: Path, mode: str, shuffle: bool, workers: int):
    from torch.utils.data import DataLoader

    from pipeline.consume.dataset import PrecomputedDataset

    if mode == "floor-dl":
        return DataLoader(_row_groups_dataset(_units(d)), batch_size=None, num_workers=workers)
    if mode == "batch":
        ds = PrecomputedDataset(d, columns=COLUMNS, shuffle=shuffle, batch_size=BATCH)
        return DataLoader(ds, batch_size=None, num_workers=workers)
    ds = PrecomputedDataset(d, columns=COLUMNS, shuffle=shuffle)
    return DataLoader(ds, batch_size=BATCH, num_workers=workers)


def run_loader(loader) -> int:
    rows = 0
    for batch in loader:
        rows += len(batch["t"])
    return rows


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (exited DataLoader workers)."""
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(r.ru_utime + r.ru_stime for r in ru)


def child(a) -> int:
    if a.code:  # another checkout's pipeline package
        sys.path.insert(0, str(Path(a.code).resolve()))
    import pipeline.consume.dataset  # noqa: F401  (imports outside the timing)

    d = Path(a.dir)
    loader = None if a.mode == "floor" else make_loader(d, a.mode, a.shuffle, a.workers)
    epochs = []
    for _ in range(a.epochs):  # a new DataLoader iterator (new workers) per epoch
        cpu, t0 = _cpu(), time.perf_counter()
        rows = run_floor(d, a.workers) if loader is None else run_loader(loader)
        epochs.append({"rows": rows, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - cpu})
    source = str(Path(sys.modules["pipeline.consume.dataset"].__file__).parents[2])
    print(json.dumps({**epochs[-1], "epochs": epochs, "pipeline": source}))
    return 0


# -- the driver ---------------------------------------------------------------------------------


def wait_quiet(seconds: float) -> float:
    from .measure import wait_quiet

    return wait_quiet(seconds)


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    return r.stdout.decode().strip()


def cases(before: str | None, modes: list[str]) -> list[dict]:
    out = []
    for workers in (0, 2):
        out.append({"system": "floor", "mode": "floor", "shuffle": False, "workers": workers})
        if workers:  # what handing row groups over from DataLoader workers costs
            out.append({"system": "floor+DataLoader", "mode": "floor-dl", "shuffle": False,
                        "workers": workers})  # fmt: skip
        for shuffle in (True, False):
            if before:
                out.append({"system": "before", "mode": "record", "shuffle": shuffle,
                            "workers": workers, "code": before})  # fmt: skip
            for mode in modes:
                out.append({"system": mode, "mode": mode, "shuffle": shuffle, "workers": workers})
    return out


def run_case(d: Path, case: dict, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "jobs.bench.loader", "--child", "--dir", str(d), "--mode",
           case["mode"], "--workers", str(case["workers"]), "--epochs", str(epochs)]  # fmt: skip
    cmd += ["--shuffle"] if case["shuffle"] else []
    cmd += ["--code", case["code"]] if case.get("code") else []
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def label(case: dict) -> str:
    return f"{case['system']} shuffle={'on' if case['shuffle'] else 'off'} w={case['workers']}"


def table(results: list[dict], num_records: int) -> str:
    """Markdown: one row per case, medians over the repeats; ratios to the floor with the same
    number of workers, of records/s (wall) and of CPU seconds (floor's / the case's)."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(label(r), []).append(r)
        if r["rows"] != num_records:
            raise RuntimeError(f"{label(r)}: {r['rows']} records of {num_records}")

    def rate(runs):
        return statistics.median(x["rows"] / x["wall_s"] for x in runs)

    def cpu(runs):
        return statistics.median(x["cpu_s"] for x in runs)

    floor = {runs[0]["workers"]: runs for runs in by.values() if runs[0]["system"] == "floor"}
    lines = [
        "| reader | shuffle | workers | records/s (min-max) | MB/s | / floor | CPU s | "
        "/ floor (CPU) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for runs in by.values():
        r0, rates = runs[0], [x["rows"] / x["wall_s"] for x in runs]
        f = floor[r0["workers"]]
        shuffle = "-" if r0["system"].startswith("floor") else ("on" if r0["shuffle"] else "off")
        lines.append(
            f"| {r0['system']} | {shuffle} | {r0['workers']} | {rate(runs):,.0f} "
            f"({min(rates):,.0f}-{max(rates):,.0f}) | {rate(runs) * record_bytes() / 1e6:,.0f} | "
            f"{rate(runs) / rate(f):.2f}x | {cpu(runs):.2f} | {cpu(f) / cpu(runs):.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.loader", description=__doc__.split("\n")[0]
    )
    p.add_argument("--records", type=int, default=16384)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--rows-per-group", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="record,batch", help="loader modes (record, batch)")
    p.add_argument("--before", default=None, help="a checkout whose record mode runs too")
    p.add_argument("--workdir", default=str(ROOT / "bench-out" / "loader"))
    p.add_argument("--json", default=None, help="write every run here")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last is timed")
    p.add_argument(
        "--quiet-wait", type=float, default=0.0,
        help="before each run, wait up to this many s for a second with the machine < 25%% busy",
    )  # fmt: skip
    # one run (internal)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--shuffle", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    d = make_records(Path(a.workdir), a.records, a.files, a.rows_per_group)
    todo = cases(a.before, [m for m in a.modes.split(",") if m])
    results = []
    started = time.time()
    for rep in range(a.repeats):
        for case in todo:
            waited = wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else 0.0
            r = {**case, **run_case(d, case, a.epochs), "repeat": rep, "waited_s": waited}
            r["load"] = os.getloadavg()[0]
            results.append(r)
            print(f"[loader] r{rep} {label(case):<32} {r['rows'] / r['wall_s']:8,.0f} records/s "
                  f"cpu {r['cpu_s']:.2f} s  load {r['load']:.1f}", flush=True)  # fmt: skip
    print(f"\n{a.records:,} records of {list(SHAPE)} float16 x_t + epsilon + t, {a.files} files, "
          f"row groups of {a.rows_per_group}, batch {BATCH}; medians of {a.repeats} "
          f"({time.time() - started:.0f} s)\n")  # fmt: skip
    print(table(results, a.records))
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "argv": argv or sys.argv[1:],
                    "commit": commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                    "cores": os.cpu_count(),
                    "runs": results,
                },
                indent=1,
            )  # fmt: skip
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
