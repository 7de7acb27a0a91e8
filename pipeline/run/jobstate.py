"""What the driver knows about one run: its shards (:class:`ShardTask`: attempts, errors), what
is committed and what is still to do (:class:`JobState`), and the manifest and ``rejects.jsonl``
it writes from them (see :mod:`pipeline.output.manifest`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from pipeline import __version__
from pipeline.output.contracts import CommitMarker
from pipeline.output.description import ProcessMetadata
from pipeline.output.lease import OutputLease
from pipeline.output.manifest import (
    COMMITTED,
    DATASET_FILES,
    MANIFEST,
    MANIFEST_FORMAT,
    REJECTS,
    SHARDS,
    OutputDir,
)
from pipeline.output.prepare import remove_temporaries
from pipeline.read.buckets import bucket_table, data_names_by_shard
from pipeline.run.config import process_config

log = logging.getLogger(__name__)

TOTALS = ("samples", "records", "rejected", "bytes")  # summed over the shards in the manifest


@dataclass
class ShardTask:
    """One input shard as the driver tracks it: its attempts and their errors."""

    url: str
    id: str
    attempts: int = 0
    errors: list = field(default_factory=list)


@dataclass
class JobState:
    """Everything the driver knows about one run: the config, the output directory, the process
    description, every shard, what is committed (``summaries``: shard id -> its commit marker)
    and what is still to do (``pending``)."""

    cfg: DictConfig
    out: OutputDir
    lease: OutputLease
    metadata: ProcessMetadata
    shards: list[ShardTask]
    summaries: dict[str, CommitMarker]
    pending: deque = field(init=False)
    started: float = field(default_factory=time.time)
    placement_problem: str | None = None  # why no node can hold an actor (pool.placement_problem)
    placement_warned: bool = False
    sides: dict = field(default_factory=dict)  # the manifest's side_files (dataset's own files)

    def __post_init__(self):
        self.pending = deque(s for s in self.shards if s.id not in self.summaries)
        # the periodic manifest's cost is O(uncommitted), not O(shards) (manifest.py doc):
        # running totals of the committed shards, the shards not committed yet, and the
        # summaries not in an index segment yet (at first: those resumed from)
        self.open = {s.id: s for s in self.pending}
        self.done: Counter = Counter()
        for s in self.shards:
            if s.id in self.summaries:
                self._count(self.summaries[s.id])
        self.unindexed = dict(self.summaries)

    def _count(self, marker: CommitMarker) -> None:
        self.done[marker.status] += 1
        for key in TOTALS:
            self.done[key] += getattr(marker, key) or 0

    def dataset_files(self) -> tuple[str, ...]:
        """The dataset's own files this job writes (with text embeddings: the empty prompt's
        table, written by every actor at setup when absent)."""
        return DATASET_FILES if self.metadata.text else ()

    def missing_dataset_files(self) -> list[str]:
        """The dataset's own files not written (yet): an actor's setup writes them."""
        return [n for n in self.dataset_files() if not self.out.exists(n)]

    def side_files(self, final: bool) -> dict:
        """The manifest's ``side_files``: {name: {bytes, checksum}} of the dataset's own files,
        taken when one is first seen and again for the final manifest (an actor set up later
        writes it only when absent, but one racing the first could replace it)."""
        for name in self.dataset_files():
            if (final or name not in self.sides) and self.out.exists(name):
                self.sides[name] = self.out.file_entry(name)
        return dict(self.sides)

    @property
    def max_attempts(self) -> int:
        return self.cfg.ray.max_shard_retries + 1

    def last_attempt(self, shard: ShardTask) -> bool:
        return shard.attempts >= self.max_attempts

    def committed(self, shard: ShardTask, marker: CommitMarker) -> None:
        self.summaries[shard.id] = marker
        self.unindexed[shard.id] = marker
        if self.open.pop(shard.id, None) is not None:
            self._count(marker)

    def failed_attempt(self, shard: ShardTask, reason: str, retry: bool = True) -> None:
        """An attempt failed: retry the shard while attempts remain (unless ``retry`` is false:
        a retry would fail the same way)."""
        shard.errors.append(f"attempt {shard.attempts}: {reason}")
        if retry and not self.last_attempt(shard):
            log.warning(
                "shard %s: %s; retrying (%d/%d)",
                shard.url, reason, shard.attempts, self.max_attempts,
            )  # fmt: skip
            self.pending.append(shard)
        else:
            log.error("shard %s failed after %d attempts: %s", shard.url, shard.attempts, reason)

    def give_up(self, reason: str) -> None:
        """No actor will come: every pending shard fails with ``reason``."""
        for shard in self.pending:
            shard.errors.append(reason)
        self.pending.clear()

    def manifest(self, final: bool) -> dict:
        """The manifest (see manifest.py) as of now. ``final``: every shard, unfinished ones
        failed; else only the shards attempted and not committed yet, and the totals."""
        if final:
            entries = {}
            for s in self.shards:
                if s.id in self.summaries:
                    entries[s.id] = {
                        **self.summaries[s.id].to_json(),
                        "attempts": max(s.attempts, 1),
                    }
                else:
                    entries[s.id] = self._open_entry(s, "failed")
            values = entries.values()
            totals = {"shards": len(self.shards)}
            for status in ("ok", "partial", "failed", "pending"):
                totals[status] = sum(e["status"] == status for e in values)
            for key in TOTALS:
                totals[key] = sum(e.get(key, 0) for e in values)
        else:
            entries = {
                s.id: self._open_entry(s, "pending")
                for s in self.open.values()
                if s.attempts or s.errors
            }
            totals = {"shards": len(self.shards), "ok": self.done["ok"]}
            totals.update(partial=self.done["partial"], failed=0, pending=len(self.open))
            for key in TOTALS:
                totals[key] = self.done[key]
        buckets = {}
        if final and self.metadata.buckets is not None:  # records and files per bucket
            table = bucket_table(self.summaries, self.metadata.buckets)
            buckets = {"buckets": table}
        sides = self.side_files(final)
        return {
            **buckets,
            **({"side_files": sides} if sides else {}),
            "format": MANIFEST_FORMAT,
            "library_version": __version__,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "config_hash": self.metadata.config_hash,
            "process_config": process_config(self.cfg),
            "process": self.metadata.to_json(),
            "shards": entries,
            "totals": totals,
            "started": self.started,
            "updated": time.time(),
            "complete": final,
            "shards_scope": "all" if final else "uncommitted",
        }

    @staticmethod
    def _open_entry(s: ShardTask, status: str) -> dict:
        return {
            "url": s.url,
            "status": status,
            "attempts": s.attempts,
            "error": "; ".join(s.errors) or None,
        }

    def write_manifest(self, final: bool) -> dict:
        """Write the manifest and renew the lease (LeaseError if another run took it). A
        periodic write first writes an index segment of the markers committed since the last
        one; the final manifest is the compacted index, and the segments are then deleted."""
        self.lease.refresh()
        if not final and self.unindexed:
            self.out.write_segment({k: m.to_json() for k, m in self.unindexed.items()})
            self.unindexed = {}
        manifest = self.manifest(final)
        self.out.write_json(MANIFEST, manifest)
        if final:
            self.out.remove_segments()
            self.unindexed = {}
        return manifest

    def write_rejects(self, manifest: dict) -> None:
        """``rejects.jsonl``: the committed shards' rejects parts, and a row per failed shard."""
        rows, parts = [], self.out.list_info(SHARDS)  # one listing; empty parts are not read
        for s in self.shards:
            entry, part = manifest["shards"][s.id], self.out.rejects_name(s.id)
            if entry["status"] in COMMITTED and part in parts and parts[part].size:
                rows.extend(self.out.read_jsonl(part))
            elif entry["status"] == "failed":
                reason = f"shard failed after {s.attempts} attempt(s): {entry['error']}"
                rows.append({"shard": s.id, "key": None, "index": None, "reason": reason})
        self.out.write_jsonl(REJECTS, rows)

    def remove_uncommitted(self) -> None:
        """After the last attempt: what attempts of shards that did not commit left behind (an
        actor killed between its rename and its marker, a failed commit), so no file without a
        marker remains, and temporary files of killed attempts."""
        try:
            remove_temporaries(self.out)
        except OSError as exc:  # the output became unwritable: the manifest write will say so
            log.warning("cannot clean up %s: %s", self.out.display(), exc)
        names = data_names_by_shard(self.out.list(), [s.id for s in self.shards])
        for s in self.shards:
            if s.id in self.summaries:
                continue
            for name in [*names.get(s.id, ()), self.out.rejects_name(s.id)]:
                try:
                    self.out.remove(name)
                except OSError as exc:
                    log.warning("cannot remove %s of uncommitted shard %s: %s", name, s.id, exc)
