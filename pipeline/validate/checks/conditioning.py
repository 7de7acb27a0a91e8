"""The ``conditioning`` check: every draw of a sample carries the sample's kept values
(``source.keep``), with the label histograms and null counts."""

from __future__ import annotations

from pipeline.validate.checks.context import Context
from pipeline.validate.figures import kept_columns, kept_nulls, label_histograms
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, litem, verdict

NAME = "conditioning"


def conditioning(ds: DatasetStats) -> Check:
    """Every draw of a sample carries the sample's kept values: per shard and kept column, the
    records whose value differs from the first record of their key (0 expected; a label
    shifted by a row shows up wherever two draws of one key meet it), and a kept column
    missing from a file. Reports the label histograms (int64 columns) and null counts."""
    cols = kept_columns(ds)
    items, notes = [], []
    for shard, summ in sorted(ds.shards.items()):
        cond = summ.get("cond")
        if cond is None:
            continue
        for c in cols:
            if c in cond.get("missing", []):
                items.append(litem(shard, f"{c}: column missing", 1, 0))
                continue
            bad = cond.get("mismatch", {}).get(c, 0)
            items.append(
                litem(
                    shard,
                    f"{c}: records disagreeing with their key's first draw",
                    bad,
                    0,
                    examples=cond.get("examples", {}).get(c, [])[:5],
                )
            )
    if not cols:
        notes.append("no kept columns (source.keep is empty): nothing to check")
    elif ds.plan.process.draws_per_sample < 2:
        notes.append(
            "one draw per sample: no two records share a key, so a shifted label cannot show here"
        )
    hist = label_histograms(ds)
    for c, h in hist.items():
        notes.append(f"{c}: {len(h)} distinct labels over {sum(h.values())} samples")
    return verdict(
        NAME,
        [items],
        z=0.0,
        correct=False,
        notes=notes,
        statistic=sum(i["value"] for i in items),
        threshold=0,
        extra={
            "statistic_name": "records",
            "columns": cols,
            "nulls": kept_nulls(ds),
            "histograms": {c: {str(k): v for k, v in h.items()} for c, h in hist.items()},
        },
    )


def run(ctx: Context) -> Check:
    return conditioning(ctx.ds)
