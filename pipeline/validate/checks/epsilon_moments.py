"""The ``epsilon_moments`` check: eps moments (mean, variance, skew, excess kurtosis) against
N(0, 1) overall, per channel, per t-bin and per shard."""

from __future__ import annotations

from pipeline.validate.checks.context import Context
from pipeline.validate.figures import bin_label
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, verdict, zitem

NAME = "epsilon_moments"


def _four(where: str, s: dict) -> list:
    """Items mean 0, var 1, skew 0, excess kurtosis 0 for a Moments.summary() of eps."""
    return [
        zitem(where, "mean", s["mean"], 0.0, s["se_mean"], n=s["n"]),
        zitem(where, "var", s["var"], 1.0, s["se_var"], n=s["n"]),
        zitem(where, "skew", s["skew"], 0.0, s["se_skew"], n=s["n"]),
        zitem(where, "excess kurtosis", s["excess_kurtosis"], 0.0, s["se_kurtosis"], n=s["n"]),
    ]


def epsilon_moments(ds: DatasetStats, z: float, correct: bool) -> Check:
    """eps moments vs N(0, 1): overall, per channel, per t-bin, per shard (one family each).
    n counts elements: they are iid within and across records under the null."""
    p, ch, tb = ds.plan, ds.eps.collapse(0), ds.eps.collapse(1)
    fams = [
        _four("overall", ds.eps.total().summary()),
        [i for c in range(p.shape[0]) for i in _four(f"channel {c}", ch[c].summary())],
        [i for b in range(p.bins) for i in _four(bin_label(p, b), tb[b].summary())],
        [i for k, s in ds.shards.items() if "eps" in s for i in _four(f"shard {k}", s["eps"])],
    ]
    notes = ["SE under normality, n = eps elements"]
    return verdict(NAME, fams, z=z, correct=correct, notes=notes)


def run(ctx: Context) -> Check:
    return epsilon_moments(ctx.ds, ctx.z, ctx.correct)
