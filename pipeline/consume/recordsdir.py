"""A directory of precomputed records as the loader sees it: its committed data files, their
Parquet footers and work units (file, row group), the process metadata, the conditioning
columns and the text-embedding tables (:class:`RecordsDir`); used by
:class:`pipeline.consume.dataset.PrecomputedDataset` and the example trainer."""

from __future__ import annotations

import json
import posixpath
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.output import records
from pipeline.output.description import ProcessMetadata
from pipeline.output.manifest import OutputDir


@dataclass(frozen=True)
class Unit:
    """One work unit: row group ``row_group`` of file number ``file``, with ``num_rows`` rows,
    the first of them row ``start`` of the file."""

    file: int
    row_group: int
    num_rows: int
    start: int = 0


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


class RecordsDir:
    """The committed Parquet files of an output directory: their footers, Arrow schema and the
    process metadata they share (``metadata``: its JSON dict, the public form; ``description``:
    the same as a :class:`pipeline.output.description.ProcessMetadata`). Reads only footers;
    refuses mixed processes and a newer metadata format than this version reads.

    ``dir``: local path or URI; ``filesystem``: a ``pyarrow.fs.FileSystem`` or an fsspec
    filesystem to read ``dir`` from (default: resolved from the URI).
    """

    def __init__(self, dir, filesystem=None, footer_threads: int = 16):
        self.uri = str(dir)
        out = OutputDir(self.uri, filesystem)
        self.fs, self.root = out.fs, out.root
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"records directory {self.uri} does not exist")
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"{self.uri} is not a directory of records")
        self.files: list[str] = out.data_files()
        left_out = uncommitted_files(out, self.files)
        if left_out:
            warnings.warn(
                f"{self.uri}: {len(left_out)} data files of shards without a commit marker are "
                f"left out (e.g. {left_out[0]}): their job was stopped before the shard was "
                "committed; rerun it with the same config to redo them",
                stacklevel=3,
            )
            self.files = [f for f in self.files if f not in set(left_out)]
        if not self.files:
            raise ValueError(
                f"{self.uri} holds no records (no *.parquet files): not an output directory "
                "of pipeline.precompute, or no shard is committed yet"
            )
        workers = max(1, min(footer_threads, len(self.files)))
        with ThreadPoolExecutor(workers) as pool:
            self.footers: list[pq.FileMetaData] = list(pool.map(self._footer, self.files))
        self.schema: pa.Schema = self.footers[0].schema.to_arrow_schema()
        metas = [self._process(i) for i in range(len(self.files))]
        ref = metas[0]
        for name, meta in zip(self.files[1:], metas[1:]):
            diff = records.same_process(ref, meta)
            if diff:
                detail = "; ".join(
                    f"{k}: {_short(ref.get(k))} vs {_short(meta.get(k))}" for k in diff
                )
                raise ValueError(
                    f"records in {self.uri} come from different processes: "
                    f"{self.display(self.files[0])} and {self.display(name)} differ in "
                    f"{', '.join(diff)} ({detail}); a dataset must hold one process, so write "
                    "each run to its own directory"
                )
        self.metadata: dict = {k: ref[k] for k in records.PROCESS_KEYS if k in ref}
        self.description = ProcessMetadata.from_json(self.metadata)  # the same, typed
        self.sources: dict[str, dict] = {n: m.get("source", {}) for n, m in zip(self.files, metas)}
        # each file's sample shape: one per file, several per dataset with aspect-ratio buckets
        self.shapes: list[tuple] = [
            tuple(records.file_shape(f.schema.to_arrow_schema())) for f in self.footers
        ]

    def bucket_of(self, file: int) -> str | None:
        """``"HxW"``, the bucket of file number ``file`` (``<shard>.<H>x<W>.parquet``), or None
        for a dataset without buckets."""
        from pipeline.read.buckets import BUCKET_FILE

        m = BUCKET_FILE.match(self.files[file]) if self.description.buckets else None
        return f"{m['h']}x{m['w']}" if m else None

    def shard_of(self, file: int) -> str:
        """The shard id of file number ``file`` (``<shard>.parquet`` or, with buckets,
        ``<shard>.<H>x<W>.parquet``)."""
        from pipeline.read.buckets import BUCKET_FILE

        name = self.files[file]
        m = BUCKET_FILE.match(name) if self.description.buckets else None
        return m["shard"] if m else name[: -len(".parquet")]

    def display(self, name: str) -> str:
        return posixpath.join(self.uri.rstrip("/"), name)

    def path(self, file: int) -> str:
        return posixpath.join(self.root, self.files[file])

    def _footer(self, name: str) -> pq.FileMetaData:
        try:
            with self.fs.open_input_file(posixpath.join(self.root, name)) as f:
                return pq.read_metadata(f)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{self.display(name)} is not a readable Parquet file: {exc}") from exc

    def _process(self, file: int) -> dict:
        try:
            meta = records.records_metadata(self.footers[file].schema.to_arrow_schema())
            ProcessMetadata.from_json(meta)  # a newer format than this version reads: refused
            return meta
        except ValueError as exc:
            raise ValueError(f"{self.display(self.files[file])}: {exc}") from None

    @property
    def num_records(self) -> int:
        return sum(f.num_rows for f in self.footers)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def units(self) -> list[Unit]:
        """Every non-empty (file, row group), in file order."""
        units = []
        for i, footer in enumerate(self.footers):
            start = 0
            for g in range(footer.num_row_groups):
                n = footer.row_group(g).num_rows
                if n > 0:
                    units.append(Unit(i, g, n, start))
                start += n
        return units

    def read(self, unit: Unit, columns: Sequence[str], use_threads: bool = True) -> pa.Table:
        """The ``columns`` of one row group (only those column chunks are fetched)."""
        with self.fs.open_input_file(self.path(unit.file)) as f:
            pf = pq.ParquetFile(f, metadata=self.footers[unit.file])
            return pf.read_row_group(unit.row_group, columns=list(columns), use_threads=use_threads)


def uncommitted_files(out: OutputDir, files: Sequence[str]) -> list[str]:
    """Of ``files``, the data files of shards the directory's manifest names but no commit
    marker does: what a job stopped between a shard's files and its marker left (with
    aspect-ratio buckets, some of a shard's bucket files). Never part of the dataset. A
    directory without a manifest of this pipeline (records written by other means) keeps every
    file."""
    from pipeline.output.manifest import MANIFEST, CorruptFileError
    from pipeline.read.buckets import data_names_by_shard

    if not out.exists(MANIFEST):
        return []
    try:
        manifest = out.read_manifest()
    except CorruptFileError:  # not this pipeline's manifest: nothing to tell committed files by
        return []
    shards = set(manifest["shards"]) - set(out.markers_ids())
    return sorted(n for names in data_names_by_shard(files, shards).values() for n in names)
