"""The ``timestep_distribution`` check: chi-square of the histogram of grid indices against the
configured density (uniform t, or for rectified flow SD3's logit_normal / mode), overall and per
shard."""

from __future__ import annotations

from pipeline.validate.checks.context import Context
from pipeline.validate.measures import DatasetStats
from pipeline.validate.stats import chi2_binned
from pipeline.validate.verdict import Check, litem, pitem, verdict

NAME = "timestep_distribution"


def timestep_distribution(ds: DatasetStats, sampler: str, z: float, correct: bool) -> Check:
    """Chi-square of the grid-index histogram against the configured density. Uniform t:
    overall every t (if n >= 5 T) else ``bins`` ranges, by p-value; a density
    (``ds.t_pmf``): up to 50 ranges of equal probability, >= 5 records expected each. Per shard
    (<= ``bins`` ranges, >= 5 expected each): by p-value; stratified by chi2 <= df (the
    expectation under iid uniform sampling), by p-value for shards with > 10% rejected samples
    (gaps in the sequence)."""
    T, n = ds.T, int(ds.t_hist.sum())
    overall, shards, limits = [], [], []
    if ds.t_pmf is None:
        nb = T if n >= 5 * T else min(ds.plan.bins, n // 5)
    else:
        nb = min(50, n // 5)
    if nb >= 2:
        stat, pv, df, _ = chi2_binned(ds.t_hist, nb, ds.t_pmf)
        ranges = df + 1
        overall.append(pitem("overall", f"chi2({df}) of t in {ranges} ranges", stat, pv, n=n))
    for k, s in ((k, s) for k, s in ds.shards.items() if "t_chi2" in s):
        stat, pv, df = s["t_chi2"]
        if sampler == "stratified" and s["rejected_fraction"] <= 0.1:
            limits.append(
                litem(f"shard {k}", f"chi2({df}) of t, stratified: <= df", stat, float(df))
            )
        else:
            shards.append(pitem(f"shard {k}", f"chi2({df}) of t", stat, pv))
    return verdict(
        NAME,
        [overall, shards, limits],
        z=z,
        correct=correct,
        notes=[f"sampler: {sampler}" + ("" if ds.t_pmf is None else " (density on the grid)")],
    )


def run(ctx: Context) -> Check:
    return timestep_distribution(ctx.ds, ctx.noise.sampler, ctx.z, ctx.correct)
