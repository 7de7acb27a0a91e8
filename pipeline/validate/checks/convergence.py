"""The ``convergence`` check: x_t in the top t-bin against the model and against N(0, I), and
the schedule's terminal mean shift."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from pipeline.validate.checks.context import Context
from pipeline.validate.features import CROSS
from pipeline.validate.figures import bin_label, bin_range, flow_recon, per_bin, x0_figures
from pipeline.validate.measures import DatasetStats
from pipeline.validate.stats import correlation
from pipeline.validate.verdict import Check, Highlight, corr_item, litem, pitem, verdict, zitem

NAME = "convergence"
X0, XT = CROSS.index("x0"), CROSS.index("xt")


def convergence(ds: DatasetStats, schedule, z: float, correct: bool, max_shift: float) -> Check:
    """x_t in the top t-bin against the model (errors) and against N(0, I) (warnings); the
    schedule's terminal figures: alpha_T (DDPM: sqrt(alpha_bar_T)) > max_shift is a warning
    naming the remedy; where alpha_t = 0 (flow's sigma = 1), x_T equals eps exactly, record by
    record (an error otherwise)."""
    p, C, b = ds.plan, ds.plan.shape[0], ds.plan.bins - 1
    term, fig, where = schedule.terminal(), x0_figures(ds), f"{bin_label(p, b)}, all channels"
    alpha = "1 - sigma_T" if p.flow else "sqrt(alpha_bar_T)"  # in the process's own terms
    shift = litem(
        "schedule",
        f"terminal mean shift alpha_T = {alpha}",
        term["mean_shift"],
        max_shift,
        "warning",
    )
    if not shift["passed"] and p.flow:  # never on diffusers' grids: sigma_T = 1 on every one
        shift["message"] = (
            f"terminal SNR not negligible: sigma_T = {term['sigma_T']:.3g}, x_T keeps "
            f"{term['mean_shift']:.3g} x_0"
        )
    elif not shift["passed"]:
        shift["message"] = (
            f"terminal SNR not negligible: alpha_bar_T = {term['alpha_bar_T']:.3g}, x_T keeps "
            f"{term['mean_shift']:.3g} x_0; remedy: schedule.zero_terminal_snr=true"
        )
    notes, model, normal = [], [], []
    cell = ds.record_cell(b, C)
    n, ab, a = cell.n, cell["ab"], cell["sqrt_ab"]
    if n >= 3:
        v, se = cell.linear(xt_mean=1)
        v2, se2 = cell.linear(xt_ms=1)
        normal += [
            zitem(where, "E[x_T] vs N(0, I)", v, 0.0, se, "warning", records=n),
            zitem(where, "E[x_T^2] vs N(0, I)", v2, 1.0, se2, "warning", records=n),
        ]
        if C in fig:
            f = fig[C]
            model += [
                zitem(
                    where,
                    "E[x_T] vs model",
                    v,
                    a * f["mean"],
                    math.hypot(se, a * f["se_mean"]),
                    records=n,
                ),
                zitem(
                    where,
                    "E[x_T^2] vs model",
                    v2,
                    ab * f["m2"] + cell["s2"],
                    math.hypot(se2, ab * f["se_m2"]),
                    records=n,
                ),
            ]
    cb, nb = per_bin(ds.cross, p.bins)
    if nb[b] > 2 and n >= 3:
        r, expected = (
            correlation(nb[b], cb[b], XT, X0),
            a * math.sqrt(cb[b][X0, X0] / cb[b][XT, XT]),
        )
        a_x = "(1 - sigma)" if p.flow else "sqrt(ab)"
        model.append(
            corr_item(where, f"corr(x_T, x_0) vs model {a_x} sd(x_0)/sd(x_T)", r, nb[b], expected)
        )
        normal.append(corr_item(where, "corr(x_T, x_0) vs 0", r, nb[b], 0.0, "warning"))
    else:
        if p.store_x0:  # x_0 is there: the top bin has too few records
            why = f"the top t-bin holds {n:.0f} of the 3 records it needs"
        elif p.flow:
            why = f"x_0 not stored (reconstructed only where {flow_recon(p)})"
        else:
            why = "x_0 not stored (not reconstructable at small ab)"
        notes.append(
            Highlight("not_checked", "corr(x_T, x_0)", f"corr(x_T, x_0) NOT checked: {why}")
        )
    xs = ds.xT_res.sample().astype(np.float64)
    if len(xs) >= 20:
        ks = sps.kstest(xs, "norm")
        normal.append(
            pitem(where, "KS D of x_T vs N(0,1)", ks.statistic, ks.pvalue, "warning", n=len(xs))
        )
    extra = {
        "terminal": term,
        "exact_terminal": [ds.counts["terminal_checked"], ds.counts["terminal_mismatch"]],
        "window": bin_range(p, b) if p.flow else [p.edges[b], p.edges[b + 1]],
        "records": n,
        "threshold_mean_shift": max_shift,
    }
    if ds.counts["terminal_checked"]:
        model.append(
            litem(
                "records at alpha_t = 0",
                "x_T != eps (bytes)",
                ds.counts["terminal_mismatch"],
                0,
                checked=ds.counts["terminal_checked"],
            )
        )
    fams = [[shift], model, normal]
    return verdict(NAME, fams, z=z, correct=correct, notes=notes, extra=extra)


def run(ctx: Context) -> Check:
    return convergence(ctx.ds, ctx.schedule, ctx.z, ctx.correct, float(ctx.cfg.terminal_mean_shift))
