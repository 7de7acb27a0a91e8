"""What an output directory already holds, before a run writes into it: refuse, clear or resume.

* A directory that is not empty and holds no manifest of this pipeline is refused, naming what
  it holds: the pipeline never writes among files it did not write.
* A manifest of another config is refused unless ``output.overwrite=true``; overwrite deletes
  only what this pipeline wrote and recorded (:meth:`OutputDir.own_names`).
* Resume: a committed shard (its marker) is kept only when its marker comes from this config,
  its input URL is the one ``source.urls`` names now (else refused: two inputs would mix under
  one shard id), its input is unchanged since (size and mtime or etag; else it is redone), and
  its Parquet file (each of a bucketed shard's files) exists with the marker's size in bytes
  and checksum (sha256 of its bytes; else it is redone: a truncated, flipped or rewritten file
  differs), and so do its side files
  (the text embedding table ``_text/<shard>.parquet``: ``side_files`` of the marker). Markers
  written before checksums existed are checked by size only (by row count when they lack the
  size too). Each redo is logged.
* The dataset's own files (the empty prompt's embedding ``_text/_uncond.parquet``) are checked
  against the manifest's ``side_files`` the same way (:func:`stale_dataset_files`); one that
  fails is removed, and an actor writes it again at setup (the driver starts one for it when no
  shard is left to do).

Verifying the checksums reads every committed file once: one sha256 pass over its bytes, the
price of noticing a file changed since its commit without trusting its size.

What resume costs does not grow with requests per committed shard: one listing of ``_shards/``
plus the index (the final manifest and the segments, :meth:`OutputDir.markers`), one listing
of the output directory for the committed files, and one listing per input directory for the
inputs' size and mtime (:func:`pipeline.fs.identities`; ``pipe:`` and HTTP URLs are looked at
one by one). Only markers newer than the index are read one by one.
"""

from __future__ import annotations

import logging
import posixpath
import uuid

import pyarrow.parquet as pq

from pipeline.fs import identities
from pipeline.output.contracts import CommitMarker, DataFile
from pipeline.output.lease import LEASE
from pipeline.output.manifest import (
    COMMITTED,
    DATASET_FILES,
    SHARDS,
    OutputDir,
    check_own_file,
    parse_marker,
)

log = logging.getLogger(__name__)


class OutputRefused(RuntimeError):
    """The output directory cannot be written by this run; the message says why and the fix."""


def check_foreign(out: OutputDir, manifest: dict | None) -> None:
    """Refuse a non-empty directory that holds no manifest of this pipeline."""
    if manifest is not None:
        return
    ours = out.own_names(None) | {LEASE, SHARDS}
    foreign = [n for n in out.list(dirs=True) if n not in ours]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(foreign[:5]) + more
        raise OutputRefused(
            f"output.dir={out.display()} is not empty and holds no manifest of this pipeline "
            f"(it holds {shown}); the pipeline writes only into a new or empty directory or one it "
            "wrote itself: choose another output.dir"
        )


def clear(out: OutputDir, manifest: dict | None) -> list[str]:
    """Delete what this pipeline wrote and recorded (``output.overwrite=true``); returns the
    names deleted. Files it did not write stay."""
    names = sorted(out.own_names(manifest) - {LEASE})
    for name in names:
        out.remove(name)
    return names


def check_writable(out: OutputDir) -> None:
    """Create _shards/ and write and remove a probe file (OSError when it cannot)."""
    out.makedirs(SHARDS)
    probe = f"{SHARDS}/.write-probe.tmp-{uuid.uuid4().hex[:12]}"  # a temporary file's name
    out.write_bytes(probe, b"")
    out.remove(probe)


def committed_shards(
    out: OutputDir, urls: dict[str, str], chash: str, manifest: dict | None = None
) -> dict[str, CommitMarker]:
    """shard id -> commit marker (:class:`~pipeline.output.contracts.CommitMarker`) of the committed
    shards that stay committed (see the module docstring); ``urls``: shard id -> the URL this
    run reads it from; ``manifest``: the directory's manifest (the index of the markers when
    complete). Shards to redo have their marker, files and rejects part removed here."""
    found = {k: parse_marker(out, k, v) for k, v in out.markers(manifest).items()}
    markers = {k: m for k, m in found.items() if m.status in COMMITTED}
    for sid, marker in markers.items():
        if marker.config_hash is not None and marker.config_hash != chash:
            raise OutputRefused(
                f"{out.display(out.marker_name(sid))} was committed by another config (hash "
                f"{marker.config_hash} != {chash}): the output would mix two processes. "
                "Use another output.dir, or output.overwrite=true to delete its records"
            )
        if sid in urls and marker.url != urls[sid]:
            raise OutputRefused(
                f"shard {sid} in {out.display()} was made from {marker.url!r}, but "
                f"source.urls now names {urls[sid]!r} for it: its records would mix two inputs. "
                "Use another output.dir, or output.overwrite=true to delete the old records"
            )
    todo = [sid for sid in markers if sid in urls]
    files = out.list_info() if todo else {}
    for sub in sorted({posixpath.dirname(n) for s in todo for n in _sides(s, markers[s])} - {""}):
        files.update(out.list_info(sub))  # one listing per directory of side files (_text/)
    inputs = identities(markers[sid].url for sid in todo)
    for sid in todo:
        why = _stale(out, sid, markers[sid], files, inputs)
        if why is None:
            why = _stale_sides(out, sid, markers[sid], files)
        if why is not None:
            log.warning("shard %s is redone: %s", sid, why)
            data = [f.name for f in _data_files(sid, markers[sid])]
            names = (out.marker_name(sid), *data, out.rejects_name(sid))  # marker first
            for name in (*names, *_sides(sid, markers[sid])):
                out.remove(name)
            del markers[sid]
    return markers


def _data_files(sid: str, marker: CommitMarker) -> list[DataFile]:
    """The data files a shard's marker records, each a file of the shard or refused
    (:func:`pipeline.output.manifest.check_own_file`: resume deletes what a marker names)."""
    files = marker.data_files(sid)
    for f in files:
        check_own_file(sid, f.name)
    return files


def _sides(sid: str, marker: CommitMarker) -> dict:
    """{name: {bytes, checksum}} of a shard's side files (its text embedding table) recorded by
    its marker (:func:`pipeline.output.commit.commit`); {} for a shard without them. A name that is
    no side file of the shard is refused (:func:`pipeline.output.manifest.check_own_file`)."""
    sides = marker.side_files or {}
    for name in sides:
        check_own_file(sid, name, side=True)
    return sides


def _stale_sides(out: OutputDir, sid: str, marker: CommitMarker, files: dict) -> str | None:
    """Why a shard's side files fail what its marker recorded (missing, size, checksum)."""
    for name, want in sorted(_sides(sid, marker).items()):
        why = _stale_entry(out, name, want, files.get(name), "its marker")
        if why is not None:
            return why
    return None


def _stale_entry(out: OutputDir, name: str, want: dict, info, where: str) -> str | None:
    """Why the file ``name`` (``info``: its listing, None when absent) fails the ``bytes`` and
    ``checksum`` that ``where`` recorded in ``want``, or None."""
    if info is None:
        return f"its file {out.display(name)} is missing"
    if info.size != want.get("bytes"):
        return (
            f"its file {out.display(name)} has {info.size} bytes, {where} says {want.get('bytes')}"
        )
    try:
        got = out.checksum(name)
    except OSError as exc:
        return f"its file {out.display(name)} is unreadable ({exc})"
    if got != want.get("checksum"):
        return (
            f"its file {out.display(name)} has checksum {got[:19]}, {where} says "
            f"{str(want.get('checksum'))[:19]} (changed since it was written)"
        )
    return None


def stale_dataset_files(out: OutputDir, manifest: dict | None) -> list[str]:
    """Remove each of the dataset's own files (:data:`~pipeline.output.manifest.DATASET_FILES`)
    that fails the size and checksum the manifest's ``side_files`` recorded (missing, resized,
    flipped, rewritten), so that an actor writes it again; returns their names, each logged.
    A manifest of an older version records none: nothing is checked."""
    recorded = (manifest or {}).get("side_files") or {}
    stale = []
    for name in DATASET_FILES:  # only names the pipeline makes: the manifest names no other
        want = recorded.get(name)
        if not isinstance(want, dict):
            continue
        info = out.list_info(posixpath.dirname(name)).get(name)
        why = _stale_entry(out, name, want, info, "the manifest")
        if why is not None:
            log.warning("%s is written again: %s", out.display(name), why)
            out.remove(name)
            stale.append(name)
    return stale


def _stale(out: OutputDir, sid: str, marker: CommitMarker, files: dict, inputs: dict) -> str | None:
    """Why a committed shard must be redone, or None when it stands; ``files``: the listing of
    the output directory, ``inputs``: URL -> identity now."""
    before, now = marker.source_identity, inputs.get(marker.url)
    if before is not None and now is not None and before != now:
        return f"its input {marker.url} changed since it was committed ({before} -> {now})"
    for entry in _data_files(sid, marker):  # a bucketed shard: each of its files
        why = _stale_file(out, entry, files)
        if why is not None:
            return why
    return None


def _stale_file(out: OutputDir, entry: DataFile, files: dict) -> str | None:
    """Why one data file of a committed shard fails its marker's entry (its ``bytes``,
    ``checksum``, or for the oldest markers ``records``), or None."""
    name = entry.name
    info = files.get(name)
    if info is None:
        return f"its file {out.display(name)} is missing"
    if entry.bytes is not None:
        if info.size != entry.bytes:
            says = entry.bytes
            return f"its file {out.display(name)} has {info.size} bytes, its marker says {says}"
        if entry.checksum is None:  # a marker of an older version: its size only
            return None
        try:
            got = out.checksum(name)
        except OSError as exc:
            return f"its file {out.display(name)} is unreadable ({exc})"
        if got != entry.checksum:
            return (
                f"its file {out.display(name)} has checksum {got[:19]}, its marker says "
                f"{str(entry.checksum)[:19]} (changed since it was committed)"
            )
        return None
    try:  # a marker without its file's size: the footer's row count
        with out.fs.open_input_file(out.path(name)) as f:
            rows = pq.read_metadata(f).num_rows
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid for a damaged footer
        return f"its file {out.display(name)} is unreadable ({exc})"
    if rows != entry.records:
        says = entry.records
        return f"its file {out.display(name)} has {rows} rows, its marker says {says}"
    return None
