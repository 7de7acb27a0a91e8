"""Null integer labels in the loader: which value stands for a missing label, and the proof that
it is no real label of the data.

A kept ``cls`` member is an int64 column that is null for a sample without the member
(:mod:`pipeline.read.conditioning`). A torch batch of labels has no null, so
:class:`pipeline.consume.dataset.PrecomputedDataset` yields a null as ``null_label`` (default -1). A
dataset whose labels include that value would make a real label and a missing one the same
number: the dataset refuses it at construction, naming the column, a file that holds both and a
value that is free. Polars, pyarrow and the Hugging Face export keep nulls as nulls.

What the check costs: nothing for columns without nulls (the footers' statistics say so); for the
others the footers' min/max rule out most row groups, and only the label column of the remaining
ones is read (8 bytes per record).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DEFAULT_NULL_LABEL = -1
INT64 = (-(2**63), 2**63 - 1)


def check_null_label(value) -> int:
    """``value`` as an int in int64's range; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"null_label must be an integer (int64), got {value!r}")
    if not INT64[0] <= int(value) <= INT64[1]:
        raise ValueError(f"null_label must be within int64, got {value}")
    return int(value)


def nullable_int_columns(schema: pa.Schema, columns: Sequence[str]) -> list[str]:
    """The integer columns of ``columns`` the schema allows nulls in (kept labels such as cls)."""
    return [
        c
        for c in columns
        if c in schema.names
        and pa.types.is_integer(schema.field(c).type)
        and schema.field(c).nullable
    ]


def _row_groups(footer: pq.FileMetaData, column: str):
    """``(row group, null count or None, min, max or None)`` of ``column`` in each row group."""
    idx = footer.schema.to_arrow_schema().get_field_index(column)
    for g in range(footer.num_row_groups):
        stats = footer.row_group(g).column(idx).statistics
        nulls = stats.null_count if stats is not None and stats.has_null_count else None
        lo_hi = (stats.min, stats.max) if stats is not None and stats.has_min_max else None
        yield g, nulls, lo_hi


def refuse_collisions(rd, columns: Sequence[str], null_label: int) -> None:
    """ValueError when a column of ``columns`` holds both nulls and the value ``null_label``
    (``rd``: a :class:`pipeline.consume.dataset.RecordsDir`)."""
    from pipeline.consume.recordsdir import Unit

    for column in nullable_int_columns(rd.schema, columns):
        groups = [
            (f, *rg) for f, footer in enumerate(rd.footers) for rg in _row_groups(footer, column)
        ]
        if all(nulls == 0 for _, _, nulls, _ in groups):
            continue
        holder = None
        for f, g, _, lo_hi in groups:
            if lo_hi is None or lo_hi[0] <= null_label <= lo_hi[1]:
                rows = rd.footers[f].row_group(g).num_rows
                values = rd.read(Unit(f, g, rows), [column])[column]
                if pc.any(pc.equal(values, null_label)).as_py():
                    holder = rd.files[f]
                    break
        if holder is None:
            continue
        known = [lo_hi for *_, lo_hi in groups if lo_hi is not None]
        low = min((lo for lo, _ in known), default=null_label)
        high = max((hi for _, hi in known), default=null_label)
        free = low - 1 if low > INT64[0] else high + 1
        raise ValueError(
            f"column {column!r} of {rd.uri} holds null labels (absent members) and real labels "
            f"equal to null_label={null_label} (e.g. in {holder}): both would be yielded as "
            f"{null_label}. Pass null_label= a value no record holds (its labels span {low} "
            f"to {high}: e.g. null_label={free}), or read the column with pyarrow or polars, "
            "which keep nulls"
        )
