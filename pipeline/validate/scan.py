"""The scan of one committed shard: :func:`scan_shard` reads it a Parquet batch at a time
(bounded memory) into an :class:`pipeline.validate.accumulate.Accumulator` and returns its
:class:`pipeline.validate.measures.ShardStats`. It runs in a Ray task or a local process
(:mod:`pipeline.executor`); on the driver :class:`pipeline.validate.measures.DatasetStats`
merges the shards' statistics as their scans finish, and the checks
(:mod:`pipeline.validate.checks`) turn them into verdicts.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq

from .. import records
from ..manifest import OutputDir
from .accumulate import Accumulator
from .inventory import file_check, read_marker
from .measures import ShardStats
from .plan import ScanPlan

# Metadata differences that make a file's records unreadable as the manifest's process.
UNSCANNABLE = {"dtype", "shape", "schedule", "noise", "store_x0"}


def scan_shard(out: OutputDir, shard: str, plan: ScanPlan) -> ShardStats:
    """Read one committed shard batch by batch and return its statistics. Never raises for a
    bad file: the error is returned in ``ShardStats.error`` (reported by ``completeness``)."""
    t0 = time.perf_counter()
    name = OutputDir.data_name(shard)
    st = ShardStats(shard=shard, file=out.display(name))
    st.marker, st.marker_error = read_marker(out, shard)
    st.file_check = file_check(out, name, st.marker)
    try:
        with out.fs.open_input_file(out.path(name)) as fh:
            pf = pq.ParquetFile(fh)
            st.num_rows = pf.metadata.num_rows
            st.meta = records.process_metadata(pf.schema_arrow)
            st.meta_problems = records.same_process(st.meta, plan.process)
            if st.meta.get("source", {}).get("shard", shard) != shard:
                st.meta_problems.append("source.shard")
            if UNSCANNABLE & set(st.meta_problems):
                raise ValueError(
                    f"process metadata differs from the manifest in {st.meta_problems}: not scanned"
                )
            acc = Accumulator(st, plan)
            have = set(pf.schema_arrow.names)
            cols = [c for c in acc.columns if c in have]  # a missing one: KeyError below
            rows = max(1, plan.batch_elements // max(1, acc.C * acc.P))
            row0 = 0
            acc.cost.lap("open")
            for rb in pf.iter_batches(batch_size=rows, columns=cols, use_threads=False):
                acc.batch(rb, row0)
                row0 += rb.num_rows
            acc.finish()
            st.cost = dict(acc.cost.seconds)
    except Exception as exc:  # reported, not raised: one bad shard must not stop the others
        st.error = f"{type(exc).__name__}: {exc}"
    st.seconds = time.perf_counter() - t0
    return st
