"""The ``noise_independence`` check: noise reused or shared between records, or correlated with
the data."""

from __future__ import annotations

import math

from pipeline.validate.checks.context import Context
from pipeline.validate.features import CROSS
from pipeline.validate.figures import bin_label, flow_recon, per_bin
from pipeline.validate.measures import DatasetStats
from pipeline.validate.stats import correlation, shared_chi2
from pipeline.validate.verdict import (
    Check,
    Highlight,
    corr_item,
    family_z,
    litem,
    pitem,
    verdict,
    zitem,
)

NAME = "noise_independence"
EPS, X0 = CROSS.index("eps"), CROSS.index("x0")


def noise_independence(ds: DatasetStats, z: float, correct: bool) -> Check:
    """Noise reused or shared between records, or correlated with the data:

    * duplicate eps records (12-byte hashes of their stored bytes, whole dataset);
    * a component shared by many records: sum over positions of n mean(eps)^2 ~ chi2(d);
    * correlation of consecutive records' eps: mean z (N(0, 1)) and max |z| (Bonferroni);
    * corr(eps, x_0) overall, per t-bin, per shard (x_0 stored or reconstructed), SE 1/sqrt(n).
    """
    p, notes = ds.plan, []
    dups, examples = ds.duplicates
    fams = [
        [litem("overall", "records whose eps bytes repeat another's", dups, 0, examples=examples)]
    ]
    stat, pval, d = shared_chi2(ds.pos_sum, ds.pos_n)
    if ds.pos_n < 2:
        notes.append(
            f"shared noise component: NOT tested ({ds.pos_n} records of shape "
            f"{list(p.shape)}, the shape the statistics per position are taken at)"
        )
    name = "shared noise component: chi2(d) of n mean(eps)^2 per position"
    fams.append([pitem("overall", name, stat, pval, d=d)])
    fams[-1] += [
        pitem(f"shard {k}", name, *s["shared_chi2"])
        for k, s in ds.shards.items()
        if "shared_chi2" in s
    ]
    if ds.adj["n"]:
        n_adj = ds.adj["n"]
        zmax = family_z(z, n_adj, correct)
        fams.append(
            [
                zitem(
                    "overall",
                    "mean of corr(eps_i, eps_i+1) sqrt(d - 1), times sqrt(pairs)",
                    ds.adj["sum_z"] / math.sqrt(n_adj),
                    0.0,
                    1.0,
                    pairs=n_adj,
                ),
                litem(
                    "overall",
                    "max |corr(eps_i, eps_i+1)| sqrt(d - 1)",
                    ds.adj["max_abs_z"],
                    zmax,
                    pairs=n_adj,
                ),
            ]
        )
    cb, nb = per_bin(ds.cross, p.bins)
    if nb.sum() > 2:
        q = "corr(eps, x_0)"
        fams.append(
            [corr_item("overall", q, correlation(nb.sum(), cb.sum(axis=0), EPS, X0), nb.sum())]
        )
        fams.append(
            [
                corr_item(bin_label(p, b), q, correlation(nb[b], cb[b], EPS, X0), nb[b])
                for b in range(p.bins)
            ]
        )
        fams.append(
            [
                corr_item(f"shard {k}", q, s["corr_eps_x0"][1], s["corr_eps_x0"][0])
                for k, s in ds.shards.items()
                if "corr_eps_x0" in s
            ]
        )
        if not p.store_x0:
            how = (
                f"(x_t - sigma eps)/(1 - sigma) where {flow_recon(p)}"
                if p.flow
                else f"(x_t - sqrt(1-ab) eps)/sqrt(ab) where ab >= {p.recon_min_alpha_bar}"
            )
            notes.append(f"x_0 reconstructed as {how}: a wrong x_t makes it correlate with eps")
    else:
        notes.append(
            Highlight(
                "not_checked",
                "corr(eps, x_0)",
                "corr(eps, x_0) NOT checked: x_0 neither stored nor reconstructable",
            )
        )
    notes.append(
        "corr(eps, x_0): within (t-bin, channel) cells; SE 1/sqrt(elements), exact under H0 as "
        "eps is iid"
    )
    return verdict(NAME, fams, z=z, correct=correct, notes=notes)


def run(ctx: Context) -> Check:
    return noise_independence(ctx.ds, ctx.z, ctx.correct)
