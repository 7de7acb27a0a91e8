"""The scan of a shard's aspect-ratio bucket columns (``source.buckets``), for the ``buckets``
check: each record's ``target_size``, ``original_size``, ``crop_top_left`` and ``flipped``
against the configured grid (:mod:`pipeline.read.buckets`) and against the shape of its file."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from pipeline.output.description import ProcessMetadata
from pipeline.read.buckets import Grid

EXAMPLES = 5
# |log(h/w) - log(H/W)| may exceed the half step by float rounding only
ASPECT_SLACK = 1e-9


class BucketScan:
    """One shard's bucket figures (:meth:`summary`), or nothing when ``process`` (the
    dataset's metadata) has no ``buckets``. Per record: its ``target_size`` is a configured
    bucket and the nearest to its ``original_size`` in log ratio; within the grid's range of
    ratios its aspect error stays within the grid's half step; its crop lies inside the
    resized image (:func:`pipeline.read.buckets.cover`); it sits in the file of its bucket's shape.
    Per sample (draw 0): flips."""

    def __init__(self, process: ProcessMetadata):
        source = process.source or {}
        self.active = process.buckets is not None
        if not self.active:
            return
        self.grid = Grid(tuple(tuple(b["size"]) for b in process.buckets))
        self.shapes = {tuple(b["size"]): tuple(b["shape"]) for b in process.buckets}
        self.ratios = self.grid.log_ratios
        self.half = self.grid.half_step()
        self.flip = source.get("flip", "none")
        self.hist: Counter = Counter()
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = {}
        self.max_aspect_error = 0.0

    def _bad(self, what: str, mask: np.ndarray, keys: list, detail) -> None:
        n = int(mask.sum())
        if not n:
            return
        self.counts[what] += n
        ex = self.examples.setdefault(what, [])
        for i in np.flatnonzero(mask)[: EXAMPLES - len(ex)]:
            ex.append(f"key {keys[i]!r}: {detail(i)}")

    def batch(self, rb, keys: list, draw: np.ndarray, shape) -> None:
        """The records of one Parquet batch of a file of sample ``shape``."""
        if not self.active:
            return
        names = rb.schema.names
        need = ("original_size", "crop_top_left", "target_size", "flipped")
        missing = [c for c in need if c not in names]
        if missing:
            self.counts["records without the bucket columns"] += rb.num_rows
            self.examples.setdefault("records without the bucket columns", [f"missing {missing}"])
            return

        def pairs(c):
            return np.asarray(rb.column(c).flatten(), dtype=np.int64).reshape(-1, 2)

        orig, crop, target = pairs("original_size"), pairs("crop_top_left"), pairs("target_size")
        flipped = np.asarray(rb.column("flipped").to_numpy(zero_copy_only=False), dtype=bool)
        th, tw = target[:, 0], target[:, 1]
        for hw, n in Counter(map(tuple, target.tolist())).items():
            self.hist[hw] += n
        known = np.array([tuple(t) in self.shapes for t in target.tolist()])
        self._bad(
            "target_size not a configured bucket",
            ~known,
            keys,
            lambda i: f"target_size {target[i].tolist()}",
        )
        want = tuple(int(s) for s in shape)
        wrong = np.array([self.shapes.get(tuple(t)) not in (None, want) for t in target.tolist()])
        self._bad(
            "record in the file of another bucket",
            wrong,
            keys,
            lambda i: f"target_size {target[i].tolist()} in a file of shape {list(want)}",
        )
        oh, ow = orig[:, 0].astype(np.float64), orig[:, 1].astype(np.float64)
        ok = (oh > 0) & (ow > 0) & (th > 0) & (tw > 0)
        self._bad(
            "sizes not positive",
            ~ok,
            keys,
            lambda i: f"original_size {orig[i].tolist()}, target_size {target[i].tolist()}",
        )
        oh, ow = np.where(ok, oh, 1.0), np.where(ok, ow, 1.0)
        th_f, tw_f = np.where(ok, th, 1).astype(np.float64), np.where(ok, tw, 1).astype(np.float64)
        lr = np.log(oh / ow)
        err = np.abs(lr - np.log(th_f / tw_f))
        nearest = np.argmin(np.abs(self.ratios[None, :] - lr[:, None]), axis=1)
        best = np.array(self.grid.sizes)[nearest]
        self._bad(
            "not the nearest bucket",
            ok & known & (best != target).any(axis=1),
            keys,
            lambda i: (
                f"original_size {orig[i].tolist()} in {target[i].tolist()}, "
                f"nearest {best[i].tolist()}"
            ),
        )
        inside = (lr >= self.ratios.min()) & (lr <= self.ratios.max())
        self.counts["outside the grid's ratios"] += int((ok & ~inside).sum())
        if (ok & inside).any():
            self.max_aspect_error = max(self.max_aspect_error, float(err[ok & inside].max()))
        self._bad(
            "aspect error beyond the grid's half step",
            ok & inside & (err > self.half + ASPECT_SLACK),
            keys,
            lambda i: (
                f"|log ratio error| {err[i]:.4g} > {self.half:.4g} "
                f"(original_size {orig[i].tolist()}, target_size {target[i].tolist()})"
            ),
        )
        scale = np.maximum(th_f / oh, tw_f / ow)  # pipeline.read.buckets.cover, vectorised
        rh = np.maximum(th, np.round(oh * scale).astype(np.int64))
        rw = np.maximum(tw, np.round(ow * scale).astype(np.int64))
        y, x = crop[:, 0], crop[:, 1]
        out = ok & ((y < 0) | (x < 0) | (y + th > rh) | (x + tw > rw))
        self._bad(
            "crop outside the resized image",
            out,
            keys,
            lambda i: (
                f"crop_top_left {crop[i].tolist()} + target_size "
                f"{target[i].tolist()} outside the resized {[int(rh[i]), int(rw[i])]}"
            ),
        )
        first = draw == 0
        self.counts["samples"] += int(first.sum())
        self.counts["flipped"] += int((flipped & first).sum())
        self.counts["records"] += rb.num_rows

    def summary(self) -> dict:
        if not self.active:
            return {}
        return {
            "hist": {f"{h}x{w}": n for (h, w), n in sorted(self.hist.items())},
            "counts": dict(self.counts),
            "examples": self.examples,
            "max_aspect_error": self.max_aspect_error,
        }


def merge(into: dict, part: dict) -> dict:
    """Fold one shard's :meth:`BucketScan.summary` into the dataset's (in place)."""
    if not part:
        return into
    for key in ("hist", "counts"):
        acc = into.setdefault(key, {})
        for k, v in part[key].items():
            acc[k] = acc.get(k, 0) + v
    ex = into.setdefault("examples", {})
    for k, v in part["examples"].items():
        ex.setdefault(k, []).extend(v[: max(0, EXAMPLES - len(ex.get(k, [])))])
    into["max_aspect_error"] = max(into.get("max_aspect_error", 0.0), part["max_aspect_error"])
    return into


def half_step(process: ProcessMetadata) -> float:
    """The grid's half step in log ratio (:meth:`pipeline.read.buckets.Grid.half_step`)."""
    sizes = tuple(tuple(b["size"]) for b in process.buckets or ())
    return Grid(sizes).half_step() if sizes else math.inf
