"""Figures derived from the merged statistics that several checks (and the report) share:
t-bin labels, per-bin cross-products, the x_0 figures and the conditioning summaries."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from pipeline.validate.measures import DatasetStats
from pipeline.validate.plan import ScanPlan
from pipeline.validate.stats import GroupedCoMoments


def bin_label(plan: ScanPlan, b: int) -> str:
    """The label of t-bin ``b`` (grid points ``edges[b]`` to ``edges[b + 1] - 1``) in the t the
    records carry: DDPM ``t in [lo, hi)`` (t is the grid index); rectified flow ``t in [first,
    last]``, the t (float32 sigma_i T, as the records show it) of its first and last grid
    points, or ``grid points [lo, hi)`` when the files have several grids (a dynamic shift over
    several shapes: a grid point's t differs between them)."""
    lo, hi = plan.edges[b], plan.edges[b + 1]
    if not plan.flow:
        return f"t in [{lo}, {hi})"
    if plan.grid_t is None:
        return f"grid points [{lo}, {hi})"
    return f"t in [{t_text(plan.grid_t[lo])}, {t_text(plan.grid_t[hi - 1])}]"


def bin_range(plan: ScanPlan, b: int) -> dict:
    """t-bin ``b``'s range in the report's JSON: DDPM ``t_lo``, ``t_hi`` (grid indices,
    half-open); rectified flow ``grid_lo``, ``grid_hi`` (grid indices, half-open), its
    :func:`bin_label` and, when the files have one grid, ``t_lo``, ``t_hi``: the t of its first
    and last grid points (closed), the exact float32 values the records carry."""
    lo, hi = plan.edges[b], plan.edges[b + 1]
    if not plan.flow:
        return {"t_lo": lo, "t_hi": hi}
    out = {"grid_lo": lo, "grid_hi": hi, "label": bin_label(plan, b)}
    if plan.grid_t is not None:
        out.update(t_lo=plan.grid_t[lo], t_hi=plan.grid_t[hi - 1])
    return out


def t_text(t: float) -> str:
    """A flow record's t (a float32) as the records show it: the shortest text that reads back
    as the same float32 (``np.float32(text) == t``)."""
    return str(np.float32(t))


def flow_recon(plan: ScanPlan) -> str:
    """Where a flow dataset's x_0 is reconstructed, (x_t - sigma eps) / (1 - sigma) for records
    with alpha_t^2 >= ``reconstruct_min_alpha_bar``, in flow's terms."""
    thr = plan.recon_min_alpha_bar
    return f"(1 - sigma)^2 >= {thr}, i.e. sigma <= 1 - sqrt({thr}) = {1 - math.sqrt(thr):.4g}"


def per_bin(c: GroupedCoMoments, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Within-cell cross-product matrices and counts summed over channels: [bins, d, d], [bins]."""
    return c.c.reshape(bins, -1, c.dim, c.dim).sum(axis=1), c.n.reshape(bins, -1).sum(axis=1)


def x0_figures(ds: DatasetStats) -> dict:
    """Per channel c (c = C: channels averaged): records, E[x_0], E[x_0^2], Var(x_0) and the
    standard errors of the first two across records."""
    C = ds.plan.shape[0]
    out = {}
    for c in range(C + 1):
        cell = ds.x0_pooled(c)
        if cell.n >= 3:
            mu, se_mu = cell.linear(x0_mean=1)
            m2, se_m2 = cell.linear(x0_ms=1)
            out[c] = {
                "records": cell.n,
                "mean": mu,
                "se_mean": se_mu,
                "m2": m2,
                "se_m2": se_m2,
                "var": m2 - mu * mu,
            }
    if C in out and C > 1:  # the average of the channels' variances, not of the pooled pixels
        out[C]["var"] = float(np.mean([out[c]["var"] for c in range(C)]))
    return out


def kept_columns(ds: DatasetStats) -> list[str]:
    """The kept conditioning columns (``source.keep``) of the dataset."""
    spec = ds.plan.process.conditioning or {}
    return [c["column"] for c in spec.get("columns", [])]


def kept_nulls(ds: DatasetStats) -> dict[str, int]:
    """Null records per kept column over the scanned shards (every kept column listed)."""
    total = Counter({c: 0 for c in kept_columns(ds)})
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
