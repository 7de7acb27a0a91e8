"""The commit point of a shard: its files renamed into place, then its marker.

:func:`commit` takes a worker's :class:`~pipeline.output.contracts.ShardResult` (files under
temporary names) to a :class:`~pipeline.output.contracts.CommitMarker` on disk,
``_shards/<shard>.json``, written last (see :mod:`pipeline.output.manifest`); :func:`discard` drops
an attempt that is not committed. The worker commits a complete shard itself; the driver commits or
discards a partial one. No torch.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from pipeline.output.contracts import CommitMarker, ShardResult
from pipeline.output.manifest import OutputDir, OutputWriteError
from pipeline.run.stage import reject_row

log = logging.getLogger(__name__)


def commit(out: OutputDir, result: ShardResult) -> CommitMarker:
    """Commit a shard written to the temporary files of ``result``: its rejects part, its side
    files (text embeddings) and data files renamed into place, then the marker
    ``_shards/<shard>.json`` (the commit point; it records each file's ``bytes`` and
    ``checksum``, taken before the rename). Returns the marker. On failure the temporary files
    are removed and an :class:`OutputWriteError` names the file."""
    shard = result.shard
    files = [replace(f) for f in result.files]
    name = f"{shard}.<H>x<W>.parquet" if result.bucketed else files[0].name
    rejects = list(result.rejects)
    if result.error is not None:
        rejects.append(reject_row(shard, None, None, f"shard read error: {result.error}"))
    try:
        out.write_jsonl(out.rejects_name(shard), rejects)
        for f in files:  # what resume and validation verify
            f.checksum = out.checksum(f.tmp)
        sides = {}
        for tmp, side in result.side_files:  # per-sample tables (text embeddings)
            sides[side] = out.file_entry(tmp)
            out.commit(tmp, side)
        for f in files:  # every data file in place before the marker
            out.commit(f.tmp, f.name)
            f.bytes, f.tmp = out.size(f.name), None
        marker = CommitMarker(
            url=result.url,
            status=result.status,
            samples=result.samples,
            records=result.records,
            rejected=result.rejected,
            error=result.error,
            seconds=result.seconds,
            worker=result.worker,
            config_hash=result.config_hash,
            source_identity=result.source_identity,
            library_version=result.library_version,
            side_files=sides or None,
            text=result.text,
        )
        if result.bucketed:
            marker.files, marker.bytes = files, sum(f.bytes for f in files)
        else:
            marker.file, marker.bytes, marker.checksum = name, files[0].bytes, files[0].checksum
        out.write_json(out.marker_name(shard), marker.to_json())  # the commit point
    except OSError as exc:  # not committed: the driver retries, then removes what is left
        discard(out, result)
        raise OutputWriteError(f"cannot write {out.display(name)}: {exc}") from exc
    return marker


def discard(out: OutputDir, result: ShardResult) -> None:
    """Drop an uncommitted shard's temporary files (a partial attempt that will be retried)."""
    for tmp in result.temporaries():
        quietly(out.remove, tmp)


def quietly(fn, *args) -> None:
    """Best-effort cleanup after a failure: its own error must not hide the first one."""
    try:
        fn(*args)
    except Exception as exc:
        log.warning("cleanup %s%s failed: %s", getattr(fn, "__name__", fn), args, exc)
