"""The ``epsilon_normality`` check: Kolmogorov-Smirnov and Cramer-von Mises tests of eps
against N(0, 1), on the merged reservoir and per shard."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from pipeline.validate.checks.context import Context
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, pitem, verdict

NAME = "epsilon_normality"


def epsilon_normality(ds: DatasetStats, z: float, correct: bool) -> Check:
    """Kolmogorov-Smirnov and Cramer-von Mises against N(0, 1) (fully specified) on the merged
    reservoir; KS per shard on each shard's reservoir."""
    x, ks_name = ds.eps_res.sample().astype(np.float64), "Kolmogorov-Smirnov D vs N(0,1)"
    overall = []
    if len(x) >= 20:
        for name, res in (
            (ks_name, sps.kstest(x, "norm")),
            ("Cramer-von Mises W2 vs N(0,1)", sps.cramervonmises(x, "norm")),
        ):
            overall.append(pitem("overall", name, res.statistic, res.pvalue, n=len(x)))
    shards = [pitem(f"shard {k}", ks_name, *s["ks"]) for k, s in ds.shards.items() if "ks" in s]
    notes = [f"on a seeded reservoir of {len(x)} of {ds.eps_res.seen} eps elements"]
    return verdict(NAME, [overall, shards], z=z, correct=correct, notes=notes)


def run(ctx: Context) -> Check:
    return epsilon_normality(ctx.ds, ctx.z, ctx.correct)
