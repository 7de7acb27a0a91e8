"""What the validator measures: the mergeable statistics of a shard (:class:`Stats`, returned in
a :class:`ShardStats` by :func:`pipeline.validate.scan.scan_shard`) and their merge over the
dataset on the driver (:class:`DatasetStats`), which the checks read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.output.contracts import CommitMarker
from pipeline.validate.features import CROSS, REC, X0REC, Cell
from pipeline.validate.plan import CONSISTENCY, ScanPlan, seed_of
from pipeline.validate.stats import (
    GroupedCoMoments,
    GroupedMoments,
    Reservoir,
    chi2_binned,
    correlation,
    shared_chi2,
)

STRIP_RECORDS = 4  # records kept for the report's noising strip (x_0, eps, x_t, t)


def strip_item(x0, eps, x_t, t) -> np.ndarray:
    """Records as the rows of the strip reservoir: [n, 3 * C * P + 1] = (x_0, eps, x_t, t)."""
    n = len(t)
    parts = [np.asarray(v, dtype=np.float32).reshape(n, -1) for v in (x0, eps, x_t)]
    return np.concatenate(parts + [np.asarray(t, dtype=np.float32).reshape(n, 1)], axis=1)


def split_strip(rows: np.ndarray, shape) -> tuple[np.ndarray, ...]:
    """The inverse of :func:`strip_item`: (x_0, eps, x_t) [n, *shape] and t [n] (int64)."""
    n, m = len(rows), int(np.prod(shape))
    x0, eps, xt = (rows[:, i * m : (i + 1) * m].reshape(n, *shape) for i in range(3))
    return x0, eps, xt, rows[:, -1].astype(np.int64)


def t_pmf(process) -> np.ndarray | None:
    """P(grid index) [T] of a non-uniform timestep density (SD3's logit_normal, mode: see
    :meth:`pipeline.noising.noise.KeyedNoise.timestep_pmf`); None for uniform and stratified."""
    from pipeline.noising.noise import DENSITIES
    from pipeline.output import records

    noise = records.noise_from_metadata(process)
    return noise.timestep_pmf() if noise.sampler in DENSITIES else None


class Stats:
    """The mergeable statistics of a set of records: one shard (filled by the scan of
    :func:`pipeline.validate.scan.scan_shard`), or the whole dataset (the merge of its shards).
    ``seed`` parts make the reservoirs' random streams distinct per shard.

    Per t-bin x channel unless said otherwise:

    * elementwise moments (order 4) of eps, x_t and x_0 (stored, or reconstructed as
      ``(x_t - sqrt(1 - ab) eps) / sqrt(ab)`` where ``ab >= reconstruct_min_alpha_bar``);
    * per-record features (:data:`pipeline.validate.features.REC`, and ``X0REC`` where x_0 is
      known), with co-moments across records (standard errors then count records, not
      correlated pixels); channel index C averages the channels;
    * elementwise co-moments of (eps, x_0, x_t) (:data:`pipeline.validate.features.CROSS`);
    * the t histogram, eps summed per tensor position, correlations of eps between consecutive
      records, seeded reservoirs (eps elements, x_t elements of the top t-bin; for the plots: eps
      per tensor position [C] and whole records as ``(x_0, eps, x_t, t)`` where x_0 is stored or
      reconstructed, see :func:`strip_item`), and counts: consistency violations, invalid
      records, keyed-noise mismatches.

    The scan also returns, per shard, a 12-byte BLAKE2b hash of each record's eps bytes and the
    (key, draw) identity counts (:class:`ShardStats`).
    """

    def __init__(self, plan: ScanPlan, *seed):
        B, C, k = plan.bins, plan.shape[0], plan.reservoir_size
        self.t_hist = np.zeros(plan.T, dtype=np.int64)
        self.eps, self.xt, self.x0 = (GroupedMoments((B, C)) for _ in range(3))
        self.rec = GroupedCoMoments((B, C + 1), len(REC))
        self.x0rec = GroupedCoMoments((B, C + 1), len(X0REC))
        self.cross = GroupedCoMoments((B, C), len(CROSS))
        self.pos_sum, self.pos_n = np.zeros(C * plan.P, dtype=np.float64), 0
        self.adj = {"n": 0, "sum_z": 0.0, "max_abs_z": 0.0}
        # nonfinite, t_out_of_range, unchecked_pm, keyed_checked, t_mismatch, eps_mismatch
        self.counts: Counter = Counter()
        self.consistency = {
            c: {"checked": 0, "violations": 0, "max_ratio": 0.0} for c in CONSISTENCY
        }
        self.eps_res = Reservoir(k, seed_of(*seed, "eps"))
        self.xT_res = Reservoir(k, seed_of(*seed, "xT"))
        plots = bool(plan.grid)
        self.eps_ch = Reservoir(k if plots else 0, seed_of(*seed, "eps_ch"), (C,))
        self.strip = Reservoir(
            STRIP_RECORDS if plots else 0, seed_of(*seed, "strip"), (3 * C * plan.P + 1,)
        )

    def record_cell(self, b: int, c: int) -> Cell:
        """The per-record features (REC) of t-bin ``b``, channel ``c`` (C: channels averaged)."""
        return Cell.of(self.rec, REC, (b, c))

    def x0_cell(self, b: int, c: int) -> Cell:
        """The x_0 features (X0REC) of t-bin ``b``, channel ``c``."""
        return Cell.of(self.x0rec, X0REC, (b, c))

    def x0_pooled(self, c: int) -> Cell:
        """The x_0 features (X0REC) of channel ``c`` over every t-bin."""
        bins = self.x0rec.shape[0]
        return Cell.pooled(self.x0rec, X0REC, [(b, c) for b in range(bins)])

    def merge(self, other: Stats, where: str = "") -> Stats:
        """Add the statistics of disjoint records (in place); ``where`` names them in 'worst'."""
        for name in ("eps", "xt", "x0", "rec", "x0rec", "cross", "eps_res", "xT_res"):
            getattr(self, name).merge(getattr(other, name))
        for name in ("eps_ch", "strip"):
            getattr(self, name).merge(getattr(other, name))
        self.t_hist += other.t_hist
        self.pos_sum += other.pos_sum
        self.pos_n += other.pos_n
        a, o = self.adj, other.adj
        self.adj = {
            "n": a["n"] + o["n"],
            "sum_z": a["sum_z"] + o["sum_z"],
            "max_abs_z": max(a["max_abs_z"], o["max_abs_z"]),
        }
        self.counts.update(other.counts)
        for name, c in other.consistency.items():
            mine = self.consistency[name]
            mine["checked"] += c["checked"]
            mine["violations"] += c["violations"]
            if c["max_ratio"] > mine["max_ratio"]:
                mine.update(max_ratio=c["max_ratio"], worst={"shard": where, **c.get("worst", {})})
        return self


@dataclass
class ShardStats:
    """What :func:`pipeline.validate.scan.scan_shard` returns: a shard's statistics, identities
    and noise hashes, or the error that stopped its scan."""

    shard: str
    file: str
    num_rows: int = 0
    error: str | None = None
    meta: dict = field(default_factory=dict)
    meta_problems: list = field(default_factory=list)
    seconds: float = 0.0
    stats: Stats | None = None
    hashes: np.ndarray | None = None  # [records, 12] uint8: BLAKE2b of each record's eps bytes
    marker: CommitMarker | None = None  # _shards/<shard>.json (attested part); None: absent
    marker_error: str | None = None  # why the marker could not be read
    file_check: dict = field(default_factory=dict)  # the file's bytes and checksum (file_check)
    ids: dict = field(default_factory=dict)
    cond: dict = field(default_factory=dict)  # CondScan.summary(): kept columns' figures
    buckets: dict = field(default_factory=dict)  # BucketScan.summary(): aspect-ratio buckets
    cost: dict = field(default_factory=dict)  # seconds per part of the scan (Cost)
    died: bool = False  # its scan's process died: nothing was read (no marker, no file check)


class DatasetStats(Stats):
    """The merged statistics plus small per-shard summaries and the duplicate-noise verdict.

    Shards are folded in as they arrive (:meth:`add`), so the driver holds O(reservoirs +
    positions) whatever the number of shards. The noise hashes are not held here: the executor
    (:mod:`pipeline.validate.executor`) keeps them bucketed by prefix outside the driver's memory
    and sets :attr:`duplicates` from their check (:mod:`pipeline.validate.noisehash`).
    """

    def __init__(self, plan: ScanPlan, manifest_shards: dict):
        super().__init__(plan, plan.seed, "dataset")
        self.plan, self.entries, self.T = plan, manifest_shards, plan.T
        self.shards: dict[str, dict] = {}
        self.duplicates: tuple[int, list] = (0, [])  # set by the executor
        self.executor: str | None = None  # set by the executor: "ray" or "local"
        self.source_kind = None
        self.cost: Counter = Counter()  # seconds per scan part, summed over the shards
        self.wall: dict[str, float] = {}  # the driver's phases (pipeline.validate.driver.run)
        self.t_pmf = t_pmf(plan.process)  # None: uniform over the grid
        self.buckets: dict = {}  # BucketScan summaries merged (aspect-ratio buckets)

    def add(self, st: ShardStats, ordinal: int) -> None:
        """Fold in one shard's :class:`ShardStats` (what ``scan_shard`` returned); ``ordinal``
        names the shard in the noise hashes' owners (its place in the scan)."""
        summ = {"file": st.file, "rows": st.num_rows, "error": st.error, "seconds": st.seconds}
        summ["meta_problems"] = st.meta_problems
        summ["marker"], summ["marker_error"] = st.marker, st.marker_error
        summ["file_check"], summ["died"] = st.file_check, st.died
        self.shards[st.shard] = summ
        self.cost.update(st.cost)
        self.cost["task_total"] += st.seconds
        if st.error is not None:
            return
        s = st.stats
        self.source_kind = self.source_kind or st.meta.get("source", {}).get("kind")
        summ["ids"], summ["eps"] = st.ids, s.eps.total().summary()
        summ["cond"] = st.cond
        if st.buckets:
            from pipeline.validate.bucketscan import merge

            summ["buckets"] = st.buckets.get("counts", {})
            merge(self.buckets, st.buckets)
        summ["keyed_mismatches"] = s.counts["t_mismatch"] + s.counts["eps_mismatch"]
        entry = self.entries.get(st.shard, {})
        samples = max(1, int(entry.get("samples") or 0))
        summ["rejected_fraction"] = float(entry.get("rejected") or 0) / samples
        nb = min(self.plan.bins, int(s.t_hist.sum() // 5))
        if nb >= 2:
            summ["t_chi2"] = chi2_binned(s.t_hist, nb, self.t_pmf)[:3]
        if len(s.eps_res) >= 20:
            from scipy import stats as sps  # driver only: scan tasks never import scipy

            ks = sps.kstest(s.eps_res.sample().astype(np.float64), "norm")
            summ["ks"] = (float(ks.statistic), float(ks.pvalue), len(s.eps_res))
        n = float(s.cross.n.sum())
        summ["corr_eps_x0"] = (n, correlation(n, s.cross.c.sum(axis=0)))
        summ["shared_chi2"] = shared_chi2(s.pos_sum, s.pos_n)
        self.merge(s, st.shard)
        summ["ordinal"] = ordinal

    def names(self) -> dict[int, str]:
        """Shard ordinal -> shard id, of the shards scanned without error."""
        return {s["ordinal"]: k for k, s in self.shards.items() if "ordinal" in s}
