"""The validator's file I/O besides the records: commit markers, file sizes and checksums, the
listing of the output directory and ``rejects.jsonl``.

Each shard's scan reads its commit marker (:func:`read_marker`, a
:class:`pipeline.output.contracts.CommitMarker` of any format) and measures its file
(:func:`file_check`: size, checksum), one shard per task, in parallel; the driver then takes
the directory's :class:`Inventory`. The ``completeness`` check compares all of it with the
manifest without touching a file itself.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from pipeline.output.contracts import CommitMarker
from pipeline.output.manifest import (
    DATASET_FILES,
    REJECTS,
    SHARDS,
    TEXT,
    CorruptFileError,
    OutputDir,
    check_own_file,
    parse_marker,
)


def read_marker(out: OutputDir, shard: str) -> tuple[CommitMarker | None, str | None]:
    """The shard's commit marker, :meth:`CommitMarker.attested` (the driver holds one per
    shard): (marker, None), (None, why it cannot be read, naming the file), or (None, None)
    when absent. A marker that names a file not of its shard is refused
    (:func:`pipeline.output.manifest.check_own_file`): no such file is read."""
    try:
        marker = parse_marker(out, shard, out.read_json(OutputDir.marker_name(shard)))
        for f in marker.data_files(shard):
            check_own_file(shard, f.name)
        for side in marker.side_files or {}:
            check_own_file(shard, side, side=True)
        return marker.attested(), None
    except FileNotFoundError:
        return None, None
    except (OSError, CorruptFileError) as exc:  # CorruptFileError names the file
        return None, str(exc)


def file_check(out: OutputDir, names, marker: CommitMarker | None) -> dict:
    """The committed file as found, for ``completeness`` to compare with its marker: its
    ``bytes``, and its ``checksum`` when the marker records one (a marker of an older version
    has none: the file is then checked by size only); ``error`` when it cannot be read; and
    ``side_files`` {name: what :func:`_side_check` found} of the side files the marker names.
    A bucketed shard (its marker lists ``files``): ``files`` {name: what :func:`_side_check`
    found} of each of its data files ``names``, instead of ``bytes`` and ``checksum``."""
    if isinstance(names, str):
        names = [names]
    sides = (marker.side_files if marker is not None else None) or {}
    if marker is not None and marker.files is not None:
        found: dict = {"files": {n: _side_check(out, n) for n in names}}
        if sides:
            found["side_files"] = {n: _side_check(out, n) for n in sorted(sides)}
        return found
    name = names[0] if names else None
    try:
        found = {"bytes": out.size(name)}
        if marker is not None and marker.checksum is not None:
            found["checksum"] = out.checksum(name)
    except (OSError, TypeError) as exc:  # a vanished file: size None, then open fails
        return {"error": f"{type(exc).__name__}: {exc}"}
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
    # the dataset's own files (the empty prompt's embedding): {name: what _side_check found}
    dataset_files: dict | None = None


def take_inventory(out: OutputDir, text: bool = False) -> Inventory:
    """List the markers and data files, read ``rejects.jsonl`` (CorruptFileError naming it
    when a line is not JSON) and, for a dataset with text embeddings (``text``), measure its
    own files (:data:`~pipeline.output.manifest.DATASET_FILES`: size and checksum)."""
    names = [posixpath.basename(n) for n in out.list(SHARDS)]
    markers = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
    rejects = out.read_jsonl(REJECTS) if out.exists(REJECTS) else None
    tables = [n for n in out.list(TEXT) if n.endswith(".parquet")]
    text_files = tuple(n for n in tables if not posixpath.basename(n).startswith(("_", ".")))
    own = {n: _side_check(out, n) for n in DATASET_FILES} if text else {}
    return Inventory(frozenset(markers), tuple(out.data_files()), rejects, text_files, own)
