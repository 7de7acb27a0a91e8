"""The ``keyed_noise`` check: (t, eps) of a seeded sample of records regenerated from their
identity (seed, shard, key, draw) and compared exactly."""

from __future__ import annotations

from pipeline.validate.checks.context import Context
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, litem, verdict

NAME = "keyed_noise"


def keyed_noise(ds: DatasetStats, z: float, correct: bool) -> Check:
    """(t, eps) of a seeded sample of records regenerated from (seed, shard, key, draw)."""
    n, c = ds.counts["keyed_checked"], ds.counts
    stat_name = {"statistic_name": "mismatches"}
    if not n:
        notes = ["skipped: max_consistency_records=0"]
        return verdict(
            NAME,
            [],
            z=z,
            correct=correct,
            notes=notes,
            statistic=0,
            threshold=0,
            extra=stat_name,
        )
    items = [
        litem("overall", f"{v} differs from the keyed noise", c[f"{v}_mismatch"], 0, checked=n)
        for v in ("t", "eps")
    ]
    bad = sorted(k for k, s in ds.shards.items() if s.get("keyed_mismatches"))
    items += [  # one line per damaged shard, named: "shard crops-0002: ... = 60"
        litem(f"shard {k}", "records whose (t, eps) differ from the keyed noise",
              int(ds.shards[k]["keyed_mismatches"]), 0)
        for k in bad
    ]  # fmt: skip
    notes = [
        f"{n} records regenerated; eps compared bit for bit after the cast to the stored dtype"
    ]
    notes += [f"shards with mismatches: {bad[:20]}"] if bad else []
    return verdict(
        NAME,
        [items],
        z=z,
        correct=correct,
        notes=notes,
        statistic=c["t_mismatch"] + c["eps_mismatch"],
        threshold=0,
        extra=stat_name,
    )


def run(ctx: Context) -> Check:
    return keyed_noise(ctx.ds, ctx.z, ctx.correct)
