"""The ``variance_preservation`` check: the moments of x_t per t-bin and channel against the
forward process, records as the unit."""

from __future__ import annotations

import math

import numpy as np

from pipeline.validate.checks.context import Context
from pipeline.validate.figures import bin_label, bin_range, flow_recon, x0_figures
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, Highlight, verdict, zitem

NAME = "variance_preservation"
# The quantities of its items (the report's plots find their bands by them).
Q_EPS = "E[x_t eps] - sigma"
Q_VAR = "E[x_t^2] - (alpha^2 E[x_0^2] + sigma^2)"
Q_MEAN = "E[x_t] - alpha E[x_0]"


def variance_preservation(ds: DatasetStats, z: float, correct: bool) -> Check:
    """Per t-bin and channel, records as the unit (the pixels of one image are correlated),
    stated in alpha_t and sigma_t so that DDPM (alpha^2 = ab, sigma^2 = 1 - ab) and rectified
    flow (alpha = 1 - sigma) share it:

    * E[mean(x_t^2)] = E[alpha^2] E[x_0^2] + E[sigma^2], i.e. Var(x_t) = alpha^2 Var(x_0) +
      sigma^2 with the mean alpha E[x_0]; SE: spread across records (+) E[alpha^2] SE(E[x_0^2]);
    * E[mean(x_t eps)] = E[sigma]: the noise enters x_t with the right coefficient;
    * E[mean(x_t)] = E[alpha] E[x_0];
    * reconstructed x_0 only: E[x_0^2] per bin equals the pooled value (t is independent of x_0).
    """
    p, C = ds.plan, ds.plan.shape[0]
    fig, items, table, notes = x0_figures(ds), [], [], []
    for b, c in ((b, c) for b in range(p.bins) for c in range(C + 1)):
        cell = ds.record_cell(b, c)
        n = cell.n
        if n < 3:
            continue
        where = f"{bin_label(p, b)}, " + ("all channels" if c == C else f"channel {c}")
        v, se = cell.linear(xt_eps=1, sqrt_1mab=-1)
        items.append(zitem(where, Q_EPS, v, 0.0, se, records=n))
        if c not in fig:
            continue
        f = fig[c]
        v, se = cell.linear(xt_ms=1, ab=-f["m2"], s2=-1)
        items.append(
            zitem(
                where,
                Q_VAR,
                v,
                0.0,
                math.hypot(se, cell["ab"] * f["se_m2"]),
                records=n,
            )
        )
        v, se = cell.linear(xt_mean=1, sqrt_ab=-f["mean"])
        items.append(
            zitem(
                where,
                Q_MEAN,
                v,
                0.0,
                math.hypot(se, cell["sqrt_ab"] * f["se_mean"]),
                records=n,
            )
        )
        x0 = ds.x0_cell(b, c)
        if not p.store_x0 and x0.n >= 3:
            v, se = x0.linear(x0_ms=1)
            items.append(
                zitem(
                    where,
                    "E[x_0^2] (reconstructed) - pooled",
                    v - f["m2"],
                    0.0,
                    math.hypot(se, f["se_m2"]),
                    records=x0.n,
                )
            )
        if c == C:  # the variance form, for the report: a mixture over the bin's t
            ab = cell["ab"]
            pred = ab * f["var"] + cell["s2"] + cell.var("sqrt_ab") * f["mean"] ** 2
            row = {
                "bin": b,
                **bin_range(p, b),  # DDPM t_lo, t_hi; flow also the grid points and a label
                "records": n,
                "alpha_bar": ab,  # alpha_t^2: DDPM's alpha_bar; flow has sigma alone
                "sigma": cell["sqrt_1mab"],
                "var_x_t": float(np.mean(ds.xt.var(ddof=0)[b])),
                "var_x_t_model": pred,
                "mean_x_t": cell["xt_mean"],
                "mean_x_t_model": cell["sqrt_ab"] * f["mean"],
            }
            if p.flow:
                del row["alpha_bar"]
            table.append(row)
    recon = f"where {flow_recon(p)}" if p.flow else f"where ab >= {p.recon_min_alpha_bar}"
    if C in fig:
        v0, src = fig[C]["var"], "stored" if p.store_x0 else f"reconstructed {recon}"
        notes.append(
            f"Var(x_0) = {v0:.4g}, E[x_0] = {fig[C]['mean']:.4g} "
            f"(x_0 {src}, {fig[C]['records']:.0f} records)"
        )
        if abs(v0 - 1) > 0.1:
            form = (
                "(1 - sigma)^2 Var(x_0) + sigma^2"
                if p.flow
                else "alpha^2 Var(x_0) + sigma^2; for DDPM Var(x_t) = 1 only for unit-variance data"
            )
            notes.append(
                Highlight(
                    "data",
                    "Var(x_0)",
                    f"data is not unit-variance (Var(x_0) = {v0:.3g}): the identity holds in its "
                    f"general form Var(x_t) = {form}",
                )
            )
    else:
        above = "with (1 - sigma)^2 at or" if p.flow else "with ab"
        notes.append(
            f"no x_0 (not stored, no record {above} above the reconstruction threshold): only "
            "E[x_t eps] = sigma checked"
        )
    if p.flow and p.grid_t is None:
        notes.append(
            "t-bins are ranges of grid points i: with a dynamic shift each sample shape (bucket) "
            "has its own grid, so the t = sigma_i T of a bin differs between bucket files"
        )
    extra = {"per_bin": table, "x0": {str(k): v for k, v in fig.items()}}
    check = verdict(NAME, [items], z=z, correct=correct, notes=notes, extra=extra)
    check.detail["bands"] = _bands(p, items)
    return check


BAND_FIELDS = ("where", "quantity", "value", "expected", "tolerance", "threshold_z", "passed")


def _bands(p, items: list) -> list[dict]:
    """The channel-averaged z items of every t-bin, for the report's plot: the measured deviation
    (``value - expected``), the ``tolerance`` the check applied (threshold z x SE), the verdict;
    all of them, where ``detail["items"]`` keeps only some."""
    out = []
    for i in items:
        if i is None or i["kind"] != "z" or not i["where"].endswith("all channels"):
            continue
        b = next(b for b in range(p.bins) if i["where"].startswith(bin_label(p, b) + ","))
        out.append({"bin": b, **bin_range(p, b)})
        out[-1].update({k: i[k] for k in BAND_FIELDS})
    return out


def run(ctx: Context) -> Check:
    return variance_preservation(ctx.ds, ctx.z, ctx.correct)
