"""The ``record_consistency`` check: every record's arithmetic against the schedule tables,
within the rounding of the stored dtype (counted by :mod:`pipeline.validate.accumulate`)."""

from __future__ import annotations

from pipeline.validate.checks.context import Context
from pipeline.validate.figures import flow_recon
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, Highlight, litem, verdict

NAME = "record_consistency"


def record_consistency(ds: DatasetStats, z: float, correct: bool) -> Check:
    """Every record's arithmetic against the schedule (counts of records beyond tolerance)."""
    items, notes = [], []
    for name, c in ds.consistency.items():
        if c["checked"]:
            items.append(
                litem(
                    "overall",
                    f"{name}: records beyond tolerance",
                    c["violations"],
                    0,
                    checked=c["checked"],
                    max_error_over_tolerance=c["max_ratio"],
                    worst=c.get("worst"),
                )
            )
    for k in ("nonfinite", "t_out_of_range"):
        items.append(
            litem("overall", f"records with {k.replace('_', ' ')} values", ds.counts[k], 0)
        )
    if not ds.plan.store_x0:
        # the process in its own terms: DDPM's alpha_bar (ab), flow's sigma (alpha = 1 - sigma)
        xt, s, where = (
            ("(1 - sigma) x_0 + sigma eps", "sigma", flow_recon(ds.plan))
            if ds.plan.flow
            else ("sqrt(ab) x_0 + sqrt(1-ab) eps", "sqrt(1-ab)",
                  f"alpha_bar >= {ds.plan.recon_min_alpha_bar}")
        )  # fmt: skip
        notes.append(
            Highlight(
                "not_checked",
                "x_t",
                f"x_t = {xt} is NOT checkable record by record without "
                "stored x_0 (any x_t defines an x_0): covered statistically by "
                f"variance_preservation (E[x_t eps] = {s}) and noise_independence "
                "(corr(eps, x_0)), exactly by keyed_noise",
            )
        )
        notes.append(
            Highlight(
                "not_checked",
                "posterior_mean",
                f"posterior_mean checked from reconstructed x_0 where {where}; NOT checked for "
                f"{ds.counts['unchecked_pm']} records below",
            )
        )
    notes.append(
        "tolerance: scalar columns 1 float32 ulp of the float64 table value; tensor identities: "
        "the sum of half an ulp of every stored operand times its coefficient plus 4 float32 "
        "roundoffs of the terms (a worst-case bound: values close to 1 are normal, above 1 "
        "impossible)"
    )
    ratio = max((c["max_ratio"] for c in ds.consistency.values()), default=0.0)
    return verdict(
        NAME,
        [items],
        z=z,
        correct=correct,
        notes=notes,
        statistic=ratio,
        threshold=1.0,
        extra={"statistic_name": "max error / tolerance"},
    )


def run(ctx: Context) -> Check:
    return record_consistency(ctx.ds, ctx.z, ctx.correct)
