"""The named checks of pipeline.validate: verdicts from the merged statistics of a scan.

:class:`pipeline.scan.DatasetStats` holds the merged per-shard statistics of
:func:`pipeline.scan.scan_shard`. Each check function turns them into a :class:`Check`: a list
of items, each a statistic with its expected value and a tolerance of ``z`` standard errors
(``kind="z"``), a p-value against ``alpha = 2 Phi(-z)`` (``kind="p"``), or a count/figure
against a limit (``kind="limit"``). Items come in families (per shard, per channel, per t-bin,
...): with ``family_correction`` a family of m tests uses z_m = Phi^-1(1 - Phi(-z)/m)
(Bonferroni), so each family's false-alarm probability stays about 2 Phi(-z) (5.7e-7 at z = 5)
whatever the dataset size. An item's ``severity`` is "error" (fails the check) or "warning"
(reported, passes). A check's notes explain it; those a reader must not miss (what this dataset
could not show, what about the data explains the numbers) are also :class:`Highlight` s.
"""

from __future__ import annotations

import math
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

from .manifest import COMMITTED, REJECTS, SHARDS, OutputDir
from .scan import DatasetStats, ScanPlan
from .stats import GroupedCoMoments, chi2_binned, correlation, linear_mean_se, shared_chi2

# -- verdicts ------------------------------------------------------------------------------


HIGHLIGHT_KINDS = ("not_checked", "data")


@dataclass(frozen=True)
class Highlight:
    """A note of a check that the CLI prints under the summary table.

    ``kind`` is "not_checked" (a property this dataset cannot show, e.g. without stored x_0) or
    "data" (a property of the data, not a defect, that explains the figures); ``subject`` names
    what it is about; ``text`` is the sentence shown (it is also one of the check's notes).
    """

    kind: str
    subject: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in HIGHLIGHT_KINDS:
            raise ValueError(f"Highlight kind must be one of {HIGHLIGHT_KINDS}, got {self.kind!r}")


@dataclass
class Check:
    """One named check: ``passed`` is False only for errors; warnings pass with a message."""

    name: str
    passed: bool
    severity: str  # "info" (all good), "warning" (passed with a warning), "error" (failed)
    statistic: float | None  # see detail["statistic_name"]
    threshold: float | None
    summary: str
    detail: dict
    highlights: list[Highlight] = field(default_factory=list)


def family_z(z: float, m: int, correct: bool = True) -> float:
    """z threshold for a family of m tests: each at two-sided level 2 Phi(-z) / m (Bonferroni)."""
    return float(sps.norm.isf(sps.norm.sf(z) / m)) if correct and m > 1 else float(z)


def _finite(*v) -> bool:
    return all(x is not None and math.isfinite(x) for x in v)


def _item(kind, where, quantity, value, severity, **fields) -> dict:
    value = float(value) if isinstance(value, (float, np.floating)) else value
    return dict(where=where, quantity=quantity, value=value, severity=severity, kind=kind, **fields)


def zitem(where, quantity, value, expected, se, severity="error", **extra) -> dict | None:
    """A z-test item (its threshold is set by :func:`verdict`); None when not computable.
    With ``records=n`` its SE was estimated from n records: the threshold is then Student t's
    with n - 1 degrees of freedom at the same tail probability."""
    if not _finite(value, expected, se) or se <= 0:
        return None
    z = float((value - expected) / se)
    return _item(
        "z", where, quantity, value, severity, expected=float(expected), se=float(se), z=z, **extra
    )


def pitem(where, quantity, value, p, severity="error", **extra) -> dict | None:
    """A test item decided by its p-value against the family's alpha = 2 Phi(-z_m)."""
    if not _finite(value, p):
        return None
    return _item("p", where, quantity, value, severity, p_value=float(p), **extra)


def litem(where, quantity, value, limit, severity="error", **extra) -> dict:
    """A limit item: passes when value <= limit (counts of violations, figures vs thresholds)."""
    return _item(
        "limit", where, quantity, value, severity, limit=limit, passed=bool(value <= limit), **extra
    )


def corr_item(where, quantity, r, n, expected=0.0, severity="error") -> dict | None:
    """A correlation over n iid-noise elements: SE 1/sqrt(n) under H0."""
    return zitem(where, quantity, r, expected, 1 / math.sqrt(n), severity, n=n) if n > 2 else None


def verdict(
    name: str,
    families: Sequence[Sequence[dict | None]],
    *,
    z: float,
    correct: bool,
    notes: Sequence[str | Highlight] = (),
    statistic: float | None = None,
    threshold: float | None = None,
    extra: dict | None = None,
) -> Check:
    """A Check from families of items; each family gets its own multiple-test threshold z_m
    (``z`` raised for its size when ``correct``). None items (not computable) are dropped.

    Its statistic is the largest |z| (vs the largest z_m), else the smallest p-value (vs its
    alpha), unless given (a count or ratio vs its ``threshold``). ``notes`` are text, or
    :class:`Highlight` s (kept in the notes as their text, and in ``Check.highlights``);
    ``extra`` adds to ``Check.detail``.
    """
    items = []
    for fam in families:
        fam = [i for i in fam if i is not None]
        zf = family_z(z, sum(i["kind"] != "limit" for i in fam), correct)
        for i in fam:
            if i["kind"] == "z":  # SE estimated from n records: Student t, n - 1 df
                df = i.get("records", math.inf) - 1
                thr = zf if df > 1e5 else float(sps.t.isf(sps.norm.sf(zf), df))
                i.update(threshold_z=thr, tolerance=thr * i["se"], passed=abs(i["z"]) <= thr)
            elif i["kind"] == "p":
                i.update(alpha=float(2 * sps.norm.sf(zf)))
                i["passed"] = i["p_value"] >= i["alpha"]
        items += fam
    stat_name = "given"
    zs = [i for i in items if i["kind"] == "z"]
    ps = [i for i in items if i["kind"] == "p"]
    if statistic is None and zs:
        worst = max(zs, key=lambda i: abs(i["z"]) / i["threshold_z"])
        statistic, threshold, stat_name = abs(worst["z"]), worst["threshold_z"], "max |z|"
    elif statistic is None and ps:
        worst = min(ps, key=lambda i: i["p_value"] / i["alpha"])
        statistic, threshold, stat_name = worst["p_value"], worst["alpha"], "min p-value"
    errors = [i for i in items if not i["passed"] and i["severity"] == "error"]
    warns = [i for i in items if not i["passed"] and i["severity"] == "warning"]
    if errors:
        summary = f"{len(errors)} of {len(items)} items failed, e.g. " + describe(errors[0])
    else:
        summary = "WARNING: " + describe(warns[0]) if warns else f"{len(items)} items passed"
    keep = (errors + warns)[:100] + [i for i in items if i["passed"] and i["where"] == "overall"]
    keep += sorted((i for i in zs if i not in keep), key=lambda i: -abs(i["z"]))[:5]
    detail = {
        "statistic_name": stat_name,
        "n_items": len(items),
        "items": keep,
        "notes": [n.text if isinstance(n, Highlight) else n for n in notes],
    }
    return Check(
        name=name,
        passed=not errors,
        severity="error" if errors else "warning" if warns else "info",
        statistic=None if statistic is None else float(statistic),
        threshold=None if threshold is None else float(threshold),
        summary=summary,
        detail={**detail, **(extra or {})},
        highlights=[n for n in notes if isinstance(n, Highlight)],
    )


def describe(i: dict) -> str:
    """One line for an item: where, what, value and why it failed."""
    head = f"{i['where']}: {i['quantity']} = {_fmt(i['value'])}"
    if i["kind"] == "z":
        return head + f" vs {_fmt(i['expected'])} +- {_fmt(i['tolerance'])} (z = {i['z']:.1f})"
    if i["kind"] == "p":
        return head + f", p = {i['p_value']:.2g} vs alpha {i['alpha']:.2g}"
    tail = f": {i['message']}" if "message" in i else ""
    tail += f": {', '.join(map(str, i['examples'][:3]))}" if i.get("examples") else ""
    return head + f" (limit {_fmt(i['limit'])})" + tail


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _bin(plan: ScanPlan, b: int) -> str:
    return f"t in [{plan.edges[b]}, {plan.edges[b + 1]})"


def _per_bin(c: GroupedCoMoments, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Within-cell cross-product matrices and counts summed over channels: [bins, d, d], [bins]."""
    return c.c.reshape(bins, -1, c.dim, c.dim).sum(axis=1), c.n.reshape(bins, -1).sum(axis=1)


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
        [i for b in range(p.bins) for i in _four(_bin(p, b), tb[b].summary())],
        [i for k, s in ds.shards.items() if "eps" in s for i in _four(f"shard {k}", s["eps"])],
    ]
    notes = ["SE under normality, n = eps elements"]
    return verdict("epsilon_moments", fams, z=z, correct=correct, notes=notes)


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
    return verdict("epsilon_normality", [overall, shards], z=z, correct=correct, notes=notes)


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
    cb, nb = _per_bin(ds.cross, p.bins)
    if nb.sum() > 2:
        q = "corr(eps, x_0)"
        fams.append([corr_item("overall", q, correlation(nb.sum(), cb.sum(axis=0)), nb.sum())])
        fams.append(
            [corr_item(_bin(p, b), q, correlation(nb[b], cb[b]), nb[b]) for b in range(p.bins)]
        )
        fams.append(
            [
                corr_item(f"shard {k}", q, s["corr_eps_x0"][1], s["corr_eps_x0"][0])
                for k, s in ds.shards.items()
                if "corr_eps_x0" in s
            ]
        )
        if not p.process["store_x0"]:
            notes.append(
                "x_0 reconstructed as (x_t - sqrt(1-ab) eps)/sqrt(ab) where ab >= "
                f"{p.recon_min_alpha_bar}: a wrong x_t makes it correlate with eps"
            )
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
    return verdict("noise_independence", fams, z=z, correct=correct, notes=notes)


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
    if not ds.plan.process["store_x0"]:
        notes.append(
            Highlight(
                "not_checked",
                "x_t",
                "x_t = sqrt(ab) x_0 + sqrt(1-ab) eps is NOT checkable record by record without "
                "stored x_0 (any x_t defines an x_0): covered statistically by "
                "variance_preservation (E[x_t eps] = sqrt(1-ab)) and noise_independence "
                "(corr(eps, x_0)), exactly by keyed_noise",
            )
        )
        notes.append(
            Highlight(
                "not_checked",
                "posterior_mean",
                "posterior_mean checked from reconstructed x_0 where alpha_bar >= "
                f"{ds.plan.recon_min_alpha_bar}; NOT checked for {ds.counts['unchecked_pm']} "
                "records below",
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
        "record_consistency",
        [items],
        z=z,
        correct=correct,
        notes=notes,
        statistic=ratio,
        threshold=1.0,
        extra={"statistic_name": "max error / tolerance"},
    )


def keyed_noise(ds: DatasetStats, z: float, correct: bool) -> Check:
    """(t, eps) of a seeded sample of records regenerated from (seed, shard, key, draw)."""
    n, c = ds.counts["keyed_checked"], ds.counts
    stat_name = {"statistic_name": "mismatches"}
    if not n:
        notes = ["skipped: max_consistency_records=0"]
        return verdict(
            "keyed_noise",
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
    notes = [
        f"{n} records regenerated; eps compared bit for bit after the cast to the stored dtype"
    ]
    notes += [f"shards with mismatches: {bad[:20]}"] if bad else []
    return verdict(
        "keyed_noise",
        [items],
        z=z,
        correct=correct,
        notes=notes,
        statistic=c["t_mismatch"] + c["eps_mismatch"],
        threshold=0,
        extra=stat_name,
    )


def x0_figures(ds: DatasetStats) -> dict:
    """Per channel c (c = C: channels averaged): records, E[x_0], E[x_0^2], Var(x_0) and the
    standard errors of the first two across records."""
    B, C = ds.plan.bins, ds.plan.shape[0]
    out = {}
    for c in range(C + 1):
        n, mean, cm = ds.x0rec.pooled([(b, c) for b in range(B)])
        if n >= 3:
            mu, se_mu = linear_mean_se(n, mean, cm, [1, 0])
            m2, se_m2 = linear_mean_se(n, mean, cm, [0, 1])
            out[c] = {
                "records": n,
                "mean": mu,
                "se_mean": se_mu,
                "m2": m2,
                "se_m2": se_m2,
                "var": m2 - mu * mu,
            }
    if C in out and C > 1:  # the average of the channels' variances, not of the pooled pixels
        out[C]["var"] = float(np.mean([out[c]["var"] for c in range(C)]))
    return out


def variance_preservation(ds: DatasetStats, z: float, correct: bool) -> Check:
    """Per t-bin and channel, records as the unit (the pixels of one image are correlated):

    * E[mean(x_t^2)] = E[ab] E[x_0^2] + 1 - E[ab], i.e. Var(x_t) = ab Var(x_0) + 1 - ab with the
      mean sqrt(ab) E[x_0]; SE: spread across records (+) E[ab] SE(E[x_0^2]);
    * E[mean(x_t eps)] = E[sqrt(1 - ab)]: the noise enters x_t with the right coefficient;
    * E[mean(x_t)] = E[sqrt(ab)] E[x_0];
    * reconstructed x_0 only: E[x_0^2] per bin equals the pooled value (t is independent of x_0).
    """
    p, C = ds.plan, ds.plan.shape[0]
    fig, items, table, notes = x0_figures(ds), [], [], []
    for b, c in ((b, c) for b in range(p.bins) for c in range(C + 1)):
        n, mean, cm = ds.rec.cell((b, c))
        if n < 3:
            continue
        where = f"{_bin(p, b)}, " + ("all channels" if c == C else f"channel {c}")
        v, se = linear_mean_se(n, mean, cm, [0, 0, 1, 0, 0, -1])
        items.append(zitem(where, "E[x_t eps] - sqrt(1-ab)", v, 0.0, se, records=n))
        if c not in fig:
            continue
        f = fig[c]
        v, se = linear_mean_se(n, mean, cm, [0, 1, 0, 1 - f["m2"], 0, 0])
        items.append(
            zitem(
                where,
                "E[x_t^2] - (ab E[x_0^2] + 1 - ab)",
                v - 1,
                0.0,
                math.hypot(se, mean[3] * f["se_m2"]),
                records=n,
            )
        )
        v, se = linear_mean_se(n, mean, cm, [1, 0, 0, 0, -f["mean"], 0])
        items.append(
            zitem(
                where,
                "E[x_t] - sqrt(ab) E[x_0]",
                v,
                0.0,
                math.hypot(se, mean[4] * f["se_mean"]),
                records=n,
            )
        )
        n0, m0, c0 = ds.x0rec.cell((b, c))
        if not p.process["store_x0"] and n0 >= 3:
            v, se = linear_mean_se(n0, m0, c0, [0, 1])
            items.append(
                zitem(
                    where,
                    "E[x_0^2] (reconstructed) - pooled",
                    v - f["m2"],
                    0.0,
                    math.hypot(se, f["se_m2"]),
                    records=n0,
                )
            )
        if c == C:  # the variance form, for the report: a mixture over the bin's t
            pred = mean[3] * f["var"] + 1 - mean[3] + cm[4, 4] / (n - 1) * f["mean"] ** 2
            table.append(
                {
                    "bin": b,
                    "t_lo": p.edges[b],
                    "t_hi": p.edges[b + 1],
                    "records": n,
                    "alpha_bar": mean[3],
                    "var_x_t": float(np.mean(ds.xt.var(ddof=0)[b])),
                    "var_x_t_model": pred,
                    "mean_x_t": mean[0],
                    "mean_x_t_model": mean[4] * f["mean"],
                }
            )
    if C in fig:
        v0, src = (
            fig[C]["var"],
            "stored"
            if p.process["store_x0"]
            else f"reconstructed where ab >= {p.recon_min_alpha_bar}",
        )
        notes.append(
            f"Var(x_0) = {v0:.4g}, E[x_0] = {fig[C]['mean']:.4g} "
            f"(x_0 {src}, {fig[C]['records']:.0f} records)"
        )
        if abs(v0 - 1) > 0.1:
            notes.append(
                Highlight(
                    "data",
                    "Var(x_0)",
                    f"data is not unit-variance (Var(x_0) = {v0:.3g}): the identity holds in its "
                    "general form Var(x_t) = ab Var(x_0) + 1 - ab; Var(x_t) = 1 only for "
                    "unit-variance data",
                )
            )
    else:
        notes.append(
            "no x_0 (not stored, no record with ab above the reconstruction threshold): only "
            "E[x_t eps] = sqrt(1-ab) checked"
        )
    extra = {"per_bin": table, "x0": {str(k): v for k, v in fig.items()}}
    return verdict("variance_preservation", [items], z=z, correct=correct, notes=notes, extra=extra)


def convergence(ds: DatasetStats, schedule, z: float, correct: bool, max_shift: float) -> Check:
    """x_t in the top t-bin against the model (errors) and against N(0, I) (warnings); the
    schedule's terminal figures: sqrt(alpha_bar_T) > max_shift is a warning naming the remedy."""
    p, C, b = ds.plan, ds.plan.shape[0], ds.plan.bins - 1
    term, fig, where = schedule.terminal(), x0_figures(ds), f"{_bin(p, b)}, all channels"
    shift = litem(
        "schedule",
        "terminal mean shift sqrt(alpha_bar_T)",
        term["mean_shift"],
        max_shift,
        "warning",
    )
    if not shift["passed"]:
        shift["message"] = (
            f"terminal SNR not negligible: alpha_bar_T = {term['alpha_bar_T']:.3g}, x_T keeps "
            f"{term['mean_shift']:.3g} x_0; remedy: schedule.zero_terminal_snr=true"
        )
    notes, model, normal = [], [], []
    n, mean, cm = ds.rec.cell((b, C))
    if n >= 3:
        v, se = linear_mean_se(n, mean, cm, [1, 0, 0, 0, 0, 0])
        v2, se2 = linear_mean_se(n, mean, cm, [0, 1, 0, 0, 0, 0])
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
                    mean[4] * f["mean"],
                    math.hypot(se, mean[4] * f["se_mean"]),
                    records=n,
                ),
                zitem(
                    where,
                    "E[x_T^2] vs model",
                    v2,
                    mean[3] * f["m2"] + 1 - mean[3],
                    math.hypot(se2, mean[3] * f["se_m2"]),
                    records=n,
                ),
            ]
    cb, nb = _per_bin(ds.cross, p.bins)
    if nb[b] > 2 and n >= 3:
        r, expected = (
            correlation(nb[b], cb[b], 2, 1),
            mean[4] * math.sqrt(cb[b][1, 1] / cb[b][2, 2]),
        )
        model.append(
            corr_item(where, "corr(x_T, x_0) vs model sqrt(ab) sd(x_0)/sd(x_T)", r, nb[b], expected)
        )
        normal.append(corr_item(where, "corr(x_T, x_0) vs 0", r, nb[b], 0.0, "warning"))
    else:
        notes.append(
            Highlight(
                "not_checked",
                "corr(x_T, x_0)",
                "corr(x_T, x_0) NOT checked: x_0 not stored (not reconstructable at small ab)",
            )
        )
    xs = ds.xT_res.sample().astype(np.float64)
    if len(xs) >= 20:
        ks = sps.kstest(xs, "norm")
        normal.append(
            pitem(where, "KS D of x_T vs N(0,1)", ks.statistic, ks.pvalue, "warning", n=len(xs))
        )
    extra = {
        "terminal": term,
        "window": [p.edges[b], p.edges[b + 1]],
        "records": n,
        "threshold_mean_shift": max_shift,
    }
    fams = [[shift], model, normal]
    return verdict("convergence", fams, z=z, correct=correct, notes=notes, extra=extra)


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
        "timestep_distribution",
        [overall, shards, limits],
        z=z,
        correct=correct,
        notes=[f"sampler: {sampler}"],
    )


PROBLEMS = (
    "failed or pending shards",
    "missing files",
    "missing commit markers",
    "damaged or mismatching commit markers",
    "files changed since their commit",
    "unreadable files",
    "row count differs from manifest",
    "records != (samples - rejected) x draws",
    "rejects.jsonl lines != rejected",
    "metadata differs from manifest",
    "duplicate (key, draw) in a shard",
    "keys without all draws",
    "files not in the manifest",
    "manifest totals differ from shards",
    "no records",
)


def _marker_problem(out: OutputDir, shard: str, entry: dict, scanned: dict, chash) -> str | None:
    """What is wrong with a committed shard's marker (its commit point), or None; the marker
    was read by the shard's scan (``scanned``: its summary in DatasetStats.shards)."""
    name = OutputDir.marker_name(shard)
    marker, error = scanned.get("marker"), scanned.get("marker_error")
    if marker is None:
        return error or f"{out.display(name)}: listed, but gone when its shard was scanned"
    for key, want in (("status", entry.get("status")), ("records", entry.get("records"))):
        if marker.get(key) != want:
            return f"{out.display(name)}: {key} {marker.get(key)!r}, manifest {want!r}"
    if marker.get("config_hash", chash) != chash:
        return f"{out.display(name)}: config hash {marker.get('config_hash')}, dataset {chash}"
    return None


def _file_changed(out: OutputDir, shard: str, scanned: dict) -> str | None:
    """How a committed file differs from what its marker recorded at commit (size, checksum),
    or None; a marker without a checksum (an older version's) is checked by size only."""
    marker, found = scanned.get("marker") or {}, scanned.get("file_check") or {}
    name = out.display(OutputDir.data_name(shard))
    if found.get("error"):
        return None  # an unreadable file is reported as such
    if marker.get("bytes") is not None and found.get("bytes") != marker["bytes"]:
        return f"{name}: {found.get('bytes')} bytes, its commit marker says {marker['bytes']}"
    if marker.get("checksum") is not None and found.get("checksum") != marker["checksum"]:
        return (
            f"{name}: checksum {str(found.get('checksum'))[:19]}, its commit marker says "
            f"{marker['checksum'][:19]} (rewritten or damaged since it was committed)"
        )
    return None


def completeness(ds: DatasetStats, out: OutputDir, manifest: dict, rejects: list | None) -> Check:
    """Every manifest shard committed, with its file (the size and checksum its marker
    recorded at commit: a file rewritten or damaged since fails), marker and row count; accounting
    records = (samples - rejected) x K and rejects.jsonl; (key, draw) unique and complete per
    shard; file metadata = manifest process; no stray files; totals add up."""
    K = int(manifest["process"]["noise"]["draws_per_sample"])
    shards = manifest.get("shards", {})
    committed = {k for k, e in shards.items() if e.get("status") in COMMITTED}
    prob: dict[str, list] = {k: [] for k in PROBLEMS}
    names = [posixpath.basename(n) for n in out.list(SHARDS)]
    markers = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
    rejected = Counter(r.get("shard") for r in rejects or () if r.get("key") is not None)
    unverified = 0  # committed by an older version: no checksum in the marker
    for k, e in sorted(shards.items()):
        s, ids = ds.shards.get(k), ds.shards.get(k, {}).get("ids", {})
        if k not in committed:
            prob["failed or pending shards"].append(f"{k} ({e.get('status')}): {e.get('error')}")
            continue
        if s is None:
            prob["missing files"].append(out.display(OutputDir.data_name(k)))
            continue
        marker_bad = (
            _marker_problem(out, k, e, s, manifest.get("config_hash")) if k in markers else None
        )
        changed = _file_changed(out, k, s) if k in markers and not marker_bad else None
        unverified += k in markers and not (s.get("marker") or {}).get("checksum")
        checks = (
            ("missing commit markers", k not in markers, k),
            ("damaged or mismatching commit markers", marker_bad, marker_bad),
            ("files changed since their commit", changed, changed),
            ("unreadable files", s["error"], f"{s['file']}: {s['error']}"),
            (
                "row count differs from manifest",
                not s["error"] and s["rows"] != e.get("records"),
                f"{k}: {s['rows']} rows, manifest {e.get('records')}",
            ),
            ("metadata differs from manifest", s["meta_problems"], f"{k}: {s['meta_problems']}"),
            (
                "records != (samples - rejected) x draws",
                e.get("records") != (e.get("samples", 0) - e.get("rejected", 0)) * K,
                f"{k}: {e.get('records')} != ({e.get('samples')} - {e.get('rejected')}) x {K}",
            ),
            (
                "rejects.jsonl lines != rejected",
                rejects is not None and rejected[k] != e.get("rejected", 0),
                f"{k}: {rejected[k]} lines, manifest {e.get('rejected')}",
            ),
            (
                "duplicate (key, draw) in a shard",
                ids.get("duplicate_key_draw"),
                f"{k}: {ids.get('duplicate_key_draw')}",
            ),
            (
                "keys without all draws",
                ids.get("keys_without_K_draws") or ids.get("draw_out_of_range"),
                f"{k}: {ids.get('keys_without_K_draws')} keys, "
                f"{ids.get('draw_out_of_range')} draws outside [0, {K})",
            ),
        )
        for what, bad, msg in checks:
            if bad:
                prob[what].append(msg)
    notes = []
    if unverified:
        notes.append(
            f"{unverified} committed files have no checksum in their marker (committed by an "
            "older version): checked by size only; rerun with output.overwrite=true to add them"
        )
    if rejects is None:
        notes.append(f"{out.display(REJECTS)} not found")
        if any(e.get("rejected") for e in shards.values()):
            prob["rejects.jsonl lines != rejected"].append(f"{out.display(REJECTS)} missing")
    prob["files not in the manifest"] += [
        out.display(n) for n in out.data_files() if n[:-8] not in committed
    ]
    prob["files not in the manifest"] += [
        out.display(OutputDir.marker_name(m)) for m in sorted(markers - set(shards))
    ]
    if sum(shards[k].get("records", 0) for k in committed) == 0:
        prob["no records"].append(f"{out.display()}: no shard holds a record: nothing to train on")
    tot = manifest.get("totals") or {}
    for key in ("records", "samples", "rejected"):
        if key in tot and tot[key] != sum(shards[k].get(key, 0) for k in committed):
            prob["manifest totals differ from shards"].append(f"totals.{key} = {tot[key]}")
    items = [litem("dataset", k, len(v), 0, examples=v[:5]) for k, v in prob.items()]
    extra = {
        "statistic_name": "problems",
        "shards": len(shards),
        "committed": len(committed),
        "not_committed": sorted(set(shards) - committed),
        "nulls": kept_nulls(ds),  # per kept column (source.keep): records without the member
    }
    if extra["nulls"]:
        notes.append(
            "records with a null kept column (member absent): "
            + ", ".join(f"{c} {n}" for c, n in extra["nulls"].items())
        )
    return verdict(  # counts against 0: no z threshold
        "completeness",
        [items],
        z=0.0,
        correct=False,
        notes=notes,
        statistic=sum(map(len, prob.values())),
        threshold=0,
        extra=extra,
    )


# -- conditioning (source.keep) --------------------------------------------------------------


def _kept_columns(ds: DatasetStats) -> list[str]:
    spec = ds.plan.process.get("conditioning") or {}
    return [c["column"] for c in spec.get("columns", [])]


def kept_nulls(ds: DatasetStats) -> dict[str, int]:
    """Null records per kept column over the scanned shards (every kept column listed)."""
    total = Counter({c: 0 for c in _kept_columns(ds)})
    for summ in ds.shards.values():
        total.update(summ.get("cond", {}).get("nulls", {}))
    return dict(total)


def label_histograms(ds: DatasetStats) -> dict[str, dict]:
    """Samples per value of each int64 kept column (e.g. cls), summed over the shards."""
    hist: dict[str, Counter] = {}
    for summ in ds.shards.values():
        for col, h in summ.get("cond", {}).get("hist", {}).items():
            hist.setdefault(col, Counter()).update({int(k): v for k, v in h.items()})
    return {c: dict(sorted(h.items())) for c, h in hist.items()}


def conditioning(ds: DatasetStats) -> Check:
    """Every draw of a sample carries the sample's kept values: per shard and kept column, the
    records whose value differs from the first record of their key (0 expected; a label
    shifted by a row shows up wherever two draws of one key meet it), and a kept column
    missing from a file. Reports the label histograms (int64 columns) and null counts."""
    cols = _kept_columns(ds)
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
    elif ds.plan.process.get("noise", {}).get("draws_per_sample", 1) < 2:
        notes.append(
            "one draw per sample: no two records share a key, so a shifted label cannot show here"
        )
    hist = label_histograms(ds)
    for c, h in hist.items():
        notes.append(f"{c}: {len(h)} distinct labels over {sum(h.values())} samples")
    return verdict(
        "conditioning",
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
