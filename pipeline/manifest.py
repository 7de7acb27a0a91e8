"""The layout of an output directory, on any pyarrow filesystem (local, s3://, gs://, ...).

::

    output.dir/
      <shard_id>.parquet            records of one input shard (committed by rename)
      _shards/<shard_id>.json       the shard's commit marker: its summary (written last)
      _shards/<shard_id>.rejects.jsonl   the shard's rejected samples
      _manifest.json                resolved config + per-shard summaries + totals
      rejects.jsonl                 every rejected sample / failed shard, one JSON per line
      validation/                   report of pipeline.validate

A shard counts as done when its marker exists; the marker is written after its Parquet file and
rejects are in place, so a reader never sees a shard half-committed. On a file system every write
goes to a temporary name first and is then moved into place. On an object store (``s3://``,
``gs://``) an object becomes visible only when its upload completes, so a killed writer leaves
nothing behind, while a "move" is a copy (S3 CopyObject: 5 GB at most) plus a delete: there,
files are written under their final name (:attr:`OutputDir.atomic_writes`).
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid
from collections.abc import Iterable

import pyarrow.fs as pafs

from .fs import resolve

MANIFEST = "_manifest.json"
REJECTS = "rejects.jsonl"
SHARDS = "_shards"
MANIFEST_FORMAT = "ddpm-manifest/1"
# Statuses of a shard: committed ones are never redone on resume.
COMMITTED = ("ok", "partial")
OBJECT_STORES = {"s3", "s3a", "gcs", "gs"}  # filesystems whose uploads are atomic


class OutputWriteError(OSError):
    """Writing or committing a file of the output directory failed; the message names the file."""


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
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file atomically (temporary name, then move)."""
        tmp = self.tmp_name(name)
        with self.fs.open_output_stream(self.path(tmp)) as f:
            f.write(data)
        self.commit(tmp, name)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def write_jsonl(self, name: str, rows: Iterable[dict]) -> None:
        self.write_bytes(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def read_jsonl(self, name: str) -> list[dict]:
        return [json.loads(line) for line in self.read_bytes(name).decode().splitlines() if line]

    def list(self, sub: str = "") -> list[str]:
        """Names (relative to the root) of the files directly under ``sub``."""
        sel = pafs.FileSelector(self.path(sub), allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                out.append(posixpath.relpath(info.path, self.root))
        return sorted(out)

    def data_files(self) -> list[str]:
        """Committed Parquet files (temporary files start with a dot and are excluded)."""
        return [n for n in self.list() if n.endswith(".parquet") and not n.startswith(".")]

    def markers(self) -> dict[str, dict]:
        """shard id -> committed summary, from the _shards/ markers."""
        out = {}
        for name in self.list(SHARDS):
            base = posixpath.basename(name)
            if base.endswith(".json") and not base.startswith("."):
                out[base[: -len(".json")]] = self.read_json(name)
        return out

    def read_manifest(self) -> dict | None:
        return self.read_json(MANIFEST) if self.exists(MANIFEST) else None
