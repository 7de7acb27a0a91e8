"""One pass over the records of a precomputed dataset: what the validator measures, per shard.

:func:`scan_shard` reads one committed shard a Parquet batch at a time (bounded memory) and
fills its :class:`Stats`: mergeable moments and co-moments per t-bin x channel, reservoirs,
noise hashes, and the record-consistency counts (each stored x_t and posterior value recomputed
from x_0, eps and the float64 schedule tables, within the rounding of the stored dtype). On the
driver :class:`DatasetStats` merges the shards' statistics as their scans finish;
:mod:`pipeline.checks` turns the merged statistics into verdicts.

Cost (docs/benchmark.md, "Validation cost"): the scan reads only the columns it checks, casts
each tensor to float64 once per cache-sized chunk of records (:data:`CHUNK_ELEMENTS`) and
computes everything of that chunk (consistency, row moments, cross-products, adjacent
correlations, per-position sums) before the next; each (record, channel) row's moments go to
their (t-bin, channel) cell as one part (:meth:`pipeline.stats.GroupedMoments.add_parts`), not
value by value with an index. The time per part is in ``ShardStats.cost``. Precision: all
arithmetic stays float64. float32 was measured and not kept: on chunks in cache it is no faster
(the float16 cast and the reads dominate), and the consistency tolerance is a few float32
roundoffs of the operands, so the check's own arithmetic must be far more precise than float32.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from . import records
from .manifest import OutputDir
from .stats import (
    GroupedCoMoments,
    GroupedMoments,
    Reservoir,
    chi2_binned,
    correlation,
    shared_chi2,
)

U32 = 2.0**-24  # float32 unit roundoff: relative error bound of one float32 operation
CHUNK_ELEMENTS = 1 << 17  # values per tensor in one chunk of the scan (1 MiB as float64)

REC = ("xt_mean", "xt_ms", "xt_eps", "ab", "sqrt_ab", "sqrt_1mab")  # per-record features
X0REC = ("x0_mean", "x0_ms")
CROSS = ("eps", "x0", "xt")  # elementwise co-moments
CONSISTENCY = ("alpha_bar", "posterior_variance", "posterior_log_variance", "x_t", "posterior_mean")


@dataclass(frozen=True)
class ScanPlan:
    """What a shard scan needs; built once on the driver, shipped to every task."""

    process: dict  # the manifest's "process" block
    edges: tuple  # t-bin edges, len bins + 1, edges[0] = 0, edges[-1] = T
    reservoir_size: int = 20000
    recon_min_alpha_bar: float = 0.1
    batch_elements: int = 1 << 20
    seed: int = 0
    consistency_quota: int = 0  # records per shard whose (t, eps) are regenerated
    grid: bool = True

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    @property
    def shape(self) -> tuple:
        return tuple(int(s) for s in self.process["shape"])

    @property
    def T(self) -> int:
        return int(self.process["schedule"]["num_timesteps"])

    @property
    def P(self) -> int:
        """Elements per channel."""
        return int(np.prod(self.shape[1:], dtype=np.int64))


def bin_of_t(edges, T: int) -> np.ndarray:
    """t-bin index of every timestep 0..T-1."""
    return np.searchsorted(np.asarray(edges), np.arange(T), side="right") - 1


def t_edges(T: int, bins: int, terminal_window: float) -> tuple[int, ...]:
    """t-bin edges: ``bins`` equal ranges over [0, T - w), then the terminal bin [T - w, T) with
    w = max(1, round(T * terminal_window)) (where convergence looks at x_T)."""
    w = min(T, max(1, round(T * terminal_window)))
    main = np.floor(np.linspace(0, T - w, min(bins, T - w) + 1)) if T > w else np.zeros(1)
    return tuple(int(e) for e in np.unique(main)) + (T,)


def seed_of(*parts) -> list[int]:
    """A PCG64 seed (four uint32) hashed from ``parts``: one stream per (seed, shard, use)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
    return list(np.frombuffer(h, dtype="<u4"))


class Stats:
    """The mergeable statistics of a set of records: one shard (filled by the scan of
    :func:`scan_shard`), or the whole dataset (the merge of its shards).
    ``seed`` parts make the reservoirs' random streams distinct per shard.

    Per t-bin x channel unless said otherwise:

    * elementwise moments (order 4) of eps, x_t and x_0 (stored, or reconstructed as
      ``(x_t - sqrt(1 - ab) eps) / sqrt(ab)`` where ``ab >= reconstruct_min_alpha_bar``);
    * per-record features, with co-moments across records (standard errors then count
      records, not correlated pixels): mean(x_t), mean(x_t^2), mean(x_t eps), ab, sqrt(ab),
      sqrt(1 - ab) and, where x_0 is known, mean(x_0), mean(x_0^2); channel index C averages
      the channels;
    * elementwise co-moments of (eps, x_0, x_t);
    * the t histogram, eps summed per tensor position, correlations of eps between consecutive
      records, seeded reservoirs (eps elements, x_t elements of the top t-bin, one x_t record per
      t-bin), and counts: consistency violations, invalid records, keyed-noise mismatches.

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
        grid = range(B) if plan.grid else ()
        self.grid = {b: Reservoir(1, seed_of(*seed, "grid", b), plan.shape) for b in grid}

    def merge(self, other: Stats, where: str = "") -> Stats:
        """Add the statistics of disjoint records (in place); ``where`` names them in 'worst'."""
        for name in ("eps", "xt", "x0", "rec", "x0rec", "cross", "eps_res", "xT_res"):
            getattr(self, name).merge(getattr(other, name))
        for b, r in other.grid.items():
            self.grid[b].merge(r)
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


class DatasetStats(Stats):
    """The merged statistics plus small per-shard summaries and the duplicate-noise verdict.

    Shards are folded in as they arrive (:meth:`add`), so the driver holds O(reservoirs +
    positions) whatever the number of shards. The noise hashes are not held here: the executor
    (:mod:`pipeline.executor`) keeps them bucketed by prefix outside the driver's memory and sets
    :attr:`duplicates` from their check (:mod:`pipeline.noisehash`).
    """

    def __init__(self, plan: ScanPlan, manifest_shards: dict):
        super().__init__(plan, plan.seed, "dataset")
        self.plan, self.entries, self.T = plan, manifest_shards, plan.T
        self.shards: dict[str, dict] = {}
        self.duplicates: tuple[int, list] = (0, [])  # set by the executor
        self.executor: str | None = None  # set by the executor: "ray" or "local"
        self.source_kind = None
        self.cost: Counter = Counter()  # seconds per scan part, summed over the shards
        self.wall: dict[str, float] = {}  # the driver's phases (pipeline.validate.run)

    def add(self, st: ShardStats, ordinal: int) -> None:
        """Fold in one shard's :class:`ShardStats` (what :func:`scan_shard` returned);
        ``ordinal`` names the shard in the noise hashes' owners (its place in the scan)."""
        summ = {"file": st.file, "rows": st.num_rows, "error": st.error, "seconds": st.seconds}
        summ["meta_problems"] = st.meta_problems
        summ["marker"], summ["marker_error"] = st.marker, st.marker_error
        summ["file_check"] = st.file_check
        self.shards[st.shard] = summ
        self.cost.update(st.cost)
        self.cost["task_total"] += st.seconds
        if st.error is not None:
            return
        s = st.stats
        self.source_kind = self.source_kind or st.meta.get("source", {}).get("kind")
        summ["ids"], summ["eps"] = st.ids, s.eps.total().summary()
        summ["cond"] = st.cond
        summ["keyed_mismatches"] = s.counts["t_mismatch"] + s.counts["eps_mismatch"]
        entry = self.entries.get(st.shard, {})
        samples = max(1, int(entry.get("samples") or 0))
        summ["rejected_fraction"] = float(entry.get("rejected") or 0) / samples
        nb = min(self.plan.bins, int(s.t_hist.sum() // 5))
        if nb >= 2:
            summ["t_chi2"] = chi2_binned(s.t_hist, nb)[:3]
        if len(s.eps_res) >= 20:
            from scipy import stats as sps  # driver only: scan tasks never import scipy

            ks = sps.kstest(s.eps_res.sample().astype(np.float64), "norm")
            summ["ks"] = (float(ks.statistic), float(ks.pvalue), len(s.eps_res))
        n = float(s.cross.n.sum())
        summ["corr_eps_x0"] = (n, correlation(n, s.cross.c.sum(axis=0)))
        summ["shared_chi2"] = shared_chi2(s.pos_sum, s.pos_n)
        self.merge(s, st.shard)
        summ["ordinal"] = ordinal

    def cost_seconds(self, checks: dict | None = None) -> dict:
        """What validation cost, for the report's ``summary.cost_seconds``: ``wall``, the
        driver's phases (open and plan, Ray start, the shard tasks, the duplicate reduce, Ray
        shutdown, the checks); ``scan``, seconds per part of the shard scans summed over the
        shards (CPU-bound, so on n cores about n times the scan's wall time; ``task_total`` is
        their sum with the file open); ``checks``, seconds per check on the driver (the
        duplicate-noise reduce is in ``wall``; the report and plots are written after)."""
        return {
            "wall": {k: round(v, 3) for k, v in self.wall.items()},
            "scan": {k: round(v, 3) for k, v in sorted(self.cost.items(), key=lambda i: -i[1])},
            "checks": dict(checks or {}),
        }

    def names(self) -> dict[int, str]:
        """Shard ordinal -> shard id, of the shards scanned without error."""
        return {s["ordinal"]: k for k, s in self.shards.items() if "ordinal" in s}


# -- the scan of one shard ------------------------------------------------------------------


def _half_ulp(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return 0.5 * np.abs(np.spacing(np.abs(v))).astype(np.float64)


@functools.cache
def _half_ulp16() -> np.ndarray:
    """:func:`half_ulp` of every float16 bit pattern (65536 float64, 512 KiB)."""
    return _half_ulp(np.arange(1 << 16, dtype=np.uint16).view(np.float16))


def half_ulp(v: np.ndarray) -> np.ndarray:
    """Half the spacing of the stored values (their dtype) at v: the round-to-nearest bound.
    float16: one look-up per value in a table built by the same formula (np.spacing is ~10x
    slower on float16), so the values are the same."""
    if v.dtype == np.float16:
        return _half_ulp16()[v.view(np.uint16)]
    return _half_ulp(v)


def _finite_rows(v: np.ndarray) -> np.ndarray:
    """[n, ...] -> [n] bool: every value of the row finite. float16: from the exponent bits
    (all ones = inf or NaN), 5x faster than np.isfinite on float16."""
    n = len(v)
    if v.dtype == np.float16:
        bits = np.bitwise_and(v.reshape(n, -1).view(np.uint16), 0x7C00)
        return bits.max(axis=1, initial=0) < 0x7C00
    return np.isfinite(v.reshape(n, -1)).all(axis=1)


def _op_tol(v: np.ndarray, f: np.ndarray, k: float) -> np.ndarray:
    """Half an ulp of the stored operand v plus k float32 roundoffs of its value f (float64)."""
    h = half_ulp(v).reshape(f.shape)
    h += (k * U32) * np.abs(f)
    return h


def _col(sl: slice, v: np.ndarray) -> np.ndarray:
    """Per-record coefficients of a chunk, broadcastable against its [r, C, P] values."""
    return v[sl][:, None, None]


class Cost:
    """Seconds per part of a scan: ``lap(part)`` adds the time since the previous lap."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self.t
        self.t = now


@dataclass
class ShardStats:
    """What :func:`scan_shard` returns: a shard's statistics, identities and noise hashes, or
    the error that stopped its scan."""

    shard: str
    file: str
    num_rows: int = 0
    error: str | None = None
    meta: dict = field(default_factory=dict)
    meta_problems: list = field(default_factory=list)
    seconds: float = 0.0
    stats: Stats | None = None
    hashes: np.ndarray | None = None  # [records, 12] uint8: BLAKE2b of each record's eps bytes
    marker: dict | None = None  # its commit marker (_shards/<shard>.json), None when absent
    marker_error: str | None = None  # why the marker could not be read
    file_check: dict = field(default_factory=dict)  # the file's bytes and checksum (_file_check)
    ids: dict = field(default_factory=dict)
    cond: dict = field(default_factory=dict)  # CondScan.summary(): kept columns' figures
    cost: dict = field(default_factory=dict)  # seconds per part of the scan (Cost)


def _fingerprint(v):
    if v is None or isinstance(v, int):
        return v
    data = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    return hashlib.blake2b(data, digest_size=12).digest()


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class CondScan:
    """The conditioning columns (``source.keep``) of one shard: null counts, and whether every
    draw of a sample (same key) carries the same value, against the first value seen per key
    (keys are per shard, so this holds one value per sample and kept column); label histograms
    of the int64 columns, one count per sample."""

    def __init__(self, spec: dict | None):
        cols = (spec or {}).get("columns", [])
        self.columns = [c["column"] for c in cols]
        self.ints = {c["column"] for c in cols if c["type"] == "int64"}
        self.first: dict[str, dict] = {c: {} for c in self.columns}
        self.nulls: Counter = Counter()
        self.mismatch: Counter = Counter()
        self.examples: dict[str, list] = {c: [] for c in self.columns}
        self.hist: dict[str, Counter] = {c: Counter() for c in self.ints}
        self.missing: list[str] = []

    def batch(self, rb, keys: list) -> None:
        for c in self.columns:
            if c not in rb.schema.names:
                if c not in self.missing:
                    self.missing.append(c)
                continue
            first = self.first[c]
            for k, v in zip(keys, rb.column(c).to_pylist()):
                self.nulls[c] += v is None
                f = _fingerprint(v)  # strings and bytes held as 12-byte hashes
                if k not in first:
                    first[k] = f
                    if c in self.ints and v is not None:
                        self.hist[c][v] += 1
                elif first[k] != f:
                    self.mismatch[c] += 1
                    if len(self.examples[c]) < 5:
                        was = first[k] if c in self.ints else "another value"
                        self.examples[c].append(f"{c} of key {k!r}: {was!r} and {_short(v)}")

    def summary(self) -> dict:
        return {
            "columns": self.columns,
            "nulls": dict(self.nulls),
            "mismatch": dict(self.mismatch),
            "examples": self.examples,
            "hist": {c: dict(h) for c, h in self.hist.items()},
            "missing": self.missing,
        }


class _Scanner:
    """Accumulates one shard's statistics batch by batch."""

    def __init__(self, st: ShardStats, plan: ScanPlan):
        p = plan.process
        self.st, self.plan = st, plan
        self.sched = records.schedule_from_metadata(p)
        self.noise = records.noise_from_metadata(p)
        self.T, self.K = self.sched.num_timesteps, self.noise.draws
        self.dtype, self.store_x0 = p["dtype"], bool(p["store_x0"])
        self.C, self.P = plan.shape[0], plan.P
        self.tbin = bin_of_t(plan.edges, self.T)
        self.s = st.stats = Stats(plan, plan.seed, st.shard)
        self.pairs: set = set()
        self.draws_per_key: Counter = Counter()
        self.dups = self.bad_draw = 0
        self.hashes: list[bytes] = []
        self.cond = CondScan(p.get("conditioning"))
        self.prev = None  # last record's eps deviations, channel offsets, squared norm
        self._first_prev_norm2 = np.nan
        self.cost = Cost()
        rng = np.random.Generator(np.random.PCG64(seed_of(plan.seed, st.shard, "keyed")))
        quota = min(plan.consistency_quota, st.num_rows)
        self.keyed_rows = set(rng.choice(st.num_rows, size=quota, replace=False).tolist())

    # -- per batch -------------------------------------------------------------------------
    def batch(self, rb, row0: int) -> None:
        cost = self.cost
        n = rb.num_rows
        keys = rb.column("key").to_pylist()
        index = rb.column("index").to_numpy()
        draw = rb.column("draw").to_numpy().astype(np.int64)
        t = rb.column("t").to_numpy().astype(np.int64)
        cols = {c: records.tensor_to_numpy(rb.column(c)) for c in records.TENSOR_COLUMNS}
        if self.store_x0:
            cols["x_0"] = records.tensor_to_numpy(rb.column("x_0"))
        scal = {c: rb.column(c).to_numpy().astype(np.float64) for c in records.SCALAR_COLUMNS}
        cost.lap("read")
        self.identities(keys, draw, cols["epsilon"])
        cost.lap("identities_and_hashes")
        self.cond.batch(rb, keys)
        cost.lap("conditioning")
        self.regenerate(keys, index, draw, t, cols["epsilon"], row0)
        cost.lap("keyed_regeneration")
        ok = (t >= 0) & (t < self.T)
        self.s.counts["t_out_of_range"] += int(n - ok.sum())
        finite = np.ones(n, dtype=bool)
        for v in cols.values():
            finite &= _finite_rows(v)
        for v in scal.values():
            finite &= np.isfinite(v)
        self.s.counts["nonfinite"] += int((ok & ~finite).sum())
        ok &= finite
        if not ok.all():
            keys = [k for k, o in zip(keys, ok) if o]
            draw, t = draw[ok], t[ok]
            cols = {c: v[ok] for c, v in cols.items()}
            scal = {c: v[ok] for c, v in scal.items()}
        cost.lap("finite")
        if len(t):
            self.s.t_hist += np.bincount(t, minlength=self.T)
            self.scalar_consistency(keys, draw, t, scal)
            cost.lap("consistency")
            self.tensors(keys, draw, t, cols)
            self.reservoirs(t, cols)
            cost.lap("reservoirs")

    def identities(self, keys, draw, eps) -> None:
        for k, d in zip(keys, draw.tolist()):
            if (k, d) in self.pairs:
                self.dups += 1
            else:
                self.pairs.add((k, d))
                self.draws_per_key[k] += 1
        self.bad_draw += int(((draw < 0) | (draw >= self.K)).sum())
        flat = np.ascontiguousarray(eps).reshape(len(eps), -1)
        self.hashes.extend(hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in flat)

    def regenerate(self, keys, index, draw, t, eps, row0: int) -> None:
        """Recompute (t, eps) from the record's identity; compare exactly after the dtype cast."""
        kd = self.s.counts
        np_dtype = records.DTYPES[self.dtype][0]
        for i in range(len(keys)):
            if row0 + i not in self.keyed_rows:
                continue
            kd["keyed_checked"] += 1
            d = int(draw[i])
            if not 0 <= d < self.K:
                kd["t_mismatch"] += 1
                kd["eps_mismatch"] += 1
                continue
            dig = self.noise.digests(self.st.shard, [keys[i]])
            t_re = self.noise.timesteps(dig, self.st.shard, [int(index[i])])[d]
            e_re = self.noise.noise(dig[d : d + 1], self.plan.shape)[0].astype(np_dtype)
            kd["t_mismatch"] += int(t_re != t[i])
            kd["eps_mismatch"] += int(e_re.tobytes() != np.ascontiguousarray(eps[i]).tobytes())

    def _tally(self, name, ratio, keys, draw, t) -> None:
        """ratio: [B] worst |error| / tolerance per record (> 1 is a violation)."""
        c = self.s.consistency[name]
        c["checked"] += len(ratio)
        c["violations"] += int((ratio > 1.0).sum())
        if len(ratio) and ratio.max() > c["max_ratio"]:
            w = int(np.argmax(ratio))
            c["max_ratio"] = float(ratio[w])
            c["worst"] = {"key": keys[w], "draw": int(draw[w]), "t": int(t[w])}

    def scalar_consistency(self, keys, draw, t, scal) -> None:
        """Scalar columns (float32): |stored - table[t]| <= 1 float32 ulp of the table value
        (its rounding is half an ulp; one more allows one float32 operation)."""
        s = self.sched
        for name, table in (
            ("alpha_bar", s.alphas_cumprod),
            ("posterior_variance", s.posterior_variance),
            ("posterior_log_variance", s.posterior_log_variance_clipped),
        ):
            exp = table[t]
            tol = np.abs(np.spacing(np.abs(exp).astype(np.float32))).astype(np.float64)
            self._tally(name, np.abs(scal[name] - exp) / tol, keys, draw, t)

    def tensors(self, keys, draw, t, cols) -> None:
        """The tensor identities and the moments of one batch, in one pass over its records in
        chunks of about :data:`CHUNK_ELEMENTS` values per tensor (cast to float64 once, every
        statistic computed while the chunk is in cache). Everything is float64, as before;
        only the bookkeeping changed: the moments of each (record, channel) row of P pixels are
        computed around the row's mean and combined into their (t-bin, channel) cell exactly
        (:meth:`GroupedMoments.add_parts`), instead of an index array per element.

        Consistency, every record's arithmetic against the schedule, to the stored dtypes'
        precision: the error bound is the sum of half an ulp of every stored operand times its
        coefficient's magnitude, plus 4 float32 roundoffs of the magnitudes involved (float32
        arithmetic). The bound is gathered per operand (half ulp + k float32 roundoffs of its
        magnitude, then times its coefficient): the same sum, reassociated.
        """
        cost, sc, plan = self.cost, self.sched, self.plan
        B, C, P = len(t), self.C, self.P
        R = max(1, CHUNK_ELEMENTS // (C * P))
        ab, a = sc.alphas_cumprod[t], sc.sqrt_alphas_cumprod[t]
        sg, bn = sc.sqrt_one_minus_alphas_cumprod[t], self.tbin[t]
        c1, c2 = sc.posterior_mean_coef1[t], sc.posterior_mean_coef2[t]
        av = np.ones(B, dtype=bool) if self.store_x0 else ab >= plan.recon_min_alpha_bar
        with np.errstate(invalid="ignore", divide="ignore"):
            g, q = c1 / a + c2, c1 * sg / a  # pm = g x_t - q eps with x_0 reconstructed
        ratio_xt, ratio_pm = np.zeros(B), np.zeros(B)
        mom = {v: np.zeros((4, B, C)) for v in ("epsilon", "x_t", "x_0")}  # mean, M2, M3, M4
        xe = np.zeros((B, C))  # sum of (x_t - mean)(eps - mean) per row
        cr = np.zeros((B, C, 3, 3))  # (eps, x_0, x_t) cross-products per row (rows av)
        norm2, dots = np.zeros(B), np.full(B, np.nan)
        pos = np.zeros((C, P))
        cost.lap("moments")
        for i in range(0, B, R):
            sl = slice(i, min(B, i + R))
            r = sl.stop - i
            f = {c: v[sl].reshape(r, C, P).astype(np.float64) for c, v in cols.items()}
            cost.lap("cast")
            xt, ep, pm = f["x_t"], f["epsilon"], f["posterior_mean"]
            k = av[sl]
            col = functools.partial(_col, sl)
            if self.store_x0:
                x0 = f["x_0"]
                t0 = _op_tol(cols["x_0"][sl], x0, 4)
                te = _op_tol(cols["epsilon"][sl], ep, 4)
                tol = half_ulp(cols["x_t"][sl]).reshape(xt.shape) + col(a) * t0 + col(sg) * te
                err = xt - (col(a) * x0 + col(sg) * ep)
                ratio_xt[sl] = (np.abs(err) / tol).reshape(r, -1).max(axis=1)
                tx = _op_tol(cols["x_t"][sl], xt, 4)
                tol = _op_tol(cols["posterior_mean"][sl], pm, 4) + col(c1) * t0 + col(c2) * tx
                err = pm - (col(c1) * x0 + col(c2) * xt)
                ratio_pm[sl] = (np.abs(err) / tol).reshape(r, -1).max(axis=1)
            elif k.any():
                kx, ke, kp = (
                    (v, cols[c][sl]) if k.all() else (v[k], cols[c][sl][k])
                    for c, v in (("x_t", xt), ("epsilon", ep), ("posterior_mean", pm))
                )
                gk, qk = g[sl][k][:, None, None], q[sl][k][:, None, None]
                tol = _op_tol(kp[1], kp[0], 4) + gk * _op_tol(kx[1], kx[0], 4)
                tol += qk * _op_tol(ke[1], ke[0], 8)
                err = kp[0] - (gk * kx[0] - qk * ke[0])
                ratio_pm[i + np.flatnonzero(k)] = (np.abs(err) / tol).reshape(len(tol), -1).max(1)
            cost.lap("consistency")
            e_ep = self._row_moments(ep, mom["epsilon"][:, sl])
            e_xt = self._row_moments(xt, mom["x_t"][:, sl])
            xe[sl] = np.einsum("rcp,rcp->rc", e_xt, e_ep)
            if k.any():
                if not self.store_x0:
                    x0 = (xt[k] - col(sg)[k] * ep[k]) / col(a)[k]
                rows = i + np.flatnonzero(k)
                m0 = np.empty((4, len(rows), C))
                e_x0 = self._row_moments(x0, m0)
                mom["x_0"][:, rows] = m0
                e_epk, e_xtk = (e_ep, e_xt) if k.all() else (e_ep[k], e_xt[k])
                cr[rows, :, 0, 0] = mom["epsilon"][1, rows]
                cr[rows, :, 1, 1] = m0[1]
                cr[rows, :, 2, 2] = mom["x_t"][1, rows]
                cr[rows, :, 0, 2] = cr[rows, :, 2, 0] = xe[rows]
                for u, w, eu, ew in ((0, 1, e_epk, e_x0), (1, 2, e_x0, e_xtk)):
                    cr[rows, :, u, w] = cr[rows, :, w, u] = np.einsum("rcp,rcp->rc", eu, ew)
            pos += ep.sum(axis=0)
            cost.lap("moments")
            # consecutive records' eps: centred per record, as deviations per channel + offsets
            mu = mom["epsilon"][0, sl]
            dm = mu - mu.mean(axis=1, keepdims=True)
            norm2[sl] = (mom["epsilon"][1, sl] + P * dm * dm).sum(axis=1)
            if r > 1:
                d = np.einsum("rcp,rcp->r", e_ep[1:], e_ep[:-1])
                dots[i + 1 : sl.stop] = d + P * (dm[1:] * dm[:-1]).sum(axis=1)
            if self.prev is not None:
                pe, pdm, pn = self.prev
                dots[i] = np.einsum("cp,cp->", e_ep[0], pe) + P * (dm[0] * pdm).sum()
                if i == 0:
                    self._first_prev_norm2 = pn
            self.prev = (e_ep[-1].copy(), dm[-1].copy(), norm2[sl.stop - 1])
            cost.lap("adjacent_correlation")
        self._fold(keys, draw, t, bn, ab, a, sg, av, ratio_xt, ratio_pm, mom, xe, cr, pos)
        cost.lap("moments")
        self._adjacent(norm2, dots)
        cost.lap("adjacent_correlation")

    @staticmethod
    def _row_moments(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """x [r, C, P] float64 -> out[0..3] = mean, M2, M3, M4 of each row [r, C] (centred at
        the row's mean: two passes over cached data); returns the deviations [r, C, P]."""
        mu = x.mean(axis=2)
        e = x - mu[:, :, None]
        e2 = e * e
        out[0], out[1] = mu, e2.sum(axis=2)
        out[2] = np.einsum("rcp,rcp->rc", e2, e)
        out[3] = np.einsum("rcp,rcp->rc", e2, e2)
        return e

    def _fold(self, keys, draw, t, bn, ab, a, sg, av, ratio_xt, ratio_pm, mom, xe, cr, pos):
        """Tally the batch's consistency ratios and add its row moments to the cells."""
        st, B, C, P = self.s, len(t), self.C, self.P
        if self.store_x0:
            self._tally("x_t", ratio_xt, keys, draw, t)
            self._tally("posterior_mean", ratio_pm, keys, draw, t)
        else:
            self.s.counts["unchecked_pm"] += int(B - av.sum())
            if av.any():
                sel = np.flatnonzero(av)
                self._tally("posterior_mean", ratio_pm[av], [keys[i] for i in sel], draw[av], t[av])
        self.cost.lap("consistency")
        ch = np.arange(C)
        cells = (bn[:, None] * C + ch[None, :]).reshape(-1)
        st.eps.add_parts(P, *mom["epsilon"].reshape(4, -1), cells)
        st.xt.add_parts(P, *mom["x_t"].reshape(4, -1), cells)

        def with_all(v):  # [B, C] -> [B, C + 1], the last column averaging the channels
            return np.concatenate([v, v.mean(axis=1, keepdims=True)], axis=1)

        mx, me = mom["x_t"][0], mom["epsilon"][0]
        rcells = (np.repeat(bn, C + 1), np.tile(np.arange(C + 1), B))
        per_t = [np.broadcast_to(v[:, None], (B, C + 1)) for v in (ab, a, sg)]
        feats = [with_all(mx), with_all(mom["x_t"][1] / P + mx * mx), with_all(xe / P + mx * me)]
        st.rec.update(np.stack(feats + per_t, axis=-1).reshape(-1, len(REC)), rcells)
        if av.any():
            bav, nav = bn[av], int(av.sum())
            m0 = mom["x_0"][:, av]
            st.x0.add_parts(P, *m0.reshape(4, -1), cells.reshape(B, C)[av].reshape(-1))
            f0 = np.stack([with_all(m0[0]), with_all(m0[1] / P + m0[0] * m0[0])], axis=-1)
            st.x0rec.update(
                f0.reshape(-1, 2), (np.repeat(bav, C + 1), np.tile(np.arange(C + 1), nav))
            )
            means = np.stack([me[av], m0[0], mx[av]], axis=-1).reshape(-1, 3)
            st.cross.add_parts(P, means, cr[av], cells.reshape(B, C)[av].reshape(-1))
        st.pos_sum += pos.reshape(-1)
        st.pos_n += B

    def _adjacent(self, norm2, dots) -> None:
        """Correlations of consecutive records' eps from their centred norms and dot products
        (``dots[i]``: record i with the one before it, NaN for the first record of the scan)."""
        st = self.s
        prev_n2 = np.concatenate([[getattr(self, "_first_prev_norm2", np.nan)], norm2[:-1]])
        self._first_prev_norm2 = np.nan
        has = ~np.isnan(dots)
        if not has.any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            r = dots[has] / (np.sqrt(prev_n2[has]) * np.sqrt(norm2[has]))
        z = np.nan_to_num(r) * math.sqrt(self.C * self.P - 1)
        st.adj["n"] += len(z)
        st.adj["sum_z"] += float(z.sum())
        st.adj["max_abs_z"] = max(st.adj["max_abs_z"], float(np.abs(z).max()))

    def reservoirs(self, t, cols) -> None:
        """The seeded samples, fed batch by batch exactly as before (same streams)."""
        st, plan = self.s, self.plan
        bn = self.tbin[t]
        st.eps_res.update(cols["epsilon"].reshape(-1))
        top = bn == plan.bins - 1
        if top.any():
            st.xT_res.update(cols["x_t"][top].reshape(-1))
        for b in np.unique(bn) if st.grid else ():
            st.grid[int(b)].update(cols["x_t"][bn == b])

    def columns(self) -> list[str]:
        """The columns the scan reads (projection: e.g. an encoder's latent_mean/latent_std
        are not read)."""
        cols = ["key", "index", "draw", "t", *records.TENSOR_COLUMNS, *records.SCALAR_COLUMNS]
        return cols + (["x_0"] if self.store_x0 else []) + self.cond.columns

    def finish(self) -> ShardStats:
        st = self.st
        st.hashes = np.frombuffer(b"".join(self.hashes), dtype=np.uint8).reshape(-1, 12)
        wrong = sum(1 for c in self.draws_per_key.values() if c != self.K)
        st.ids = {
            "duplicate_key_draw": self.dups,
            "draw_out_of_range": self.bad_draw,
            "keys": len(self.draws_per_key),
            "keys_without_K_draws": wrong,
        }
        st.cond = self.cond.summary()
        return st


# The fields of a commit marker that ``checks.completeness`` compares with the manifest and
# with the file (its size and checksum).
MARKER_FIELDS = ("status", "records", "config_hash", "bytes", "checksum")


def _read_marker(out: OutputDir, shard: str) -> tuple[dict | None, str | None]:
    """The shard's commit marker, read here rather than on the driver (one read per shard, in
    parallel), cut to :data:`MARKER_FIELDS` (the driver holds one per shard): (marker, None),
    (None, why it cannot be read), or (None, None) when absent."""
    try:
        marker = out.read_json(OutputDir.marker_name(shard))
        return {k: marker[k] for k in MARKER_FIELDS if k in marker}, None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:  # CorruptFileError names the file
        return None, str(exc)


def _file_check(out: OutputDir, name: str, marker: dict | None) -> dict:
    """The committed file as found, for ``completeness`` to compare with its marker: its
    ``bytes``, and its ``checksum`` when the marker records one (a marker of an older version
    has none: the file is then checked by size only); ``error`` when it cannot be read."""
    try:
        found = {"bytes": out.size(name)}
        if marker is not None and marker.get("checksum") is not None:
            found["checksum"] = out.checksum(name)
    except (OSError, TypeError) as exc:  # a vanished file: size None, then open fails
        return {"error": f"{type(exc).__name__}: {exc}"}
    return found


def scan_shard(out: OutputDir, shard: str, plan: ScanPlan) -> ShardStats:
    """Read one committed shard batch by batch and return its statistics. Never raises for a
    bad file: the error is returned in ``ShardStats.error`` (reported by ``completeness``)."""
    t0 = time.perf_counter()
    name = OutputDir.data_name(shard)
    st = ShardStats(shard=shard, file=out.display(name))
    st.marker, st.marker_error = _read_marker(out, shard)
    st.file_check = _file_check(out, name, st.marker)
    try:
        with out.fs.open_input_file(out.path(name)) as fh:
            pf = pq.ParquetFile(fh)
            st.num_rows = pf.metadata.num_rows
            st.meta = records.process_metadata(pf.schema_arrow)
            st.meta_problems = records.same_process(st.meta, plan.process)
            if st.meta.get("source", {}).get("shard", shard) != shard:
                st.meta_problems.append("source.shard")
            if {"dtype", "shape", "schedule", "noise", "store_x0"} & set(st.meta_problems):
                raise ValueError(
                    f"process metadata differs from the manifest in {st.meta_problems}: not scanned"
                )
            scanner = _Scanner(st, plan)
            have = set(pf.schema_arrow.names)
            cols = [c for c in scanner.columns() if c in have]  # a missing one: KeyError below
            rows = max(1, plan.batch_elements // max(1, scanner.C * scanner.P))
            row0 = 0
            scanner.cost.lap("open")
            for rb in pf.iter_batches(batch_size=rows, columns=cols, use_threads=False):
                scanner.batch(rb, row0)
                row0 += rb.num_rows
            scanner.finish()
            st.cost = dict(scanner.cost.seconds)
    except Exception as exc:  # reported, not raised: one bad shard must not stop the others
        st.error = f"{type(exc).__name__}: {exc}"
    st.seconds = time.perf_counter() - t0
    return st
