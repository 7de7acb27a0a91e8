"""The scan of a shard's conditioning columns (``source.keep``), for the ``conditioning`` and
``completeness`` checks."""

from __future__ import annotations

import hashlib
from collections import Counter


def _fingerprint(v):
    if v is None or isinstance(v, int):
        return v
    data = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    return hashlib.blake2b(data, digest_size=12).digest()


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class CondScan:
    """The conditioning columns (``source.keep``) of one shard: null counts, and whether every
    draw of a sample (same key) carries the same value, against the first value seen per key
    (keys are per shard, so this holds one value per sample and kept column); label histograms
    of the int64 columns, one count per sample."""

    def __init__(self, spec: dict | None):
        cols = (spec or {}).get("columns", [])
        self.columns = [c["column"] for c in cols]
        self.ints = {c["column"] for c in cols if c["type"] == "int64"}
        self.first: dict[str, dict] = {c: {} for c in self.columns}
        self.nulls: Counter = Counter()
        self.mismatch: Counter = Counter()
        self.examples: dict[str, list] = {c: [] for c in self.columns}
        self.hist: dict[str, Counter] = {c: Counter() for c in self.ints}
        self.missing: list[str] = []

    def batch(self, rb, keys: list) -> None:
        for c in self.columns:
            if c not in rb.schema.names:
                if c not in self.missing:
                    self.missing.append(c)
                continue
            first = self.first[c]
            for k, v in zip(keys, rb.column(c).to_pylist()):
                self.nulls[c] += v is None
                f = _fingerprint(v)  # strings and bytes held as 12-byte hashes
                if k not in first:
                    first[k] = f
                    if c in self.ints and v is not None:
                        self.hist[c][v] += 1
                elif first[k] != f:
                    self.mismatch[c] += 1
                    if len(self.examples[c]) < 5:
                        was = first[k] if c in self.ints else "another value"
                        self.examples[c].append(f"{c} of key {k!r}: {was!r} and {_short(v)}")

    def summary(self) -> dict:
        return {
            "columns": self.columns,
            "nulls": dict(self.nulls),
            "mismatch": dict(self.mismatch),
            "examples": self.examples,
            "hist": {c: dict(h) for c, h in self.hist.items()},
            "missing": self.missing,
        }
