"""Where text embeddings are stored: one sample table per shard, joined to the records by index.

Records are one row per (sample, draw); embeddings are one per *sample*. Repeating them on the K
draws of a sample would multiply their bytes by K (a T5-XXL embedding at 256 tokens is 2 MiB in
float16, 64 times a 32x32x4 latent), so they live in a table of their own:

* ``_text/<shard>.parquet``: one row per sample whose records are in ``<shard>.parquet``, in
  index order, columns :func:`pipeline.encode.text.text_columns` (``key``, ``index``,
  ``caption_null``, per encoder ``<name>_hidden``/``_pooled``/``_mask``/``_tokens``). It is renamed
  into place before the shard's data file and marker (:func:`pipeline.output.commit.commit`), so a
  committed shard always has its table; a crash in between leaves an uncommitted shard that is
  redone.
* ``_text/_uncond.parquet``: the empty prompt's embedding, one row, once per dataset (every actor
  computes it at setup and writes it if absent, atomically; equal bytes on one device and build).
  The driver records its size and checksum in the manifest's ``side_files``
  (:meth:`pipeline.run.jobstate.JobState.side_files`); resume removes it when it fails them, and
  an actor writes it again.

The directory starts with ``_`` like ``_shards/``: readers of ``*.parquet`` at the root never see
it. :class:`TextTables` (used by :class:`pipeline.consume.dataset.PrecomputedDataset`) reads the
rows of given sample indices from a shard's table, row groups chosen by their ``index`` statistics.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.encode.text import text_columns
from pipeline.output.manifest import TEXT as TEXT_DIR
from pipeline.output.manifest import UNCOND
from pipeline.output.records import ARROW_TYPES, build_table, tensor_to_numpy, tensor_type
from pipeline.run.stage import Batch, Stage

ROWS_PER_GROUP = 64  # samples per row group: a loader reads about one records row group's worth


def table_name(shard: str) -> str:
    return f"{TEXT_DIR}/{shard}.parquet"


def text_schema(meta: Mapping) -> pa.Schema:
    """The Arrow schema of a text table (``meta``: the metadata's ``text`` entry)."""
    fields = []
    for name, dtype, shape in text_columns(meta):
        if shape is None:
            fields.append(pa.field(name, ARROW_TYPES.get(dtype) or pa.int8()))
        elif dtype == "int8":
            fields.append(pa.field(name, pa.fixed_shape_tensor(pa.int8(), list(shape))))
        else:
            fields.append(pa.field(name, tensor_type(shape, meta["dtype"])))
    return pa.schema(fields)


def _int8_tensor(values: np.ndarray, type_) -> pa.ExtensionArray:
    flat = np.ascontiguousarray(values, dtype=np.int8).reshape(len(values), -1)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return pa.ExtensionArray.from_storage(type_, storage)


def build(schema: pa.Schema, cols: Mapping[str, np.ndarray | list]) -> pa.Table:
    """A text table from numpy columns (masks int8 tensors, embeddings float tensors)."""
    masks = {f.name for f in schema if isinstance(f.type, pa.FixedShapeTensorType)
             and f.type.value_type == pa.int8()}  # fmt: skip
    other = pa.schema([f for f in schema if f.name not in masks])
    table = build_table(other, cols)
    for f in schema:
        if f.name in masks:
            table = table.append_column(f, _int8_tensor(cols[f.name], f.type))
    return table.select(schema.names)


def write_table(out, name: str, table: pa.Table) -> str:
    """Write ``table`` to a temporary name of ``out`` (an OutputDir) for ``name``; returns it."""
    out.makedirs(TEXT_DIR)
    tmp = out.tmp_name(name)
    pq.write_table(table, out.path(tmp), filesystem=out.fs, row_group_size=ROWS_PER_GROUP,
                   compression="none", use_dictionary=["key"])  # fmt: skip
    return tmp


def write_uncond(out, table: pa.Table) -> None:
    """The dataset's unconditional embedding, if no actor wrote it yet (atomic rename)."""
    if out.exists(UNCOND):
        return
    out.commit(write_table(out, UNCOND, table), UNCOND)


def to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns of a text table as numpy ([N, ...] tensors, [N] scalars, keys as objects)."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if isinstance(col.type, pa.FixedShapeTensorType):
            out[name] = tensor_to_numpy(col)
        else:
            out[name] = np.asarray(col.to_pylist(), dtype=object if name == "key" else None)
    return out


class TextTables:
    """Rows of the text tables of a records directory, by shard and sample index."""

    def __init__(self, fs, root: str, display):
        self.fs, self.root, self.display = fs, root, display
        self._files: dict[str, tuple[pq.FileMetaData, np.ndarray, np.ndarray]] = {}

    def _open(self, shard: str):
        if shard not in self._files:
            path = posixpath.join(self.root, table_name(shard))
            try:
                with self.fs.open_input_file(path) as f:
                    meta = pq.read_metadata(f)
            except (OSError, pa.ArrowException) as exc:
                raise ValueError(
                    f"{self.display(table_name(shard))}: the shard's text embeddings cannot be "
                    f"read ({exc}); rerun the job to redo the shard"
                ) from exc
            col = meta.schema.to_arrow_schema().get_field_index("index")
            lo = np.array([meta.row_group(g).column(col).statistics.min
                           for g in range(meta.num_row_groups)])  # fmt: skip
            hi = np.array([meta.row_group(g).column(col).statistics.max
                           for g in range(meta.num_row_groups)])  # fmt: skip
            self._files[shard] = (meta, lo, hi)
        return self._files[shard]

    def rows(self, shard: str, indices: np.ndarray, columns: Sequence[str]) -> dict:
        """``columns`` for each sample index of ``indices`` (repeats allowed: one per record);
        ValueError naming the table when an index is missing from it."""
        meta, lo, hi = self._open(shard)
        want = np.unique(indices)
        groups = [g for g in range(len(lo))
                  if np.any((want >= lo[g]) & (want <= hi[g]))]  # fmt: skip
        path = posixpath.join(self.root, table_name(shard))
        with self.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, metadata=meta)
            table = pf.read_row_groups(groups, columns=["index", *columns])
        have = np.asarray(table.column("index").to_numpy())
        # rows in write order: sorted by index, or per aspect-ratio bucket (batches by bucket)
        order = np.argsort(have, kind="stable")
        pos = np.searchsorted(have[order], indices)
        pos_ok = np.minimum(pos, max(len(have) - 1, 0))
        if len(have) == 0 or np.any(have[order][pos_ok] != indices):
            missing = sorted(set(indices.tolist()) - set(have.tolist()))[:3]
            raise ValueError(
                f"{self.display(table_name(shard))} has no text embeddings for sample index "
                f"{missing}: the table does not match its records; rerun the job"
            )
        cols = to_numpy(table.select(list(columns)))
        return {k: v[order[pos]] for k, v in cols.items()}

    def uncond(self, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """The empty prompt's row (``_text/_uncond.parquet``)."""
        with self.fs.open_input_file(posixpath.join(self.root, UNCOND)) as f:
            table = pq.read_table(f, columns=list(columns))
        return {k: v[0] for k, v in to_numpy(table).items()}


class TextSink:
    """One shard's text table, written batch by batch to a temporary file of ``out`` (an
    OutputDir); :func:`pipeline.output.commit.commit` renames it into place before the shard's
    data."""

    def __init__(self, out, shard: str, meta: Mapping):
        self.out, self.name = out, table_name(shard)
        self.schema = text_schema(meta)
        out.makedirs(TEXT_DIR)
        self.tmp = out.tmp_name(self.name)
        self.writer = pq.ParquetWriter(out.path(self.tmp), self.schema, filesystem=out.fs,
                                       compression="none", use_dictionary=["key"])  # fmt: skip

    def write(self, cols: Mapping, indices: np.ndarray) -> None:
        """The rows of ``cols`` whose sample ``index`` is in ``indices`` (the samples whose
        records were written)."""
        keep = np.isin(cols["index"], indices)
        if not keep.any():
            return
        rows = {k: ([x for x, m in zip(v, keep) if m] if isinstance(v, list) else v[keep])
                for k, v in cols.items()}  # fmt: skip
        self.writer.write_table(build(self.schema, rows), row_group_size=ROWS_PER_GROUP)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.out.remove(self.tmp)


class TextWriteStage(Stage):
    """The last stage with text: each shard's table (a :class:`TextSink`, rows of the samples
    whose records were written) and, at setup, the dataset's empty-prompt row (``uncond()``: its
    columns, from the text stage set up before this one)."""

    def __init__(self, out, meta: Mapping, uncond: Callable[[], dict]):
        self.out, self.meta, self.uncond = out, meta, uncond
        self.sink: TextSink | None = None

    def setup(self, device) -> None:
        write_uncond(self.out, build(text_schema(self.meta), self.uncond()))

    def start(self, shard: str, url: str) -> None:
        self.sink = TextSink(self.out, shard, self.meta)

    def process(self, batch: Batch) -> Batch:
        self.sink.write(batch.extras, batch.records["index"])
        return batch

    def finish(self, result) -> None:
        """Committed with the shard, before its data file and marker (side files)."""
        self.sink.close()
        result.side_files = [(self.sink.tmp, self.sink.name)]

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
