"""The columns :class:`pipeline.consume.dataset.PrecomputedDataset` yields and where each comes
from: the record files' columns, and with text embeddings (``text=...`` at precompute time) the
per-sample embedding columns of ``_text/`` (:mod:`pipeline.output.text_store`), joined to each
record by its sample ``index``. Columns read only to join or filter (``index`` for the join,
``draw`` for ``draws="cycle"``) are dropped before a record is yielded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.consume.recordsdir import RecordsDir


class ColumnSelection:
    """The checked ``columns`` of ``rd`` (default: all, records' then text columns), split into
    ``record_columns`` (read from the data files, with the helper columns) and ``text_columns``
    (joined from ``_text/``). ValueError naming the available columns for an unknown name, and
    for a duplicate one."""

    def __init__(self, rd: RecordsDir, columns: Sequence[str] | str | None):
        self.rd = rd
        self.text = None
        text_meta = rd.description.text
        text_available: list[str] = []
        if text_meta:  # per-sample embeddings in _text/, joined by index
            from pipeline.encode.text import embedding_columns
            from pipeline.output.text_store import TextTables

            self.text = TextTables(rd.fs, rd.root, rd.display)
            text_available = ["caption_null", *embedding_columns(text_meta)]
        available = rd.column_names + text_available
        if columns is None:
            columns = available
        elif isinstance(columns, str):
            columns = [columns]
        columns = list(columns)
        unknown = [c for c in columns if c not in available]
        if unknown or not columns:
            raise ValueError(
                f"unknown columns {unknown} for records in {rd.uri}; "
                f"available: {', '.join(available)}"
                + ("" if "x_0" in available else " (x_0 is only stored with output.store_x0=true)")
            )
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate column names in {columns}")
        self.columns: list[str] = columns
        self.text_columns = [c for c in columns if c in text_available]
        self.record_columns = [c for c in columns if c not in text_available]
        if self.text_columns:
            self.read_also("index")  # the join key

    def read_also(self, name: str) -> None:
        """Read record column ``name`` too (a helper: dropped by :meth:`complete` unless asked)."""
        if name not in self.record_columns:
            self.record_columns.append(name)

    def complete(self, block: dict, file: int) -> dict:
        """``block`` (the record columns of rows of file number ``file``) with each record's
        sample row of its shard's text table joined, and without the helper columns."""
        if self.text_columns:
            shard = self.rd.shard_of(file)
            block.update(self.text.rows(shard, block["index"], self.text_columns))
        for name in [n for n in block if n not in self.columns]:
            del block[name]
        return block

    def unconditional(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding columns (``_text/_uncond.parquet``), floating ones cast
        to ``dtype``; ValueError without text embeddings."""
        if self.text is None:
            raise ValueError(f"{self.rd.uri} has no text embeddings (made without text=...)")
        from pipeline.encode.text import embedding_columns

        cols = embedding_columns(self.rd.description.text)
        out = {k: torch.from_numpy(np.array(v)) for k, v in self.text.uncond(cols).items()}
        return {k: v.to(dtype) if dtype and v.is_floating_point() else v
                for k, v in out.items()}  # fmt: skip
