"""The duplicate-noise check partitioned by hash prefix (pipeline/validate/noisehash.py): bucketed,
in spill files or in Ray with small parts gathered, it gives the verdict of one sort of every
hash."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.validate import noisehash
from pipeline.validate.noisehash import (
    HASH,
    SpillBuckets,
    duplicates,
    merge_duplicates,
    noise_buckets,
    split_hashes,
)


def _one_sort(hashes: list, names: list) -> tuple[int, list]:
    """The duplicate check as one sort of every hash (the driver-side check before buckets)."""
    h = np.concatenate(hashes)
    owner = np.concatenate([np.full(len(x), i) for i, x in enumerate(hashes)])
    hv = np.ascontiguousarray(h).view("V12").reshape(-1)
    order = np.argsort(hv, kind="stable")
    hs = hv[order]
    same = hs[1:] == hs[:-1]
    dup = np.zeros(len(hs), dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    first = np.flatnonzero(same)[:50]
    ex = sorted({(names[owner[order[i]]], names[owner[order[i + 1]]]) for i in first})
    return int(dup.sum()), [list(e) for e in ex[:5]]


def _shards() -> tuple[list, list]:
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 256, (400 + 50 * i, 12), dtype=np.uint8) for i in range(6)]
    shards[4][:30] = shards[1][100:130]  # a copied block
    shards[5][7] = shards[5][9]  # a repeat inside a shard
    shards[2][:80] = shards[0][:80]
    shards[3][:60] = shards[0][:60]  # three shards share records
    return shards, [f"sh-{i}" for i in range(len(shards))]


EXPECTED = 2 * 30 + 2 + 3 * 60 + 2 * 20


@pytest.mark.parametrize("buckets", [1, 2, 3, 16, 256])
def test_bucketed_duplicate_check_equals_one_sort(buckets):
    shards, names = _shards()
    split = [split_hashes(h, i, buckets) for i, h in enumerate(shards)]
    assert all(sum(map(len, p)) == len(h) for p, h in zip(split, shards))
    assert all(p.dtype == HASH for parts in split for p in parts)
    results = [duplicates(*(p[b] for p in split)) for b in range(buckets)]
    got = merge_duplicates(results, dict(enumerate(names)))
    assert got == _one_sort(shards, names)
    assert got[0] == EXPECTED


def test_a_bucket_holds_one_prefix_range_and_keeps_its_owner():
    h = np.zeros((256, 12), dtype=np.uint8)
    h[:, 0] = np.arange(256)
    parts = split_hashes(h, 7, 4)
    for b, p in enumerate(parts):
        first = np.ascontiguousarray(p["h"]).view(np.uint8).reshape(-1, 12)[:, 0]
        assert len(p) == 64 and first.min() == 64 * b and first.max() == 64 * b + 63
        assert (p["owner"] == 7).all()


def test_spill_buckets_give_the_same_verdict_and_remove_their_directory(tmp_path):
    shards, names = _shards()
    with SpillBuckets(16, dir=str(tmp_path)) as spill:
        for i, h in enumerate(shards):
            spill.add(h, i)
        assert spill.records == sum(map(len, shards))
        spill.flush()
        on_disk = sum(os.path.getsize(p) for p in spill.paths if os.path.exists(p))
        assert on_disk == HASH.itemsize * spill.records  # 16 bytes per record, nothing else
        assert sum(spill.bucket_records(b) for b in range(16)) == spill.records
        got = merge_duplicates(spill.reduce(), dict(enumerate(names)))
    assert got == _one_sort(shards, names)
    assert os.listdir(tmp_path) == []  # its own directory, removed; nothing else touched


def test_bucket_count_is_a_power_of_two_that_bounds_a_bucket(monkeypatch):
    assert noise_buckets(0) == noise_buckets(1000) == 1
    for records in (10**7, 10**8, 10**9, 10**10):
        b = noise_buckets(records)
        assert b & (b - 1) == 0 and 1 <= b <= noisehash.MAX_BUCKETS
        assert b == noisehash.MAX_BUCKETS or 50 * records / b <= noisehash.BUCKET_BYTES
    assert noise_buckets(10**9) == 64
