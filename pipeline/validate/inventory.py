"""The validator's file I/O besides the records: commit markers, file sizes and checksums, the
listing of the output directory and ``rejects.jsonl``.

Each shard's scan reads its commit marker (:func:`read_marker`) and measures its file
(:func:`file_check`: size, checksum), one shard per task, in parallel; the driver then takes
the directory's :class:`Inventory`. The ``completeness`` check compares all of it with the
manifest without touching a file itself.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from pipeline.output.manifest import REJECTS, SHARDS, TEXT, OutputDir

# The fields of a commit marker that the ``completeness`` check compares with the manifest and
# with the files (size and checksum of the data file and of its side files: the text table).
# A bucketed shard's marker lists its data ``files`` (name, bytes, checksum, records each).
MARKER_FIELDS = ("status", "records", "config_hash", "bytes", "checksum", "side_files", "files")


def read_marker(out: OutputDir, shard: str) -> tuple[dict | None, str | None]:
    """The shard's commit marker cut to :data:`MARKER_FIELDS` (the driver holds one per
    shard): (marker, None), (None, why it cannot be read), or (None, None) when absent."""
    try:
        marker = out.read_json(OutputDir.marker_name(shard))
        return {k: marker[k] for k in MARKER_FIELDS if k in marker}, None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:  # CorruptFileError names the file
        return None, str(exc)


def file_check(out: OutputDir, names, marker: dict | None) -> dict:
    """The committed file as found, for ``completeness`` to compare with its marker: its
    ``bytes``, and its ``checksum`` when the marker records one (a marker of an older version
    has none: the file is then checked by size only); ``error`` when it cannot be read; and
    ``side_files`` {name: what :func:`_side_check` found} of the side files the marker names.
    A bucketed shard (its marker lists ``files``): ``files`` {name: what :func:`_side_check`
    found} of each of its data files ``names``, instead of ``bytes`` and ``checksum``."""
    if isinstance(names, str):
        names = [names]
    if marker is not None and marker.get("files") is not None:
        found: dict = {"files": {n: _side_check(out, n) for n in names}}
        sides = marker.get("side_files") or {}
        if sides:
            found["side_files"] = {n: _side_check(out, n) for n in sorted(sides)}
        return found
    name = names[0] if names else None
    try:
        found = {"bytes": out.size(name)}
        if marker is not None and marker.get("checksum") is not None:
            found["checksum"] = out.checksum(name)
    except (OSError, TypeError) as exc:  # a vanished file: size None, then open fails
        return {"error": f"{type(exc).__name__}: {exc}"}
    sides = (marker or {}).get("side_files") or {}
    if sides:
        found["side_files"] = {n: _side_check(out, n) for n in sorted(sides)}
    return found


def _side_check(out: OutputDir, name: str) -> dict:
    """A side file (the shard's text table) as found: bytes and checksum, or ``missing`` /
    ``error``."""
    try:
        if not out.exists(name):
            return {"missing": True}
        return {"bytes": out.size(name), "checksum": out.checksum(name)}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


@dataclass(frozen=True)
class Inventory:
    """What the output directory holds, listed after the scan."""

    markers: frozenset  # shard ids with a commit marker in _shards/
    data_files: tuple  # names of the data files (:meth:`OutputDir.data_files`)
    rejects: list | None  # the lines of rejects.jsonl, None when it is absent
    text_files: tuple = ()  # the shards' text tables _text/<shard>.parquet (not _uncond)


def take_inventory(out: OutputDir) -> Inventory:
    """List the markers and data files and read ``rejects.jsonl`` (CorruptFileError naming it
    when a line is not JSON)."""
    names = [posixpath.basename(n) for n in out.list(SHARDS)]
    markers = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
    rejects = out.read_jsonl(REJECTS) if out.exists(REJECTS) else None
    text = [n for n in out.list(TEXT) if n.endswith(".parquet")]
    text = tuple(n for n in text if not posixpath.basename(n).startswith(("_", ".")))
    return Inventory(frozenset(markers), tuple(out.data_files()), rejects, text)
