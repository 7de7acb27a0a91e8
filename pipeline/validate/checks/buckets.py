"""The ``buckets`` check: every record of a bucketed dataset (``source.buckets``) is in a
configured bucket, the nearest to its image's aspect ratio, with its crop inside the resized
image and in the file of its bucket's shape, and the flips are what ``source.flip`` says; with
the bucket histogram (records per bucket) for the report."""

from __future__ import annotations

from scipy import stats as sps

from pipeline.output.description import ProcessMetadata
from pipeline.validate.bucketscan import half_step
from pipeline.validate.checks.context import Context
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, litem, pitem, verdict

NAME = "buckets"

# Counts of records that must be 0 (pipeline.validate.bucketscan.BucketScan)
PROBLEMS = (
    "target_size not a configured bucket",
    "not the nearest bucket",
    "aspect error beyond the grid's half step",
    "crop outside the resized image",
    "record in the file of another bucket",
    "records without the bucket columns",
    "sizes not positive",
)


def buckets(ds: DatasetStats, process: ProcessMetadata, z: float = 5.0) -> Check | None:
    """The bucket columns of every record (see the module docstring): each of :data:`PROBLEMS`
    counted against 0 over the dataset, per shard where it happens; the aspect error against
    ``original_size`` within the grid's half step for images inside the grid's range of ratios
    (those outside go to the extreme bucket: counted in a note); with ``source.flip=random`` the
    share of flipped samples against 0.5 (exact binomial test), with ``none`` no flip at all.
    None for a dataset without buckets. ``z``: the flip test's level, alpha = 2 Phi(-z)."""
    if process.buckets is None:
        return None
    b = ds.buckets
    counts, examples = b.get("counts", {}), b.get("examples", {})
    items = [
        litem("dataset", what, counts.get(what, 0), 0, examples=examples.get(what, [])[:5])
        for what in PROBLEMS
    ]
    where = {
        what: [
            f"{k}: {s['buckets'][what]}"
            for k, s in sorted(ds.shards.items())
            if (s.get("buckets") or {}).get(what)
        ]  # fmt: skip
        for what in PROBLEMS
    }
    for item in items:
        if where[item["quantity"]]:
            item["shards"] = where[item["quantity"]][:10]
    flip = (process.source or {}).get("flip", "none")
    n, k = int(counts.get("samples", 0)), int(counts.get("flipped", 0))
    flips = []
    if flip == "random" and n:
        p = sps.binomtest(k, n, 0.5).pvalue
        flips.append(pitem("dataset", "flipped share of samples (source.flip=random) vs 0.5",
                           k / n, p, samples=n))  # fmt: skip
    elif n:
        flips.append(litem("dataset", "flipped samples (source.flip=none)", k, 0))
    hist = b.get("hist", {})
    configured = [f"{h}x{w}" for h, w in (bb["size"] for bb in process.buckets)]
    table = [
        {"bucket": name, "records": hist.get(name, 0),
         "share": hist.get(name, 0) / max(1, sum(hist.values()))}
        for name in configured + sorted(set(hist) - set(configured))
    ]  # fmt: skip
    half = half_step(process)
    notes = [
        f"{len([r for r in table if r['records']])} of {len(configured)} buckets used; "
        f"largest aspect error {b.get('max_aspect_error', 0.0):.4f} (log ratio) vs the grid's "
        f"half step {half:.4f}"
    ]
    outside = counts.get("outside the grid's ratios", 0)
    if outside:
        notes.append(
            f"{outside} records come from images whose aspect ratio lies outside the grid's "
            "(source.max_aspect): they go to the extreme bucket, and their aspect error is not "
            "bounded by the half step (checked: it is their nearest bucket)"
        )
    return verdict(
        NAME,
        [items, [f for f in flips if f is not None]],
        z=z,
        correct=False,
        notes=notes,
        extra={
            "histogram": table,
            "flip": {"mode": flip, "samples": n, "flipped": k},
            "half_step": half,
            "max_aspect_error": b.get("max_aspect_error", 0.0),
        },
    )


def run(ctx: Context) -> Check | None:
    return buckets(ctx.ds, ctx.ds.plan.process, ctx.z)
