"""Hugging Face ``datasets`` access to precomputed records.

``datasets`` (checked with 5.2) cannot read the records as they are: ``Dataset.from_parquet``
and ``load_dataset("parquet", ...)`` fail on the tensor columns with "Arrow type
extension<arrow.fixed_shape_tensor[...]> does not have a datasets dtype equivalent". Two paths:

* :func:`to_hf_dataset` -- a ``datasets.Dataset`` with ``Array3D`` features (``Array2D`` ...
  ``Array5D`` for other ranks), built by ``Dataset.from_generator`` from one row group at a time
  and cached by ``datasets`` as memory-mapped Arrow. The cache is keyed by the files' names,
  sizes and modification times and by the columns, so a changed directory is re-read.
* :func:`export_hf_parquet` -- rewrites every file as Parquet that ``datasets`` reads natively:
  tensor columns in ``datasets``' ``ArrayND`` layout (nested lists) and the ``datasets`` features
  in the schema metadata (``huggingface``), next to the original ``ddpm`` metadata. Use it to
  ``load_dataset("parquet", data_files=...)`` or to upload to the Hub. Row groups are kept.

Conditioning columns (``source.keep``: ``cls`` int64, ``txt``/``json`` string, others binary)
become ``Value`` features of their type, nulls kept as None. With ``source.class_names`` (names
recorded in the metadata), ``cls`` becomes a ``ClassLabel`` with those names (its values stay
the integer labels; ``ds.features["cls"].int2str`` names them); a label outside the names is
refused, naming ``source.class_names`` and the file.

Aspect-ratio buckets: ``datasets``' ``ArrayND`` has one shape per column, so a bucketed dataset
(``source.buckets``) is one ``datasets`` config per bucket. :func:`export_hf_parquet` writes
each bucket's files under ``out/<H>x<W>/`` and a ``README.md`` whose ``configs`` list names them
(the Hub's dataset card format: ``load_dataset(out, "512x768")``), and logs that it did;
:func:`to_hf_dataset` takes ``bucket="HxW"`` and refuses a bucketed directory without it, naming
the buckets.

Text embeddings (``text=...`` at precompute time): they live in per-shard tables ``_text/``
(:mod:`pipeline.output.text_store`), one row per sample; both paths join them to each record by
its sample ``index``, as :class:`pipeline.consume.dataset.PrecomputedDataset` does, so every row
carries ``caption_null`` and each encoder's ``<name>_hidden`` (``Array2D`` [L, D]),
``<name>_pooled`` and ``<name>_mask`` (``List`` of fixed length: ``datasets`` has no ``Array1D``)
unless ``columns`` leaves them out. The empty prompt's embedding (one row per dataset, for
classifier-free guidance) is not a record: it stays in ``<dir>/_text/_uncond.parquet``
(``PrecomputedDataset(dir).unconditional()``).

Note: ``datasets``' numpy/torch formatting returns float16 ``ArrayND`` columns as float32.
Tensor ranks 1 to 5 are supported (``[C, H, W]`` is rank 3; rank 1 as a fixed-length ``List``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.consume.batching import table_to_numpy
from pipeline.consume.columns import ColumnSelection
from pipeline.consume.recordsdir import RecordsDir, Unit
from pipeline.output import records
from pipeline.output.manifest import MANIFEST, OutputDir

CACHE_VERSION = 1
log = logging.getLogger(__name__)


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pipeline.consume.hf needs Hugging Face datasets: pip install datasets"
        ) from exc
    return datasets


def _array_feature(type_: pa.FixedShapeTensorType):
    """The ``datasets`` feature of a tensor column: ``ArrayND`` for ranks 2 to 5, a fixed-length
    ``List`` for rank 1 (a text encoder's pooled embedding or attention mask)."""
    datasets = _import_datasets()
    shape = tuple(int(s) for s in type_.shape)
    classes = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    if len(shape) not in classes and len(shape) != 1:
        raise ValueError(f"datasets has ArrayND features of rank 2 to 5 only, got shape {shape}")
    dtype = {pa.float16(): "float16", pa.float32(): "float32", pa.int8(): "int8"}.get(
        type_.value_type
    )
    if dtype is None:
        raise ValueError(f"unsupported tensor value type {type_.value_type}")
    if len(shape) == 1:
        return datasets.List(datasets.Value(dtype), length=shape[0])
    return classes[len(shape)](shape=shape, dtype=dtype)


def class_names(schema: pa.Schema) -> list[str] | None:
    """The ``source.class_names`` a records schema's metadata carries (None: none given)."""
    raw = (schema.metadata or {}).get(records.METADATA_KEY)
    if raw is None:
        return None
    return (json.loads(raw).get("conditioning") or {}).get("class_names")


def _check_labels(table: pa.Table, names: Sequence[str] | None, where: str) -> None:
    """ValueError when a ``cls`` label of ``table`` is not an index into ``names``."""
    if names is None or "cls" not in table.column_names:
        return
    import pyarrow.compute as pc

    lo, hi = pc.min_max(table["cls"]).values()
    lo, hi = lo.as_py(), hi.as_py()
    if lo is not None and (lo < 0 or hi >= len(names)):
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: cls label {bad} is not in source.class_names ({len(names)} names, labels "
            f"0 to {len(names) - 1}); the records and their class names disagree"
        )


def hf_features(schema: pa.Schema, columns: Sequence[str] | None = None):
    """``datasets.Features`` of a records schema (or of its ``columns``): tensors as ArrayND,
    ``cls`` as a ``ClassLabel`` when the metadata carries ``source.class_names``."""
    datasets = _import_datasets()
    names = class_names(schema)
    columns = list(schema.names if columns is None else columns)
    plain = pa.schema(
        [f for f in (schema.field(c) for c in columns) if not records.is_tensor(f.type)]
    )
    base = datasets.Features.from_arrow_schema(plain)
    feats = {}
    for name in columns:
        type_ = schema.field(name).type
        feats[name] = _array_feature(type_) if records.is_tensor(type_) else base[name]
    if names is not None and "cls" in feats:
        feats["cls"] = datasets.ClassLabel(names=names)
    return datasets.Features(feats)


def _nested_storage(column: pa.ChunkedArray | pa.Array, type_) -> pa.Array:
    """A fixed_shape_tensor column as datasets' ArrayND storage: nested lists, row-major."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = column.storage.flatten()  # honours slicing offsets
    for dim in reversed(type_.shape):
        n = len(values) // dim
        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        values = pa.ListArray.from_arrays(offsets, values)
    return values


def to_hf_table(table: pa.Table, features) -> pa.Table:
    """A records table as the Arrow table ``datasets`` expects for ``features``."""
    schema = features.arrow_schema
    arrays = []
    for field in schema:
        col = table[field.name]
        if records.is_tensor(col.type) and not isinstance(field.type, pa.ExtensionType):
            arrays.append(col.cast(col.type.storage_type).cast(field.type))  # rank 1: a List
        elif records.is_tensor(col.type):
            storage = _nested_storage(col, col.type).cast(field.type.storage_type)
            arrays.append(pa.ExtensionArray.from_storage(field.type, storage))
        else:
            arrays.append(col.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class _Text:
    """What joins the text embedding columns to records (see the module docstring): the
    ``_text/`` tables of a records directory, the Arrow schema of the columns asked, and the
    shard of each file path. Picklable (``datasets`` may run the generator in processes)."""

    def __init__(self, rd: RecordsDir, columns: Sequence[str]):
        from pipeline.output.text_store import text_schema

        self.fs, self.root, self.uri = rd.fs, rd.root, rd.uri.rstrip("/")
        full = text_schema(rd.description.text)
        self.schema = pa.schema([full.field(c) for c in columns])
        self.shards = {rd.path(i): rd.shard_of(i) for i in range(len(rd.files))}
        self._tables = None

    def __getstate__(self):
        return {**self.__dict__, "_tables": None}  # opened again where it is used

    def join(self, table: pa.Table, shard: str) -> pa.Table:
        """``table`` (records with their ``index``) with each record's row of its shard's text
        table appended, columns of :attr:`schema`."""
        from pipeline.output.text_store import TextTables, build

        if self._tables is None:
            self._tables = TextTables(
                self.fs, self.root, functools.partial(posixpath.join, self.uri)
            )
        index = np.asarray(table.column("index").to_numpy())
        rows = self._tables.rows(shard, index, self.schema.names)
        joined = build(self.schema, rows)
        for f in self.schema:
            table = table.append_column(f, joined.column(f.name))
        return table


def _selection(rd: RecordsDir, columns: Sequence[str] | None) -> tuple[list, list, _Text | None]:
    """(columns in order, record columns to read, the text join or None) of ``columns`` (default:
    the records' columns, then the text embedding columns); ValueError naming the available
    columns for an unknown one (:class:`pipeline.consume.columns.ColumnSelection`)."""
    sel = ColumnSelection(rd, columns)
    text = _Text(rd, sel.text_columns) if sel.text_columns else None
    return sel.columns, sel.record_columns, text


def _schema(rd: RecordsDir, file: int, text: _Text | None) -> pa.Schema:
    """The records schema of file number ``file`` (its metadata kept), with the text columns."""
    schema = rd.footers[file].schema.to_arrow_schema()
    if text is None:
        return schema
    return pa.schema([*schema, *text.schema], metadata=schema.metadata)


def _read(table: pa.Table, columns: Sequence[str], text: _Text | None, shard: str) -> pa.Table:
    """A row group's record columns with the text columns joined, as ``columns``."""
    return (table if text is None else text.join(table, shard)).select(list(columns))


def _examples(
    paths: list[str],
    fs,
    columns: tuple[str, ...],
    names: Sequence[str] | None = None,
    read: tuple[str, ...] | None = None,
    text: _Text | None = None,
) -> Iterator[dict]:
    """One dict per record, read one row group at a time (the generator of to_hf_dataset);
    ``read``: the record columns to read (default ``columns``), ``text``: the text join."""
    for path in paths:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(g, columns=list(read or columns))
                _check_labels(table, names, path)
                table = _read(table, columns, text, text.shards[path] if text else "")
                block = table_to_numpy(table)
                n = len(block[columns[0]])
                # tensors as numpy; scalars and conditioning columns as Python values, nulls None
                rows = [
                    (c, block[c] if block[c].ndim > 1 else table.column(c).to_pylist())
                    for c in columns
                ]
                for i in range(n):
                    yield {c: v[i] for c, v in rows}


def _fingerprint(rd: RecordsDir, columns: list[str], text: _Text | None) -> str:
    infos = rd.fs.get_file_info([rd.path(i) for i in range(len(rd.files))])
    state = {
        "v": CACHE_VERSION,
        "uri": rd.uri,
        "columns": columns,
        "config_hash": rd.description.config_hash,
        "files": [
            [name, info.size, info.mtime_ns, footer.num_rows]
            for name, info, footer in zip(rd.files, infos, rd.footers)
        ],
    }
    if text is not None:  # the joined text tables: a changed one is read again
        from pipeline.output.text_store import table_name

        names = sorted({table_name(s) for s in text.shards.values()})
        tables = rd.fs.get_file_info([posixpath.join(rd.root, n) for n in names])
        state["text"] = [[n, i.size, i.mtime_ns] for n, i in zip(names, tables)]
    return "ddpm-" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


def to_hf_dataset(
    dir,
    columns: Sequence[str] | None = None,
    *,
    cache_dir: str | None = None,
    filesystem=None,
    num_proc: int | None = None,
    bucket: str | None = None,
    **from_generator_kwargs,
):
    """The records of ``dir`` as a ``datasets.Dataset`` with ArrayND tensor features.

    Reads one row group at a time (bounded memory) into ``datasets``' Arrow cache
    (``cache_dir``, default ``~/.cache/huggingface/datasets``); a later call on the same,
    unchanged files and columns reuses it. Refuses mixed processes like PrecomputedDataset.
    ``num_proc`` splits the files over processes; other keywords go to ``Dataset.from_generator``.
    ``bucket``: ``"HxW"``, the one aspect-ratio bucket to load (required for a bucketed
    directory: a ``datasets.Dataset`` has one shape per column). With text embeddings their
    columns are joined to each record (module docstring); ``columns`` may name them.
    """
    datasets = _import_datasets()
    rd = RecordsDir(dir, filesystem)
    files = _bucket_files(rd, bucket)
    cols, read, text = _selection(rd, columns)
    features = hf_features(_schema(rd, files[0], text), cols)
    names = class_names(rd.schema)
    paths = [rd.path(i) for i in files]
    ds = datasets.Dataset.from_generator(
        _examples,
        features=features,
        cache_dir=cache_dir,
        # Only ``paths`` is a list: datasets shards list-valued gen_kwargs over num_proc.
        gen_kwargs={
            "paths": paths,
            "fs": rd.fs,
            "columns": tuple(cols),
            "names": names and tuple(names),  # a tuple: lists are sharded over num_proc
            "read": tuple(read),
            "text": text,
        },
        num_proc=num_proc if num_proc and len(paths) > 1 else None,
        fingerprint=_fingerprint(rd, cols + ([f"bucket={bucket}"] if bucket else []), text),
        **from_generator_kwargs,
    )
    return ds


def _bucket_files(rd: RecordsDir, bucket: str | None) -> list[int]:
    """The numbers of the files of ``bucket`` (all files without buckets); ValueError naming the
    buckets when a bucketed directory gets none or an unknown one."""
    buckets = sorted({b for i in range(len(rd.files)) if (b := rd.bucket_of(i))})
    if not buckets:
        if bucket is not None:
            raise ValueError(f"bucket={bucket!r}: {rd.uri} has no aspect-ratio buckets")
        return list(range(len(rd.files)))
    files = [i for i in range(len(rd.files)) if rd.bucket_of(i) == bucket]
    if not files:
        raise ValueError(
            f"{rd.uri} holds aspect-ratio buckets, each of its own shape, and a datasets.Dataset "
            f"has one shape per column: pass bucket= one of {buckets}"
            + (f" (got {bucket!r})" if bucket is not None else "")
        )
    return files


def export_hf_parquet(
    dir,
    out,
    columns: Sequence[str] | None = None,
    *,
    filesystem=None,
    compression: str = "zstd",
) -> list[str]:
    """Rewrite the records of ``dir`` as datasets-readable Parquet under ``out`` (path or URI).

    One output file per input file, same names and row groups, written to a temporary name and
    moved into place. The schema keeps the ``ddpm`` metadata and adds ``datasets``' features.
    An ``out`` that is ``dir`` itself or holds records (a manifest of pipeline.precompute, or a
    records file) is refused: the export would overwrite them. Returns the written file names.
    Then, e.g.::

        datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train")

    With aspect-ratio buckets, one ``datasets`` config per bucket: the files of bucket ``HxW``
    go to ``HxW/<name>`` (returned with that prefix) and ``README.md`` lists the configs
    (``load_dataset(out, "HxW")``). With text embeddings their columns are joined to each
    record (module docstring); ``columns`` may name them.
    """
    rd = RecordsDir(dir, filesystem)
    cols, read, text = _selection(rd, columns)
    ddpm = (rd.schema.metadata or {}).get(records.METADATA_KEY)
    target = OutputDir(str(out))
    _refuse_records_target(rd, target)
    target.makedirs()
    written, configs = [], {}
    for i, file in enumerate(rd.files):
        bucket = rd.bucket_of(i)
        name = file if bucket is None else f"{bucket}/{file}"
        if bucket is not None and bucket not in configs:
            target.makedirs(bucket)
            configs[bucket] = rd.shapes[i]
        features = hf_features(_schema(rd, i, text), cols)
        schema = features.arrow_schema
        file_meta = rd.footers[i].schema.to_arrow_schema().metadata or {}
        meta = {
            **(schema.metadata or {}),
            records.METADATA_KEY: file_meta.get(records.METADATA_KEY, ddpm),
        }
        file_schema = schema.with_metadata(meta)
        tmp = target.tmp_name(name)
        with pq.ParquetWriter(
            target.path(tmp), file_schema, filesystem=target.fs, compression=compression
        ) as writer:
            for g in range(rd.footers[i].num_row_groups):
                unit = Unit(i, g, rd.footers[i].row_group(g).num_rows)
                table = rd.read(unit, read)
                _check_labels(table, class_names(rd.schema), rd.display(name))
                table = to_hf_table(_read(table, cols, text, rd.shard_of(i)), features)
                writer.write_table(
                    table.replace_schema_metadata(meta), row_group_size=unit.num_rows or None
                )
        target.commit(tmp, name)
        written.append(name if bucket is not None else posixpath.basename(name))
    if configs:
        target.write_bytes("README.md", _card(configs).encode())
        log.warning(
            "%s holds %d aspect-ratio buckets: exported as one datasets config per bucket "
            "(%s), listed in %s; load one with datasets.load_dataset(%r, %r)",
            rd.uri, len(configs), ", ".join(sorted(configs)), target.display("README.md"),
            target.display(), sorted(configs)[0],
        )  # fmt: skip
    return written


def _card(configs: dict) -> str:
    """A dataset card whose YAML header declares one ``datasets`` config per bucket."""
    lines = ["---", "configs:"]
    for bucket in sorted(configs, key=lambda b: tuple(int(x) for x in b.split("x"))):
        lines += [f"- config_name: {bucket}", f"  data_files: {bucket}/*.parquet"]
    lines += ["---", "", "Precomputed diffusion records with aspect-ratio buckets: one config "
              "per bucket, since a datasets Array3D has one shape.", "", "| config | sample "
              "shape |", "|---|---|"]  # fmt: skip
    lines += [f"| {b} | {list(configs[b])} |" for b in sorted(configs)]
    return "\n".join(lines) + "\n"


def _refuse_records_target(rd: RecordsDir, target: OutputDir) -> None:
    """ValueError when exporting into ``target`` would write over records: it is the records
    directory itself, or holds a precompute manifest or records files (HF exports may be
    overwritten)."""
    same = target.fs.type_name == rd.fs.type_name and _real(target) == _real(rd)
    why = f"it is the records directory {rd.uri}" if same else None
    if why is None and target.exists(MANIFEST):
        why = f"it holds {target.display(MANIFEST)}: a records directory of pipeline.precompute"
    for name in [] if why else target.data_files():
        try:
            with target.fs.open_input_file(target.path(name)) as f:
                records.records_metadata(pq.read_schema(f))
        except (pa.ArrowException, OSError, ValueError):
            continue  # not records (an earlier export, another Parquet file)
        why = f"{target.display(name)} is a records file"
        break
    if why is not None:
        raise ValueError(
            f"refused to export into {target.display()}: {why}, and the export would overwrite "
            "records; export to another directory (e.g. a new folder beside it)"
        )


def _real(d) -> str:
    """A directory's path with symbolic links resolved on a local filesystem."""
    return os.path.realpath(d.root) if isinstance(d.fs, pafs.LocalFileSystem) else d.root
