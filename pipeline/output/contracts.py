"""What a shard's processing hands on across processes, as typed contracts.

* :class:`ShardResult`: what a worker returns to the driver for a shard it wrote but did not
  commit (its stream broke after some samples: the driver commits or discards it), and what
  :func:`pipeline.output.commit.commit` takes. Its data files are :class:`DataFile` entries still
  under their temporary names.
* :class:`CommitMarker`: the commit point on disk, ``_shards/<shard>.json``, written last by
  :func:`pipeline.output.commit.commit` and read by resume, the manifest and the validator. It is
  versioned (``format``): markers written before the field existed read as format 1, and a
  marker's fields that this version does not know are kept (``extra``) and written back as they
  were.

Both convert to and from plain JSON (:meth:`to_json`, :meth:`from_json`); no module needs to
know their keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

MARKER_FORMAT = 2  # 1: markers without a "format" key (every marker before this module)


@dataclass
class DataFile:
    """One Parquet file of a shard's records: its final ``name``, its ``records`` and, once
    committed, its ``bytes`` and ``checksum`` (``"sha256:<hex>"``); with aspect-ratio buckets
    its ``bucket`` [H, W] and sample ``shape``. ``tmp``: its temporary name before the commit."""

    name: str
    records: int | None = None
    bytes: int | None = None
    checksum: str | None = None
    bucket: list[int] | None = None
    shape: list[int] | None = None
    tmp: str | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.bucket is not None:
            out.update(bucket=list(self.bucket), shape=self.shape)
        out.update(records=self.records, bytes=self.bytes, checksum=self.checksum)
        return out

    @classmethod
    def from_json(cls, d: dict) -> DataFile:
        return cls(
            name=d["name"],
            records=d.get("records"),
            bytes=d.get("bytes"),
            checksum=d.get("checksum"),
            bucket=d.get("bucket"),
            shape=d.get("shape"),
        )


@dataclass
class ShardResult:
    """A worker's account of one shard (see the module docstring). ``files``: its data files (one
    ``<shard>.parquet``, or one per bucket); ``side_files``: (temporary, final) names of its
    per-sample tables (text embeddings), committed before the data files."""

    url: str
    shard: str
    status: str = "ok"
    samples: int = 0
    records: int = 0
    rejected: int = 0
    rejects: list = field(default_factory=list)
    error: str | None = None
    retryable: bool = True
    seconds: float = 0.0
    worker: dict = field(default_factory=dict)
    config_hash: str | None = None
    source_identity: Any = None
    library_version: str | None = None
    files: list[DataFile] = field(default_factory=list)
    bucketed: bool = False
    side_files: list[tuple[str, str]] = field(default_factory=list)
    text: dict | None = None

    def temporaries(self) -> list[str]:
        """The temporary names of every file this result still holds (data and side files)."""
        return [f.tmp for f in self.files if f.tmp] + [tmp for tmp, _ in self.side_files]


@dataclass
class CommitMarker:
    """A committed shard (see the module docstring). ``file``/``bytes``/``checksum``: its one
    data file; a bucketed shard lists ``files`` instead (``bytes`` and ``records`` are then the
    sums). ``side_files``: {name: {bytes, checksum}}. Older markers lack ``checksum`` (checked by
    size) or ``bytes`` too (by row count)."""

    url: str
    status: str
    samples: int = 0
    records: int | None = None
    rejected: int = 0
    error: str | None = None
    seconds: float | None = None
    worker: dict | None = None
    config_hash: str | None = None
    source_identity: Any = None
    library_version: str | None = None
    file: str | None = None
    bytes: int | None = None
    checksum: str | None = None
    files: list[DataFile] | None = None
    side_files: dict | None = None
    text: dict | None = None
    format: int = MARKER_FORMAT
    extra: dict = field(default_factory=dict)

    def data_files(self, shard: str) -> list[DataFile]:
        """Its data files: the listed ``files``, or the one file (named ``<shard>.parquet``
        when an old marker does not name it)."""
        if self.files is not None:
            return list(self.files)
        name = self.file or f"{shard}.parquet"
        return [DataFile(name, self.records, self.bytes, self.checksum)]

    def attested(self) -> CommitMarker:
        """This marker without what only describes the run that wrote it (:data:`_RUN_FIELDS`:
        its URL, worker, timings, text counts, fields this version does not know): what the
        committed files are checked against (status, records, config hash, the files' names,
        sizes and checksums), small enough for the validator's driver to keep one per shard."""
        return replace(self, **dict.fromkeys(_RUN_FIELDS), extra={})

    def to_json(self) -> dict:
        """The marker's JSON: every field of this format, the optional ones when set, then the
        unknown fields it was read with."""
        out: dict[str, Any] = {"format": self.format}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("format", "extra") or (value is None and f.name in _OPTIONAL):
                continue
            out[f.name] = [d.to_json() for d in value] if f.name == "files" else value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> CommitMarker:
        """A marker of any format (a manifest entry's ``attempts`` is kept in ``extra``).
        ValueError saying what is wrong when ``d`` does not have a marker's shape (the caller
        names the file)."""
        problem = _shape_problem(d)
        if problem is not None:
            raise ValueError(problem)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs.setdefault("url", None)
        kwargs.setdefault("status", None)
        kwargs["format"] = int(d.get("format", 1))
        if kwargs.get("files") is not None:
            kwargs["files"] = [DataFile.from_json(f) for f in kwargs["files"]]
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})


def _shape_problem(d) -> str | None:
    """What keeps the JSON value ``d`` from being read as a marker, or None."""
    if not isinstance(d, dict):
        return f"a JSON {type(d).__name__}, not an object"
    files = d.get("files")
    if files is not None and not (
        isinstance(files, list)
        and all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in files)
    ):
        return f"its 'files' {str(files)[:80]} is not a list of entries with a 'name'"
    sides = d.get("side_files")
    if sides is not None and not (
        isinstance(sides, dict) and all(isinstance(v, dict) for v in sides.values())
    ):
        return f"its 'side_files' {str(sides)[:80]} is not an object of {{bytes, checksum}} entries"
    fmt = d.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int | str) or not str(fmt).isdigit():
        return f"its 'format' {fmt!r} is not a version number"
    return None


# What describes the run that wrote a marker, not the files it committed (see
# :meth:`CommitMarker.attested`).
_RUN_FIELDS = ("url", "error", "seconds", "worker", "source_identity", "library_version", "text")

# Left out of a marker's JSON when unset: the single-file fields of a bucketed shard, and what
# only some shards have.
_OPTIONAL = frozenset({"file", "bytes", "checksum", "files", "side_files", "text"})
