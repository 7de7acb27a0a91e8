"""The scan of one committed shard: :func:`scan_shard` reads it a Parquet batch at a time
(bounded memory) into an :class:`pipeline.validate.accumulate.Accumulator` and returns its
:class:`pipeline.validate.measures.ShardStats`. It runs in a Ray task or a local process
(:mod:`pipeline.validate.executor`); on the driver :class:`pipeline.validate.measures.DatasetStats`
merges the shards' statistics as their scans finish, and the checks
(:mod:`pipeline.validate.checks`) turn them into verdicts.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq

from pipeline.output import records
from pipeline.output.contracts import CommitMarker
from pipeline.output.manifest import OutputDir
from pipeline.validate.accumulate import Accumulator
from pipeline.validate.inventory import file_check, read_marker
from pipeline.validate.measures import ShardStats
from pipeline.validate.plan import ScanPlan

# Metadata differences that make a file's records unreadable as the manifest's process.
UNSCANNABLE = {"dtype", "shape", "schedule", "noise", "store_x0"}


def shard_names(
    out: OutputDir, shard: str, marker: CommitMarker | None, plan: ScanPlan
) -> list[str]:
    """The data files of a shard: those its marker lists (a bucketed shard's ``files``), else
    ``<shard>.parquet``, or with buckets and no readable marker its bucket files as listed."""
    if marker is not None and marker.files is not None:
        return [f.name for f in marker.files]
    if plan.process.buckets is None:
        return [OutputDir.data_name(shard)]
    from pipeline.read.buckets import data_names_by_shard

    return data_names_by_shard(out.list(), [shard]).get(shard, [])


def shown_files(out: OutputDir, shard: str, names: list[str]) -> str:
    """The shard's data files ``names`` as a report names them: its one file
    (``<out>/<shard>.parquet``), a bucketed shard's files in brace form
    (``<out>/<shard>.{32x64,64x32}.parquet``: exactly the files it wrote), or ``shard <id>`` when
    none is found."""
    from pipeline.read.buckets import BUCKET_FILE

    if len(names) == 1:
        return out.display(names[0])
    buckets = [m["h"] + "x" + m["w"] for n in names if (m := BUCKET_FILE.match(n))]
    if not names or len(buckets) != len(names):
        return f"shard {shard} ({', '.join(map(out.display, names)) or 'no data file'})"
    return out.display(f"{shard}.{{{','.join(buckets)}}}.parquet")


def scan_shard(out: OutputDir, shard: str, plan: ScanPlan) -> ShardStats:
    """Read one committed shard batch by batch and return its statistics. Never raises for a
    bad file: the error is returned in ``ShardStats.error`` (reported by ``completeness``). A
    bucketed shard's files (one per bucket, each of its own shape) are read in turn into one
    accumulator (:meth:`Accumulator.use_file`)."""
    t0 = time.perf_counter()
    marker, marker_error = read_marker(out, shard)
    names = shard_names(out, shard, marker, plan)
    st = ShardStats(shard=shard, file=shown_files(out, shard, names))
    st.marker, st.marker_error = marker, marker_error
    st.file_check = file_check(out, names, st.marker)
    try:
        if not names:
            raise FileNotFoundError(f"no data file of shard {shard} in {out.display()}")
        files = []
        for name in names:
            fh = out.fs.open_input_file(out.path(name))
            files.append((name, fh, pq.ParquetFile(fh)))
        try:
            st.num_rows = sum(pf.metadata.num_rows for _, _, pf in files)
            acc = None
            row0 = 0
            for name, _, pf in files:
                meta = records.process_metadata(pf.schema_arrow)
                problems = records.same_process(meta, plan.process)
                if meta.get("source", {}).get("shard", shard) != shard:
                    problems.append("source.shard")
                st.meta = st.meta or meta
                st.meta_problems += [p for p in problems if p not in st.meta_problems]
                if UNSCANNABLE & set(problems):
                    raise ValueError(
                        f"{out.display(name)}: process metadata differs from the manifest in "
                        f"{problems}: not scanned"
                    )
                if acc is None:
                    acc = Accumulator(st, plan)
                acc.use_file(records.file_shape(pf.schema_arrow), meta.get("grid"))
                have = set(pf.schema_arrow.names)
                cols = [c for c in acc.columns if c in have]  # a missing one: KeyError below
                rows = max(1, plan.batch_elements // max(1, acc.C * acc.P))
                acc.cost.lap("open")
                for rb in pf.iter_batches(batch_size=rows, columns=cols, use_threads=False):
                    acc.batch(rb, row0)
                    row0 += rb.num_rows
            acc.finish()
            st.cost = dict(acc.cost.seconds)
        finally:
            for _, fh, _ in files:
                fh.close()
    except Exception as exc:  # reported, not raised: one bad shard must not stop the others
        st.error = f"{type(exc).__name__}: {exc}"
    st.seconds = time.perf_counter() - t0
    return st
