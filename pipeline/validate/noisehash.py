"""The duplicate-noise check, partitioned by hash prefix so that no process holds every hash.

Every record's eps is hashed in its shard's scan (BLAKE2b, 12 bytes;
:mod:`pipeline.validate.scan`). Two records with the same hash drew the same noise: a keying
bug. Finding them needs all the hashes of the dataset compared, 16 bytes per record with the
shard that owns it (16 GB at 1e9 records), so the hashes are split by their first byte into
``B`` buckets (:func:`noise_buckets`, a power of two): equal hashes fall in the same bucket,
each bucket is checked alone (:func:`duplicates`, ~56 bytes per record of the bucket), and the
buckets' results merge into the result of one sort of every hash (:func:`merge_duplicates`).

Where the buckets live: :class:`SpillBuckets`, one append-only file per bucket in a private
temporary directory of the validator's machine, removed at the end. Each scan returns its
shard's hashes to the driver (12 bytes per record, one object per shard), which appends them to
the files and lets them go: the driver holds one shard's hashes at a time, the disk 16 bytes per
record. Each bucket is then checked by a process of that machine (a pool process, or a Ray task
pinned to the driver's node: :mod:`pipeline.validate.executor`) reading its file.

Why not keep the buckets in Ray's object store: one object per shard and bucket costs the driver,
their owner, a few KiB of Ray bookkeeping each while it holds the reference, far more than the
hashes themselves (measured, ``python -m jobs.bench.noisehash``: the driver grew by 1.5 GB for
1e7 records in 10,000 shards x 64 buckets; spilling, by 49 MB).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

# One record's noise hash and the ordinal of the shard that holds it (16 bytes).
HASH = np.dtype([("h", "V12"), ("owner", "<u4")])
HASH_BYTES = 12
MIN_BUCKETS, MAX_BUCKETS = 1, 256
BUCKET_BYTES = 1 << 30  # target peak memory of one bucket's check
CHECK_BYTES_PER_RECORD = 56  # one bucket's check, measured (python -m jobs.bench.noisehash)
EXAMPLE_PAIRS = 50  # (shard, shard) pairs kept, in hash order, before the 5 examples


def noise_buckets(records: int) -> int:
    """The number of hash-prefix buckets for ``records`` records: a power of two in
    [MIN_BUCKETS, MAX_BUCKETS], enough that one bucket's check holds ~BUCKET_BYTES."""
    need = math.ceil(CHECK_BYTES_PER_RECORD * max(records, 1) / BUCKET_BYTES)
    return max(MIN_BUCKETS, min(MAX_BUCKETS, 1 << max(0, need - 1).bit_length()))


def split_hashes(hashes: np.ndarray, owner: int, buckets: int) -> list[np.ndarray]:
    """[records, 12] uint8 hashes of shard ordinal ``owner`` -> ``buckets`` arrays of
    :data:`HASH`, by the first byte's range (bucket b holds first bytes in
    [256 b / B, 256 (b + 1) / B)), each in its records' order."""
    h = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(-1, HASH_BYTES)
    rec = np.empty(len(h), dtype=HASH)
    rec["h"] = h.view(f"V{HASH_BYTES}").reshape(-1)
    rec["owner"] = owner
    which = (h[:, 0].astype(np.int64) * buckets) >> 8
    order = np.argsort(which, kind="stable")
    cuts = np.cumsum(np.bincount(which, minlength=buckets))[:-1]
    return [np.ascontiguousarray(p) for p in np.split(rec[order], cuts)]


def duplicates(*parts: np.ndarray) -> tuple[int, list]:
    """One bucket's check: ``parts`` arrays of :data:`HASH`. Returns the number of records whose
    hash repeats another's and the first :data:`EXAMPLE_PAIRS` (owner, owner) pairs of equal
    neighbours in hash order. Peak memory about CHECK_BYTES_PER_RECORD per record."""
    rec = np.concatenate([np.asarray(p, dtype=HASH) for p in parts]) if parts else _empty()
    if not len(rec):
        return 0, []
    order = np.argsort(rec["h"], kind="stable")
    hs = rec["h"][order]
    same = hs[1:] == hs[:-1]
    dup = np.zeros(len(hs), dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    first = np.flatnonzero(same)[:EXAMPLE_PAIRS]
    owner = rec["owner"]
    pairs = [(int(owner[order[i]]), int(owner[order[i + 1]])) for i in first]
    return int(dup.sum()), pairs


def duplicates_in_file(path: str) -> tuple[int, list]:
    """:func:`duplicates` of one :class:`SpillBuckets` file (a pool process or a Ray task)."""
    return duplicates(np.fromfile(path, dtype=HASH)) if os.path.exists(path) else (0, [])


def merge_duplicates(results: Sequence[tuple[int, list]], names: dict[int, str]) -> tuple:
    """The buckets' (count, pairs) in bucket order -> the count and up to 5 sorted (shard,
    shard) examples: the same as one sort of every hash (the first pairs in hash order)."""
    pairs = [p for _, ps in results for p in ps][:EXAMPLE_PAIRS]
    ex = sorted({(names[a], names[b]) for a, b in pairs})
    return sum(n for n, _ in results), [list(e) for e in ex[:5]]


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=HASH)


class SpillBuckets:
    """Buckets as append-only files in a private temporary directory, one open file per bucket
    (at most MAX_BUCKETS). Use as a context manager: the directory, which holds nothing else,
    is removed on exit."""

    def __init__(self, buckets: int, dir: str | None = None):
        self.buckets = buckets
        self.dir = tempfile.mkdtemp(prefix="ddpm-validate-noise-", dir=dir)
        self.paths = [os.path.join(self.dir, f"bucket-{b:03d}.bin") for b in range(buckets)]
        self.records = 0
        self._files: dict[int, object] = {}

    def add(self, hashes: np.ndarray, owner: int) -> None:
        """Append the [records, 12] hashes of shard ordinal ``owner`` to their buckets' files."""
        for b, part in enumerate(split_hashes(hashes, owner, self.buckets)):
            if len(part):
                if b not in self._files:
                    self._files[b] = open(self.paths[b], "ab")  # noqa: SIM115 (closed in flush)
                self._files[b].write(part.tobytes())
                self.records += len(part)

    def flush(self) -> None:
        """Close the files, so that other processes read all that was added."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def bucket_records(self, b: int) -> int:
        """The records in bucket ``b`` so far (after :meth:`flush`)."""
        path = self.paths[b]
        return os.path.getsize(path) // HASH.itemsize if os.path.exists(path) else 0

    def reduce(self, map_: Callable = map) -> list[tuple[int, list]]:
        """Each bucket's :func:`duplicates`, in bucket order; ``map_`` runs
        :func:`duplicates_in_file` over the files (e.g. a process pool's ``map``)."""
        self.flush()
        return list(map_(duplicates_in_file, self.paths))

    def __enter__(self) -> SpillBuckets:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        shutil.rmtree(self.dir, ignore_errors=True)
