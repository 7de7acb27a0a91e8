"""The process description in every records file: the ``ddpm`` key of its Parquet schema's
metadata (:data:`pipeline.output.records.METADATA_KEY`), written by :func:`make_metadata` (on the
driver, from the config: :func:`pipeline.run.metadata.dataset_metadata`) and read back by the
workers, the loader and the validator (:func:`process_metadata`, :func:`records_metadata`), which
rebuild the schedule, forward process and keyed noise from it (:func:`schedule_from_metadata`,
:func:`process_from_metadata`, :func:`noise_from_metadata`). Its keys are listed in the module
docstring of :mod:`pipeline.output.records`; :data:`PROCESS_KEYS` must agree across a dataset's
files.

In code the description is a :class:`ProcessMetadata`, the third typed contract across processes
(with :mod:`pipeline.output.contracts`' ShardResult and CommitMarker): built on the driver, handed
to every actor, written as JSON into every file's schema and into the manifest's ``process``
block. It lives here, with the functions that build, read, compare and interpret it (one concept,
one module). Its JSON (:meth:`ProcessMetadata.to_json`) is exactly the dict written before the
class existed (same keys, same omissions), so records stay bit-identical; the public functions
below take either the class or that dict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa

from pipeline.output.records import (
    FORMAT,
    HF_METADATA_KEY,
    METADATA_KEY,
    TENSOR_COLUMNS,
    check_dtype,
    is_tensor,
)

# The formats of the process description this version reads (and the one it writes, FORMAT).
SUPPORTED_FORMATS = (FORMAT,)


@dataclass(eq=False)
class ProcessMetadata:
    """The process description of a dataset, or of one file (see the module docstring).

    ``format``: the record format (``ddpm-records/1``); ``schedule``: the process's
    ``describe()`` (a DDPM schedule, or a flow process: ``family``); ``noise``: the KeyedNoise's
    description; ``dtype``: the tensors' ``output.dtype``; ``shape``: the sample shape [C, ...]
    (with buckets the largest); ``store_x0``; ``config_hash``. Optional (None: not written):
    ``source`` (the input's description; a file's adds its ``url`` and ``shard``),
    ``library_version``, ``encoder`` (a VAE's identity), ``conditioning`` (the kept members),
    ``targets`` (the extra targets), ``buckets`` (each bucket and its sample shape), ``text``
    (the text encoders' identity), ``grid`` (a flow file's own grid). ``extra``: the fields this
    version does not know, kept and written back as they were. The nested descriptions are the
    plain dicts their own modules define.

    Read from JSON (:meth:`from_json`), it writes back exactly what it read (:meth:`to_json`):
    the same keys in the same order, a key absent when it was (a file without ``config_hash``,
    ``store_x0`` or ``format``, written by an older version or by hand) and null when it was
    null. ``_keys`` records the keys read (None: built in code, written as :meth:`to_json`
    says). Two descriptions are equal when their JSON is.
    """

    schedule: dict
    noise: dict
    dtype: str
    shape: list[int]
    store_x0: bool = False
    config_hash: str | None = None
    source: dict | None = None
    library_version: str | None = None
    encoder: dict | None = None
    conditioning: dict | None = None
    targets: list[str] | None = None
    buckets: list[dict] | None = None
    text: dict | None = None
    grid: dict | None = None
    format: str = FORMAT
    extra: dict = field(default_factory=dict)
    _keys: tuple[str, ...] | None = field(default=None, repr=False)

    def __eq__(self, other):
        if not isinstance(other, ProcessMetadata):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # mutable

    @property
    def family(self) -> str:
        """The process family: ``ddpm`` (no ``family`` in its schedule) or ``flow``."""
        return (self.schedule or {}).get("family", "ddpm")

    @property
    def num_timesteps(self) -> int:
        return int(self.schedule["num_timesteps"])

    @property
    def draws_per_sample(self) -> int:
        return int(self.noise["draws_per_sample"])

    def to_json(self) -> dict:
        """The description's JSON. Built in code: ``format``, the seven process fields, the
        optional ones that are set (the dict :func:`make_metadata` wrote before this class: same
        keys, same order, same omissions). Read by :meth:`from_json`: the dict it was read from,
        key for key and in its order (a field set since is written, after them, if it differs
        from what its absence reads as), with the unknown fields. Every writer sorts the keys
        (a schema's ``ddpm`` JSON, the manifest), so the bytes do not depend on the order."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if self._keys is None:
                written = value is not None or name not in _OPTIONAL
            else:  # as read; a field set since when it differs from what absence reads as
                written = name in self._keys or value != _ABSENT.get(name)
            if written:
                out[name] = value
        out.update(self.extra)
        if self._keys is None:
            return out
        order = {k: i for i, k in enumerate(self._keys)}
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))

    @classmethod
    def from_json(cls, d: Mapping | ProcessMetadata) -> ProcessMetadata:
        """The description in a file's schema or a manifest's ``process`` block, of any format
        this version reads (one without ``format`` reads as the current one); ValueError for a
        newer format, naming the supported ones, or when a process field is missing."""
        if isinstance(d, ProcessMetadata):
            return d
        fmt = d.get("format", FORMAT)
        if fmt not in SUPPORTED_FORMATS:
            raise ValueError(
                f"process metadata format {fmt!r} is not supported: this version of pipeline "
                f"reads {list(SUPPORTED_FORMATS)}; read these records with the pipeline version "
                "that wrote them (their library_version) or a newer one"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(
                f"process metadata without {missing}: not the 'ddpm' description written by "
                "pipeline.precompute (it has the keys "
                f"{list(_REQUIRED)})"
            )
        kwargs = {k: v for k, v in d.items() if k in _FIELDS}
        extra = {k: v for k, v in d.items() if k not in _FIELDS}
        return cls(**kwargs, extra=extra, _keys=tuple(d))


# The fields written as JSON keys (format first), in the order a description built in code
# writes them.
_FIELDS = ("format",) + tuple(
    f.name for f in fields(ProcessMetadata) if f.name not in ("format", "extra", "_keys")
)
# Built in code, written only when set; the others are written always.
_OPTIONAL = frozenset(
    {"source", "library_version", "encoder", "conditioning", "targets", "buckets", "text", "grid"}
)
# What a field reads as when its key is absent (the required ones are never absent).
_ABSENT = {**dict.fromkeys(_OPTIONAL), "format": FORMAT, "store_x0": False, "config_hash": None}
_REQUIRED = ("schedule", "noise", "dtype", "shape")


def make_metadata(
    *,
    schedule,
    noise,
    dtype: str,
    shape: Sequence[int],
    store_x0: bool,
    config_hash: str,
    source: Mapping | None = None,
    library_version: str | None = None,
    encoder: Mapping | None = None,
    conditioning: Mapping | None = None,
    targets: Sequence[str] = (),
    buckets: Sequence[Mapping] | None = None,
) -> dict:
    """The ``ddpm`` process description of a dataset (see the module docstring): what a reader
    needs to interpret and regenerate every record. ``schedule`` is a NoiseSchedule or a
    :class:`pipeline.noising.process.GaussianProcess` (anything with ``describe()``), ``noise`` a
    KeyedNoise; ``targets``: the extra target columns (``output.targets`` but ``x_0``, which is
    ``store_x0``; recorded only when not empty); ``source`` describes the input (decoding,
    normalisation; the shard URL is added per file); ``encoder`` identifies the VAE of latent
    records (see :mod:`pipeline.encode.encoder`); ``conditioning`` lists the kept members and their
    columns' types (:meth:`pipeline.read.conditioning.Conditioning.describe`); ``buckets`` the
    aspect-ratio buckets and their sample shapes (:func:`pipeline.read.buckets.describe_buckets`;
    ``shape`` is then the largest of them). Returned as its JSON dict
    (:meth:`ProcessMetadata.to_json`; :meth:`ProcessMetadata.from_json` reads it)."""
    return ProcessMetadata(
        format=FORMAT,
        schedule=schedule.describe(),
        noise=noise.describe(),
        dtype=check_dtype(dtype),
        shape=[int(s) for s in shape],
        store_x0=bool(store_x0),
        config_hash=config_hash,
        source=None if source is None else dict(source),
        library_version=library_version,
        encoder=None if encoder is None else dict(encoder),
        conditioning=None if conditioning is None else dict(conditioning),
        targets=sorted(targets) if targets else None,
        buckets=None if buckets is None else [dict(b) for b in buckets],
    ).to_json()


def process_metadata(schema: pa.Schema) -> dict:
    """The ``ddpm`` JSON of a file's schema; ValueError when the file has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            "no 'ddpm' process metadata in this Parquet schema: not written by pipeline.precompute"
        )
    return json.loads(raw)


def records_metadata(schema: pa.Schema) -> dict:
    """:func:`process_metadata` of a file that must be records; ValueError saying what it is
    otherwise: no such metadata, or a Hugging Face export of records (``pipeline.consume.hf``),
    which keeps the metadata but holds the tensor columns as nested lists."""
    meta = process_metadata(schema)
    lists = [n for n in TENSOR_COLUMNS if n in schema.names and not is_tensor(schema.field(n).type)]
    if lists or HF_METADATA_KEY in (schema.metadata or {}):
        raise ValueError(
            "not records but a Hugging Face datasets export of records (pipeline.consume.hf."
            f"export_hf_parquet: tensor columns {lists or 'ArrayND'} as nested lists); read it "
            "with datasets.load_dataset('parquet', ...), or load the records directory it was "
            "exported from"
        )
    return meta


# Keys of the process metadata that must agree across every file of one dataset.
PROCESS_KEYS = (
    "format", "schedule", "noise", "dtype", "shape", "store_x0", "config_hash", "encoder",
    "conditioning", "text", "targets", "buckets",
)  # fmt: skip


def same_process(a: Mapping | ProcessMetadata, b: Mapping | ProcessMetadata) -> list[str]:
    """The process keys on which two descriptions (:class:`ProcessMetadata` or its JSON dict)
    differ (empty when they describe one process)."""
    a, b = _as_json(a), _as_json(b)
    return [k for k in PROCESS_KEYS if a.get(k) != b.get(k)]


def _as_json(meta: Mapping | ProcessMetadata) -> Mapping:
    return meta.to_json() if isinstance(meta, ProcessMetadata) else meta


def _entry(meta: Mapping | ProcessMetadata, name: str):
    """One entry of a description given as the class or as a (possibly partial) dict."""
    return getattr(meta, name) if isinstance(meta, ProcessMetadata) else meta[name]


def schedule_from_metadata(meta: Mapping | ProcessMetadata):
    """Rebuild the NoiseSchedule a file was written with (``meta``: its description or its
    JSON dict, of which only ``schedule`` is read); ValueError if its betas hash differs,
    or if the file is not DDPM (see :func:`process_from_metadata` for every family)."""
    from pipeline.noising.schedule import make_schedule

    s = _entry(meta, "schedule")
    if s.get("family", "ddpm") != "ddpm":
        raise ValueError(
            f"these records are {s['family']!r}, not DDPM: they have no beta schedule; use "
            "pipeline.output.records.process_from_metadata"
        )
    sched = make_schedule(
        s["name"], s["num_timesteps"], zero_terminal_snr=s["zero_terminal_snr"], **s["params"]
    )
    if sched.betas_sha256 != s["betas_sha256"]:
        raise ValueError(
            f"schedule {s['name']!r} rebuilt here does not match the file's betas hash "
            f"({sched.betas_sha256[:12]} != {s['betas_sha256'][:12]}): library versions differ"
        )
    return sched


def process_from_metadata(meta: Mapping | ProcessMetadata, shape: Sequence[int] | None = None):
    """Rebuild the :class:`pipeline.noising.process.GaussianProcess` of a file (any family) from its
    metadata (a :class:`ProcessMetadata` or its JSON dict) and sample ``shape`` (default the
    metadata's; a dynamic shift depends on it)."""
    from pipeline.noising.process import from_metadata

    return from_metadata(dict(_as_json(meta)), shape)


def noise_from_metadata(meta: Mapping | ProcessMetadata):
    """Rebuild the KeyedNoise that drew a file's (t, eps) (``meta``: a :class:`ProcessMetadata`
    or its JSON dict)."""
    from pipeline.noising.noise import KeyedNoise

    steps = _entry(meta, "schedule")["num_timesteps"]
    return KeyedNoise.from_description(_entry(meta, "noise"), steps)
