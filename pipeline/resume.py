"""What an output directory already holds, before a run writes into it: refuse, clear or resume.

* A directory that is not empty and holds no manifest of this pipeline is refused, naming what
  it holds: the pipeline never writes among files it did not write.
* A manifest of another config is refused unless ``output.overwrite=true``; overwrite deletes
  only what this pipeline wrote and recorded (:meth:`OutputDir.own_names`).
* Resume: a committed shard (its marker) is kept only when its marker comes from this config,
  its input URL is the one ``source.urls`` names now (else refused: two inputs would mix under
  one shard id), its input is unchanged since (size and mtime or etag; else it is redone), and
  its Parquet file exists with the marker's row count (else it is redone). Each redo is logged.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from .fs import identity
from .lease import LEASE
from .manifest import COMMITTED, SHARDS, OutputDir

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


def committed_shards(out: OutputDir, urls: dict[str, str], chash: str) -> dict[str, dict]:
    """shard id -> marker summary of the committed shards that stay committed (see the module
    docstring); ``urls``: shard id -> the URL this run reads it from. Shards to redo have their
    marker, file and rejects part removed here."""
    markers = {k: v for k, v in out.markers().items() if v.get("status") in COMMITTED}
    for sid, marker in markers.items():
        if marker.get("config_hash", chash) != chash:
            raise OutputRefused(
                f"{out.display(out.marker_name(sid))} was committed by another config (hash "
                f"{marker.get('config_hash')} != {chash}): the output would mix two processes. "
                "Use another output.dir, or output.overwrite=true to delete its records"
            )
        if sid in urls and marker.get("url") != urls[sid]:
            raise OutputRefused(
                f"shard {sid} in {out.display()} was made from {marker.get('url')!r}, but "
                f"source.urls now names {urls[sid]!r} for it: its records would mix two inputs. "
                "Use another output.dir, or output.overwrite=true to delete the old records"
            )
    todo = [sid for sid in markers if sid in urls]
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = dict(zip(todo, pool.map(lambda s: _stale(out, s, markers[s]), todo)))
    for sid, why in problems.items():
        if why is not None:
            log.warning("shard %s is redone: %s", sid, why)
            for name in (out.marker_name(sid), out.data_name(sid), out.rejects_name(sid)):
                out.remove(name)
            del markers[sid]
    return markers


def _stale(out: OutputDir, sid: str, marker: dict) -> str | None:
    """Why a committed shard must be redone, or None when it stands."""
    before, now = marker.get("source_identity"), identity(marker["url"])
    if before is not None and now is not None and before != now:
        return f"its input {marker['url']} changed since it was committed ({before} -> {now})"
    name = out.data_name(sid)
    try:
        with out.fs.open_input_file(out.path(name)) as f:
            rows = pq.read_metadata(f).num_rows
    except FileNotFoundError:
        return f"its file {out.display(name)} is missing"
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid for a damaged footer
        return f"its file {out.display(name)} is unreadable ({exc})"
    if rows != marker.get("records"):
        said = marker.get("records")
        return f"its file {out.display(name)} has {rows} rows, its marker says {said}"
    return None
