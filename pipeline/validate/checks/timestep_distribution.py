"""The ``timestep_distribution`` check: chi-square of the t histogram against the sampler's
uniform t, overall and per shard."""

from __future__ import annotations

from ...stats import chi2_binned
from ..measures import DatasetStats
from ..verdict import Check, litem, pitem, verdict
from .context import Context

NAME = "timestep_distribution"


def timestep_distribution(ds: DatasetStats, sampler: str, z: float, correct: bool) -> Check:
    """Chi-square of the t histogram against uniform t. Overall: every t (if n >= 5 T) else
    ``bins`` ranges, by p-value. Per shard (<= ``bins`` ranges, >= 5 expected each): uniform
    sampler by p-value; stratified by chi2 <= df (the expectation under iid uniform sampling),
    by p-value for shards with > 10% rejected samples (gaps in the sequence)."""
    T, n = ds.T, int(ds.t_hist.sum())
    overall, shards, limits = [], [], []
    nb = T if n >= 5 * T else min(ds.plan.bins, n // 5)
    if nb >= 2:
        stat, pv, df, _ = chi2_binned(ds.t_hist, nb)
        overall.append(pitem("overall", f"chi2({df}) of t in {nb} ranges", stat, pv, n=n))
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
        notes=[f"sampler: {sampler}"],
    )


def run(ctx: Context) -> Check:
    return timestep_distribution(ctx.ds, ctx.noise.sampler, ctx.z, ctx.correct)
