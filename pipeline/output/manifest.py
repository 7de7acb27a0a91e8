"""The layout of an output directory, on any pyarrow filesystem (local, s3://, gs://, ...).

::

    output.dir/
      <shard_id>.parquet            records of one input shard (committed by rename)
      _text/<shard_id>.parquet      its text embeddings, one row per sample (text=..., text_store)
      _text/_uncond.parquet         the empty prompt's embedding, once per dataset (its
                                    bytes and checksum in the manifest's side_files)
      <shard_id>.<H>x<W>.parquet    with aspect-ratio buckets: its records of bucket H x W, one
                                    file per bucket the shard uses (pipeline/read/buckets.py)
      _shards/<shard_id>.json       the shard's commit marker: its summary (written last)
      _shards/<shard_id>.rejects.jsonl   the shard's rejected samples
      _shards/_index.seg-<n>.jsonl  during a run: markers committed since the last periodic write
      _manifest.json                resolved config + per-shard summaries + totals
      rejects.jsonl                 every rejected sample / failed shard, one JSON per line
      validation/                   report of pipeline.validate

A shard counts as done when its marker exists; the marker is written after its Parquet files and
rejects are in place, so a reader never sees a shard half-committed. The marker records the
file's size (``bytes``) and ``checksum`` (``"sha256:<hex>"`` of its bytes): resume redoes a shard
whose file fails them and the validator's ``completeness`` fails it, naming the file; its
``side_files`` ({name: {bytes, checksum}}) do the same for the shard's text table. Markers
written before checksums existed have none: their files are checked by size (or row count).
A bucketed shard's marker lists its ``files`` instead (``name``, ``bucket`` [H, W], ``shape``,
``records``, ``bytes``, ``checksum`` each; ``bytes`` and ``records`` are then the sums): all of
them are in place before the marker is written, so a shard killed between two of its bucket files
has no marker and none of its files is trusted (:func:`shard_files` reads both forms).
The dataset's own files (:data:`DATASET_FILES`: with text embeddings the empty prompt's table,
written by the actors at setup) have their ``bytes`` and ``checksum`` in the manifest's
``side_files`` ({name: {bytes, checksum}}), checked by resume and the validator the same way.
On a file system every write goes to a temporary name first and is then moved into place. On
an object store (``s3://``, ``gs://``) an object becomes visible only when its upload completes,
so a killed writer leaves nothing behind, while a "move" is a copy (S3 CopyObject: 5 GB at most)
plus a delete: there, files are written under their final name (:attr:`OutputDir.atomic_writes`).

The manifest, and the marker index (what keeps the driver's cost per shard constant):

* While a run goes on (``"complete": false``, ``"shards_scope": "uncommitted"``) the manifest,
  rewritten every 10 s, holds the header, the totals and only the shards not committed yet
  (pending, or failed attempts): its size does not grow with the committed shards, whose
  summaries are their markers. Each periodic write also writes an index segment
  ``_shards/_index.seg-<n>.jsonl`` (one JSON line ``{"id": ..., "marker": {...}}`` per marker
  committed since the previous segment; the first segment of a run holds the markers it
  resumed from).
* When the run ends (``"complete": true``, ``"shards_scope": "all"``) the manifest holds every
  shard of ``source.urls`` (committed ones: the marker's summary plus ``attempts``): it is the
  compacted index, and the segments are deleted. Readers of a finished dataset (the validator,
  tests) read ``manifest["shards"]`` as before.
* :meth:`OutputDir.markers` (resume) lists ``_shards/`` once and reads the final manifest and the
  segments; a marker is taken from them when its listed size equals the size of the indexed
  summary re-encoded and it is older than the index file that holds it (a marker rewritten
  since is newer). Only the other markers are read one by one.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterable

import pyarrow.fs as pafs

from pipeline.fs import resolve
from pipeline.output.contracts import CommitMarker

MANIFEST = "_manifest.json"
REJECTS = "rejects.jsonl"
SHARDS = "_shards"
TEXT = "_text"  # per-sample text embedding tables (pipeline.output.text_store)
UNCOND = f"{TEXT}/_uncond.parquet"  # the empty prompt's embedding, once per dataset
DATASET_FILES = (UNCOND,)  # files of no shard: their checksums are the manifest's side_files
# The index segments of the markers (module doc): _shards/_index.seg-<n>.jsonl
SEGMENT = re.compile(r"^_index\.seg-(?P<n>\d+)\.jsonl$")
MANIFEST_FORMAT = "ddpm-manifest/1"
# A commit marker's ``checksum`` of its Parquet file: "sha256:<hex>" (OutputDir.checksum).
CHECKSUM_ALGORITHM = "sha256"
CHECKSUM_CHUNK = 4 << 20
# Statuses of a shard: committed ones are never redone on resume.
COMMITTED = ("ok", "partial")
OBJECT_STORES = {"s3", "s3a", "gcs", "gs"}  # filesystems whose uploads are atomic


# A shard id, as pipeline.read.source.shard_id makes it: characters of ID_CHARS, not starting or
# ending with a dot, so never "/", "..", "." or an absolute path. An id read back from disk
# (the manifest, the markers' names) is checked against it before it names a file.
ID_CHARS = "A-Za-z0-9._-"
SHARD_ID = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")


def is_shard_id(value) -> bool:
    """Whether ``value`` is a shard id :func:`pipeline.read.source.shard_id` can make."""
    return isinstance(value, str) and SHARD_ID.fullmatch(value) is not None


# A temporary file of this pipeline: "." + the final name + ".tmp-" + 12 hex digits (tmp_name).
TEMPORARY = re.compile(r"^\.(?P<final>[^/]+)\.tmp-[0-9a-f]{12}$")


class OutputWriteError(OSError):
    """Writing or committing a file of the output directory failed; the message names the file."""


class OutsideOutputError(ValueError):
    """A name that does not resolve inside the output directory was about to be deleted."""


class CorruptFileError(ValueError):
    """A file of the output directory is not what this pipeline writes (not JSON, wrong shape);
    the message names the file and the fix."""


def shard_files(shard: str, summary: dict) -> list[dict]:
    """The data files a committed shard's marker (or manifest entry) records, as JSON entries
    (:meth:`pipeline.output.contracts.CommitMarker.data_files`), each name checked to be one of the
    shard's (:func:`check_own_file`)."""
    files = CommitMarker.from_json(summary).data_files(shard)
    for f in files:
        check_own_file(shard, f.name)
    return [f.to_json() for f in files]


def parse_marker(out: OutputDir, shard: str, body) -> CommitMarker:
    """The commit marker of ``shard`` from its JSON ``body``, of any format
    (:meth:`pipeline.output.contracts.CommitMarker.from_json`); :class:`CorruptFileError` naming
    its file and what is wrong when ``body`` does not have a marker's shape."""
    try:
        return CommitMarker.from_json(body)
    except ValueError as exc:
        raise out._corrupt(OutputDir.marker_name(shard), f"not a commit marker ({exc})") from None


def check_own_file(shard: str, name, side: bool = False) -> None:
    """:class:`CorruptFileError` naming the shard's marker unless ``name``, read from it, is a
    file name the driver makes for ``shard``: ``<shard>.parquet`` or ``<shard>.<H>x<W>.parquet``
    (``side``: its text table ``_text/<shard>.parquet``). Resume deletes the files a marker
    names, so a damaged or crafted marker must not name any other file."""
    from pipeline.read.buckets import BUCKET_FILE

    if side:
        ok = name == f"{TEXT}/{shard}.parquet"
    else:
        m = BUCKET_FILE.match(name) if isinstance(name, str) else None
        ok = name == OutputDir.data_name(shard) or (m is not None and m["shard"] == shard)
    if not ok:
        raise CorruptFileError(
            f"{OutputDir.marker_name(shard)} names a file {str(name)[:80]!r} that is not one of "
            f"shard {shard!r}: it is damaged or was not written by this pipeline, and no file is "
            "deleted by it; remove it (its shard is then redone) or use another output.dir"
        )


def is_temporary(name: str) -> bool:
    """True for a temporary file name this pipeline writes (see :meth:`OutputDir.tmp_name`)."""
    return TEMPORARY.match(posixpath.basename(name)) is not None


class OutputDir:
    """An output directory addressed by path or URI (``/data/out``, ``s3://bucket/out``)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        if not uri:
            raise ValueError("output.dir is empty: set output.dir=/path/or/uri")
        self.uri = uri
        self.fs, self.root = resolve(uri, filesystem)
        # object stores: an upload is atomic, a rename is a copy; write in place (module doc)
        kind = self.fs.type_name  # "s3", "gcs", or "py::fsspec+('s3', 's3a')" for fsspec ones
        protocols = set(re.findall(r"\w+", kind.partition("fsspec+")[2])) | {kind}
        self.atomic_writes = bool(protocols & OBJECT_STORES)

    def __reduce__(self):  # picklable for Ray: rebuild the filesystem on the other side
        return (OutputDir, (self.uri,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def display(self, *parts: str) -> str:
        """A path to show users: the URI they gave, joined with parts."""
        return posixpath.join(self.uri.rstrip("/"), *parts) if parts else self.uri

    @staticmethod
    def data_name(shard: str) -> str:
        return f"{shard}.parquet"

    @staticmethod
    def marker_name(shard: str) -> str:
        return f"{SHARDS}/{shard}.json"

    @staticmethod
    def rejects_name(shard: str) -> str:
        return f"{SHARDS}/{shard}.rejects.jsonl"

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def size(self, name: str) -> int:
        return self.fs.get_file_info(self.path(name)).size

    def tmp_name(self, name: str) -> str:
        """Where to write ``name`` before :meth:`commit`: a hidden temporary name, or ``name``
        itself on an object store (:attr:`atomic_writes`)."""
        if self.atomic_writes:
            return name
        head, tail = posixpath.split(name)
        return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")

    def commit(self, tmp: str, name: str) -> None:
        """Move a fully written temporary file into place."""
        if tmp != name:
            self.fs.move(self.path(tmp), self.path(name))

    def remove(self, name: str) -> None:
        """Delete the file ``name`` (relative to the root), the one place the project deletes
        an output file; :class:`OutsideOutputError` unless it resolves inside the directory."""
        self.check_inside(name)
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def check_inside(self, name: str) -> None:
        """:class:`OutsideOutputError` unless ``name`` is a normalised relative path (no ``..``,
        not absolute) that resolves, symbolic links followed on a local filesystem, to a file
        under the root."""
        lexical = (
            isinstance(name, str)
            and name not in ("", ".")
            and not name.startswith("/")
            and posixpath.normpath(name) == name
            and ".." not in name.split("/")
        )
        if lexical and isinstance(self.fs, pafs.LocalFileSystem):
            root = os.path.realpath(self.root)
            parent = os.path.realpath(os.path.dirname(self.path(name)))
            lexical = parent == root or parent.startswith(root.rstrip("/") + "/")
        if not lexical:
            raise OutsideOutputError(
                f"refused to delete {name!r}: it does not resolve inside output.dir="
                f"{self.display()} (the pipeline deletes only files it wrote there)"
            )

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file atomically (temporary name, then move)."""
        tmp = self.tmp_name(name)
        with self.fs.open_output_stream(self.path(tmp)) as f:
            f.write(data)
        self.commit(tmp, name)

    def checksum(self, name: str) -> str:
        """``"sha256:<hex>"`` of a file's bytes, streamed (:data:`CHECKSUM_CHUNK` at a time): the
        checksum a commit marker records for its Parquet file (sha256: 1.1 GB/s on one core
        here, faster than blake2b, and it stands against a deliberate rewrite too)."""
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(name)) as f:
            while chunk := f.read(CHECKSUM_CHUNK):
                h.update(chunk)
        return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"

    def file_entry(self, name: str) -> dict:
        """``{"bytes", "checksum"}`` of a file: what a marker or the manifest records of it."""
        return {"bytes": self.size(name), "checksum": self.checksum(name)}

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    @staticmethod
    def encode_json(obj) -> bytes:
        """The bytes :meth:`write_json` writes for ``obj`` (a marker's size is their length):
        indented two levels deep, each deeper value on one line (a manifest's shard entry per
        line), keys sorted. Indenting every level takes json's pure-Python encoder: for a
        manifest of 100,000 shards 1.9x the CPU and 3.4x the peak memory of this."""
        if not isinstance(obj, dict) or not obj:
            return (json.dumps(obj, sort_keys=True) + "\n").encode()
        lines = []
        for key, value in sorted(obj.items()):
            k = json.dumps(key)
            if isinstance(value, dict) and value:
                inner = ",\n".join(
                    f"    {json.dumps(k2)}: {json.dumps(v, sort_keys=True)}"
                    for k2, v in sorted(value.items())
                )
                lines.append(f"  {k}: {{\n{inner}\n  }}")
            else:
                lines.append(f"  {k}: {json.dumps(value, sort_keys=True)}")
        return ("{\n" + ",\n".join(lines) + "\n}\n").encode()

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, self.encode_json(obj))

    def read_json(self, name: str, kind: type = dict):
        """The JSON object (``kind``: dict or list) in ``name``; :class:`CorruptFileError` naming
        the file when it is not valid JSON of that kind."""
        try:
            value = json.loads(self.read_bytes(name))
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._corrupt(name, f"not valid JSON ({exc})") from exc
        if not isinstance(value, kind):
            raise self._corrupt(name, f"a JSON {type(value).__name__}, not a {kind.__name__}")
        return value

    def _corrupt(self, name: str, what: str) -> CorruptFileError:
        return CorruptFileError(
            f"{self.display(name)} is {what}: it is damaged or was not written by this pipeline; "
            "remove it (its shard is then redone) or use output.overwrite=true"
        )

    def write_jsonl(self, name: str, rows: Iterable[dict]) -> None:
        self.write_bytes(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def read_jsonl(self, name: str) -> list[dict]:
        rows = []
        try:
            for line in self.read_bytes(name).decode().splitlines():
                if line:
                    rows.append(json.loads(line))
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._corrupt(name, f"not valid JSON lines ({exc})") from exc
        if not all(isinstance(r, dict) for r in rows):
            raise self._corrupt(name, "JSON lines that are not all objects")
        return rows

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create ``name`` with ``data`` unless it exists; False when it does. Atomic on a local
        filesystem (``O_CREAT | O_EXCL``). Elsewhere (object stores, whose pyarrow clients have no
        conditional put) it checks, writes, and reads back: two writers racing within one
        round trip can both see their own write, the last one wins."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.exists(name):
            return False
        self.write_bytes(name, data)
        return self.read_bytes(name) == data

    def list(self, sub: str = "", dirs: bool = False) -> list[str]:
        """Names (relative to the root) of the files (and with ``dirs`` the directories)
        directly under ``sub``."""
        sel = pafs.FileSelector(self.path(sub), allow_not_found=True)
        kinds = (pafs.FileType.File, pafs.FileType.Directory) if dirs else (pafs.FileType.File,)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type in kinds:
                out.append(posixpath.relpath(info.path, self.root))
        return sorted(out)

    def data_files(self) -> list[str]:
        """Committed Parquet files (temporary files start with a dot and are excluded)."""
        return [n for n in self.list() if n.endswith(".parquet") and not n.startswith(".")]

    def markers_ids(self) -> list[str]:
        """Ids of the shards that have a marker under _shards/ (:class:`CorruptFileError` for a
        marker whose name is no shard id)."""
        names = (posixpath.basename(n) for n in self.list(SHARDS))
        ids = [n[: -len(".json")] for n in names if n.endswith(".json") and n[0] != "."]
        for sid in ids:
            self.check_id(sid, self.marker_name(sid))
        return ids

    def check_id(self, sid, where: str) -> None:
        """:class:`CorruptFileError` naming ``where`` (the file it was read from) unless ``sid``
        is a shard id the driver can make (:data:`SHARD_ID`)."""
        if not is_shard_id(sid):
            raise CorruptFileError(
                f"{self.display(where)} names a shard {str(sid)[:80]!r} that is no shard id "
                "(letters, digits, '.', '_', '-', no path): it is damaged or was not written by "
                "this pipeline, and no file is named after its ids; remove it or use another "
                "output.dir"
            )

    def list_info(self, sub: str = "") -> dict[str, pafs.FileInfo]:
        """Name (relative to the root) -> FileInfo (size, mtime) of the files directly under
        ``sub``: one listing request."""
        sel = pafs.FileSelector(self.path(sub), allow_not_found=True)
        return {
            posixpath.relpath(info.path, self.root): info
            for info in self.fs.get_file_info(sel)
            if info.type == pafs.FileType.File
        }

    def markers(self, manifest: dict | None = None) -> dict[str, dict]:
        """shard id -> committed summary, from the _shards/ markers (a damaged marker raises
        :class:`CorruptFileError` naming it). One listing of _shards/; markers the index
        (``manifest``, the final manifest, and the segments; module doc) holds unchanged are
        not read. ``self.marker_reads`` counts the markers read one by one."""
        listing = self.list_info(SHARDS)
        index = self._marker_index(manifest, listing)
        found, self.marker_reads = {}, 0
        for name, info in sorted(listing.items()):
            base = posixpath.basename(name)
            if not base.endswith(".json") or base[0] == ".":
                continue
            sid = base[: -len(".json")]
            self.check_id(sid, name)
            body, index_mtime = index.get(sid, (None, None))
            if (
                body is not None
                and index_mtime is not None
                and info.mtime_ns is not None
                and info.mtime_ns < index_mtime
                and info.size == len(self.encode_json(body))
            ):
                found[sid] = body
            else:
                found[sid] = self.read_json(name)
                self.marker_reads += 1
        return found

    def _marker_index(self, manifest: dict | None, listing: dict) -> dict[str, tuple]:
        """shard id -> (indexed summary, mtime of the index file that holds it), the newest
        index file winning: the committed entries of a complete manifest, then the segments."""
        index: dict[str, tuple] = {}
        sources = []
        if manifest is not None and manifest.get("complete"):
            mtime = self.fs.get_file_info(self.path(MANIFEST)).mtime_ns
            entries = {}
            for sid, e in manifest.get("shards", {}).items():
                if isinstance(e, dict) and e.get("status") in COMMITTED:
                    entries[sid] = {k: v for k, v in e.items() if k != "attempts"}
            sources.append((mtime, entries))
        for name, info in listing.items():
            if SEGMENT.match(posixpath.basename(name)):
                rows = self.read_jsonl(name)
                entries = {r.get("id"): r.get("marker") for r in rows}
                sources.append((info.mtime_ns, entries))
        for mtime, entries in sorted(sources, key=lambda s: s[0] or 0):
            for sid, body in entries.items():
                if isinstance(sid, str) and isinstance(body, dict):
                    index[sid] = (body, mtime)
        return index

    def write_segment(self, summaries: dict[str, dict]) -> str:
        """Write an index segment of these markers' summaries (module doc); returns its name."""
        name = f"{SHARDS}/_index.seg-{time.time_ns():020d}.jsonl"  # one driver: unique
        self.write_jsonl(name, ({"id": k, "marker": v} for k, v in summaries.items()))
        return name

    def remove_segments(self) -> None:
        """Delete the index segments (once the final manifest holds what they held)."""
        for name in self.list(SHARDS):
            if SEGMENT.match(posixpath.basename(name)):
                self.remove(name)

    def read_manifest(self) -> dict | None:
        """The manifest, None when there is none; :class:`CorruptFileError` when the file is not
        a manifest of this pipeline."""
        if not self.exists(MANIFEST):
            return None
        manifest = self.read_json(MANIFEST)
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(
            manifest.get("shards"), dict
        ):
            raise self._corrupt(MANIFEST, f"not a {MANIFEST_FORMAT} manifest")
        for sid in manifest["shards"]:
            self.check_id(sid, MANIFEST)
        return manifest

    def own_names(self, manifest: dict | None) -> set[str]:
        """The files of this directory that this pipeline wrote and recorded: the manifest, the
        rejects, every marker and rejects part under _shards/, the data files the markers and the
        manifest name, and this pipeline's temporary files. Nothing else is ever deleted: ids are
        checked (:meth:`check_id`), and :meth:`remove` refuses a name outside the directory."""
        names = {MANIFEST, REJECTS}
        names.update(n for n in self.list(SHARDS) if n.endswith((".json", ".jsonl")))
        shards = set((manifest or {}).get("shards", {}))
        for sid in shards:
            self.check_id(sid, MANIFEST)
        shards.update(self.markers_ids())
        names.update(self.data_name(s) for s in shards)
        names.update(f"{TEXT}/{s}.parquet" for s in shards)  # text embeddings (text_store)
        names.add(UNCOND)
        listed = self.list() + self.list(SHARDS) + self.list(TEXT)
        from pipeline.read.buckets import (
            data_names_by_shard,  # bucket files <shard>.<H>x<W>.parquet
        )

        top = [n for n in listed if "/" not in n]
        for found in data_names_by_shard(top, shards).values():
            names.update(found)
        names.update(n for n in listed if is_temporary(n))
        return {n for n in names if self.exists(n)}
