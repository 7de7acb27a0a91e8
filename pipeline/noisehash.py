"""The duplicate-noise check, partitioned by hash prefix so that no process holds every hash.

Every record's eps is hashed in its shard's scan (BLAKE2b, 12 bytes; :mod:`pipeline.scan`).
Two records with the same hash drew the same noise: a keying bug. Finding them needs all the
hashes of the dataset compared, 16 bytes per record with the shard that owns it (16 GB at 1e9
records), so the hashes are split by their first byte into ``B`` buckets (:func:`noise_buckets`,
a power of two): equal hashes fall in the same bucket, each bucket is checked alone
(:func:`duplicates`, ~50 bytes per record of the bucket), and the buckets' results merge into the
result of one sort of every hash (:func:`merge_duplicates`).

Where the buckets live while the shards are scanned, per executor (:mod:`pipeline.executor`):

* :class:`SpillBuckets` (local process pool): the driver appends each shard's parts to one file
  per bucket in a private temporary directory, removed at the end; each bucket is then checked
  by a pool process reading its file. Driver memory: one shard's hashes at a time.
* :class:`RayBuckets` (Ray tasks): each part stays in Ray. Ray keeps a task's return values
  under 100 KiB in the caller's own memory, so the driver gathers a bucket's small parts into
  one :func:`concat` task once they reach :data:`GATHER_BYTES`; that task's result, larger than
  the limit, lives in Ray's object store (spilled to disk by Ray when full). Driver memory: at
  most ``B x GATHER_BYTES`` of parts not yet gathered. Each bucket is then checked by its own
  Ray task.
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
BUCKET_BYTES = 1 << 30  # target peak memory of one bucket's check (50 bytes per record)
GATHER_BYTES = 256 << 10  # RayBuckets: small parts of a bucket gathered into one object
EXAMPLE_PAIRS = 50  # (shard, shard) pairs kept, in hash order, before the 5 examples


def noise_buckets(records: int) -> int:
    """The number of hash-prefix buckets for ``records`` records: a power of two in
    [MIN_BUCKETS, MAX_BUCKETS], enough that one bucket's check holds ~BUCKET_BYTES."""
    need = math.ceil(50 * max(records, 1) / BUCKET_BYTES)
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


def concat(*parts: np.ndarray) -> np.ndarray:
    """Parts of one bucket -> one array of :data:`HASH` (a Ray task in :class:`RayBuckets`)."""
    return np.concatenate([np.asarray(p, dtype=HASH) for p in parts]) if parts else _empty()


def duplicates(*parts: np.ndarray) -> tuple[int, list]:
    """One bucket's check: ``parts`` arrays of :data:`HASH`. Returns the number of records whose
    hash repeats another's and the first :data:`EXAMPLE_PAIRS` (owner, owner) pairs of equal
    neighbours in hash order. Peak memory about 50 bytes per record of the bucket."""
    rec = concat(*parts)
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
    """:func:`duplicates` of one :class:`SpillBuckets` file (a pool task)."""
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
    """Buckets as append-only files in a private temporary directory (local executor). Use as a
    context manager: the directory, which holds nothing else, is removed on exit."""

    def __init__(self, buckets: int, dir: str | None = None):
        self.buckets = buckets
        self.dir = tempfile.mkdtemp(prefix="ddpm-validate-noise-", dir=dir)
        self.paths = [os.path.join(self.dir, f"bucket-{b:03d}.bin") for b in range(buckets)]
        self.records = 0

    def add(self, parts: Sequence[np.ndarray]) -> None:
        """Append one shard's parts (from :func:`split_hashes`) to their buckets' files."""
        for path, part in zip(self.paths, parts, strict=True):
            if len(part):
                with open(path, "ab") as f:
                    f.write(np.ascontiguousarray(part, dtype=HASH).tobytes())
                self.records += len(part)

    def reduce(self, map_: Callable = map) -> list[tuple[int, list]]:
        """Each bucket's :func:`duplicates`, in bucket order; ``map_`` runs
        :func:`duplicates_in_file` over the files (a process pool's ``map``)."""
        return list(map_(duplicates_in_file, self.paths))

    def __enter__(self) -> SpillBuckets:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class RayBuckets:
    """Buckets as objects in Ray (Ray executor): per bucket the references of gathered parts
    (in the object store) and of small parts not gathered yet (on the driver, at most
    :data:`GATHER_BYTES` each bucket). Run inside the Ray session that holds them."""

    def __init__(self, buckets: int, num_cpus: float = 1.0, gather_bytes: int = GATHER_BYTES):
        import ray

        self.buckets, self.gather_bytes = buckets, gather_bytes
        self._concat = ray.remote(concat).options(num_cpus=num_cpus)
        self._check = ray.remote(duplicates).options(num_cpus=num_cpus)
        self.gathered: list[list] = [[] for _ in range(buckets)]
        self.pending: list[list] = [[] for _ in range(buckets)]
        self.pending_bytes = [0] * buckets
        self.records = 0

    def add(self, refs: Sequence, sizes: Sequence[int]) -> None:
        """One shard's part references and their record counts, bucket by bucket."""
        for b, (ref, n) in enumerate(zip(refs, sizes, strict=True)):
            if not n:
                continue
            self.records += n
            self.pending[b].append(ref)
            self.pending_bytes[b] += n * HASH.itemsize
            if self.pending_bytes[b] >= self.gather_bytes:
                self.gathered[b].append(self._concat.remote(*self.pending[b]))
                self.pending[b], self.pending_bytes[b] = [], 0

    def reduce(self) -> list[tuple[int, list]]:
        """Each bucket's :func:`duplicates`, one Ray task per bucket, in bucket order."""
        import ray

        return ray.get(
            [self._check.remote(*g, *p) for g, p in zip(self.gathered, self.pending, strict=True)]
        )
