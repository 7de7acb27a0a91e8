"""The verdict framework of the validator's checks (:mod:`pipeline.validate.checks`).

Each check turns the merged statistics of a scan into a :class:`Check`: a list of items, each
a statistic with its expected value and a tolerance of ``z`` standard errors (``kind="z"``),
a p-value against ``alpha = 2 Phi(-z)`` (``kind="p"``), or a count/figure against a limit
(``kind="limit"``). Items come in families (per shard, per channel, per t-bin, ...): with
``family_correction`` a family of m tests uses z_m = Phi^-1(1 - Phi(-z)/m) (Bonferroni), so
each family's false-alarm probability stays about 2 Phi(-z) (5.7e-7 at z = 5) whatever the
dataset size. An item's ``severity`` is "error" (fails the check) or "warning"
(reported, passes). A check's notes explain it; those a reader must not miss (what this dataset
could not show, what about the data explains the numbers) are also :class:`Highlight` s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

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
    if not items:  # nothing was checked: never a PASS (report: SKIP), and say why
        why = [n.text if isinstance(n, Highlight) else n for n in notes]
        summary = "skipped: nothing to check" + (f" ({why[0]})" if why else "")
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
