"""One pass over the records of a precomputed dataset: what the validator measures, per shard.

:func:`scan_shard` reads one committed shard a Parquet batch at a time (bounded memory) and
fills its :class:`Stats`: mergeable moments and co-moments per t-bin x channel, reservoirs,
noise hashes, and the record-consistency counts (each stored x_t and posterior value recomputed
from x_0, eps and the float64 schedule tables, within the rounding of the stored dtype). On the
driver :class:`DatasetStats` merges the shards' statistics as their scans finish;
:mod:`pipeline.checks` turns the merged statistics into verdicts.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from scipy import stats as sps

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
    """The merged statistics plus small per-shard summaries and every record's noise hash.

    Shards are folded in as they arrive, so the driver holds O(reservoirs + positions) whatever
    the number of shards, plus the noise hashes: 16 bytes per record when a shard's
    :class:`ShardStats` carries them (``add(st)``, in-process), or, from Ray tasks of
    :func:`scan_shard_bucketed`, only references to them, bucketed by hash prefix and kept in
    Ray's object store (``add(st, bucket_refs)``); :meth:`reduce_duplicates` then checks each
    bucket in its own task (:func:`duplicates_in_bucket`) and the driver merges counts and
    examples. Caveat: Ray stores a task's return values under 100 KiB (its
    ``max_direct_call_object_size``) in the caller's own memory, so buckets of small shards
    still sit on the driver (12 bytes per record, without the sort's 50); only the sort is
    partitioned. Spill files per bucket under the validation dir would remove that (not done).
    """

    def __init__(self, plan: ScanPlan, manifest_shards: dict):
        super().__init__(plan, plan.seed, "dataset")
        self.plan, self.entries, self.T = plan, manifest_shards, plan.T
        self.shards: dict[str, dict] = {}
        self.hashes: list[np.ndarray] = []
        self.hash_shard: list[np.ndarray] = []
        self.bucket_refs: list[list] = []  # per ordinal: the shard's hash buckets in Ray
        self.ordinals = 0
        self.duplicates: tuple[int, list] | None = None  # set by reduce_duplicates
        self.source_kind = None

    def add(self, st: ShardStats, bucket_refs: list | None = None) -> None:
        """Fold in one shard's :class:`ShardStats` (what :func:`scan_shard` returned);
        ``bucket_refs``: Ray references to its noise hashes bucketed by prefix (then
        ``st.hashes`` is None; see :func:`scan_shard_bucketed`)."""
        summ = {"file": st.file, "rows": st.num_rows, "error": st.error, "seconds": st.seconds}
        summ["meta_problems"] = st.meta_problems
        self.shards[st.shard] = summ
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
            ks = sps.kstest(s.eps_res.sample().astype(np.float64), "norm")
            summ["ks"] = (float(ks.statistic), float(ks.pvalue), len(s.eps_res))
        n = float(s.cross.n.sum())
        summ["corr_eps_x0"] = (n, correlation(n, s.cross.c.sum(axis=0)))
        summ["shared_chi2"] = shared_chi2(s.pos_sum, s.pos_n)
        self.merge(s, st.shard)
        summ["ordinal"], self.ordinals = self.ordinals, self.ordinals + 1
        if bucket_refs is not None:
            self.bucket_refs.append(list(bucket_refs))
        else:
            self.hashes.append(st.hashes)
            self.hash_shard.append(np.full(len(st.hashes), summ["ordinal"], dtype=np.uint32))

    def reduce_duplicates(self, num_cpus: float = 1) -> None:
        """Check the bucketed hashes of the shards added with ``bucket_refs`` for duplicates:
        one Ray task per bucket (run inside the Ray session that holds them)."""
        import ray

        if not self.bucket_refs:
            return
        task = ray.remote(duplicates_in_bucket).options(num_cpus=num_cpus)
        owners = [s["ordinal"] for s in self.shards.values() if "ordinal" in s]
        results = ray.get(
            [
                task.remote(owners, *(refs[b] for refs in self.bucket_refs))
                for b in range(len(self.bucket_refs[0]))
            ]
        )
        self.duplicates = _merge_duplicates(results, self._names())

    def _names(self) -> dict[int, str]:
        return {s["ordinal"]: k for k, s in self.shards.items() if "ordinal" in s}

    def duplicate_noise(self) -> tuple[int, list]:
        """Records whose eps bytes equal another record's, and up to 5 (shard, shard) examples."""
        if self.duplicates is not None:
            return self.duplicates
        if not self.hashes:
            return 0, []
        owners = [int(o[0]) for o in self.hash_shard if len(o)]
        parts = [h for h in self.hashes if len(h)]
        return _merge_duplicates([duplicates_in_bucket(owners, *parts)], self._names())


# -- the duplicate-noise check, partitioned by hash prefix ----------------------------------

EXAMPLE_PAIRS = 50  # (shard, shard) pairs kept, in hash order, before the 5 examples


def split_hashes(hashes: np.ndarray, buckets: int) -> list[np.ndarray]:
    """[records, 12] hashes -> ``buckets`` arrays, by the first byte's range (bucket b holds
    first bytes in [256 b / B, 256 (b + 1) / B)), each in its records' order: the buckets in
    order, each sorted, are the whole set sorted."""
    h = np.ascontiguousarray(hashes, dtype=np.uint8).reshape(-1, 12)
    which = (h[:, 0].astype(np.int64) * buckets) >> 8
    order = np.argsort(which, kind="stable")
    cuts = np.cumsum(np.bincount(which, minlength=buckets))[:-1]
    return [np.ascontiguousarray(p) for p in np.split(h[order], cuts)]


def duplicates_in_bucket(owners: list[int], *parts: np.ndarray) -> tuple[int, list]:
    """One bucket: ``parts[i]`` the hashes of shard ordinal ``owners[i]`` (in the order the
    shards were added). Returns the records whose hash repeats another's and the first
    :data:`EXAMPLE_PAIRS` (ordinal, ordinal) pairs of equal neighbours in hash order. Peak
    memory about 50 bytes per record of the bucket."""
    sizes = [len(p) for p in parts]
    if not sum(sizes):
        return 0, []
    h = np.concatenate([np.asarray(p, dtype=np.uint8).reshape(-1, 12) for p in parts])
    owner = np.repeat(np.asarray(owners, dtype=np.uint32), sizes)
    hv = np.ascontiguousarray(h).view("V12").reshape(-1)
    del h
    order = np.argsort(hv, kind="stable")
    hs = hv[order]
    same = hs[1:] == hs[:-1]
    dup = np.zeros(len(hs), dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    first = np.flatnonzero(same)[:EXAMPLE_PAIRS]
    pairs = [(int(owner[order[i]]), int(owner[order[i + 1]])) for i in first]
    return int(dup.sum()), pairs


def _merge_duplicates(results: list[tuple[int, list]], names: dict[int, str]) -> tuple[int, list]:
    """The buckets' (count, pairs) in bucket order -> the count and up to 5 sorted examples:
    the same as one sort of every hash (the first pairs in hash order)."""
    pairs = [p for _, ps in results for p in ps][:EXAMPLE_PAIRS]
    ex = sorted({(names[a], names[b]) for a, b in pairs})
    return sum(n for n, _ in results), [list(e) for e in ex[:5]]


# -- the scan of one shard ------------------------------------------------------------------


def half_ulp(v: np.ndarray) -> np.ndarray:
    """Half the spacing of the stored values (their dtype) at v: the round-to-nearest bound."""
    return 0.5 * np.abs(np.spacing(np.abs(v))).astype(np.float64)


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
    ids: dict = field(default_factory=dict)
    cond: dict = field(default_factory=dict)  # CondScan.summary(): kept columns' figures


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
        self.prev = None  # last centred eps row and its norm, for adjacent correlations
        rng = np.random.Generator(np.random.PCG64(seed_of(plan.seed, st.shard, "keyed")))
        quota = min(plan.consistency_quota, st.num_rows)
        self.keyed_rows = set(rng.choice(st.num_rows, size=quota, replace=False).tolist())

    # -- per batch -------------------------------------------------------------------------
    def batch(self, rb, row0: int) -> None:
        n = rb.num_rows
        keys = rb.column("key").to_pylist()
        index = rb.column("index").to_numpy()
        draw = rb.column("draw").to_numpy().astype(np.int64)
        t = rb.column("t").to_numpy().astype(np.int64)
        cols = {c: records.tensor_to_numpy(rb.column(c)) for c in records.TENSOR_COLUMNS}
        if self.store_x0:
            cols["x_0"] = records.tensor_to_numpy(rb.column("x_0"))
        scal = {c: rb.column(c).to_numpy().astype(np.float64) for c in records.SCALAR_COLUMNS}
        self.identities(keys, draw, cols["epsilon"])
        self.cond.batch(rb, keys)
        self.regenerate(keys, index, draw, t, cols["epsilon"], row0)
        ok = (t >= 0) & (t < self.T)
        self.s.counts["t_out_of_range"] += int(n - ok.sum())
        finite = np.ones(n, dtype=bool)
        for v in (*cols.values(), *scal.values()):
            finite &= np.isfinite(v.reshape(n, -1)).all(axis=1)
        self.s.counts["nonfinite"] += int((ok & ~finite).sum())
        ok &= finite
        if not ok.all():
            keys = [k for k, o in zip(keys, ok) if o]
            draw, t = draw[ok], t[ok]
            cols = {c: v[ok] for c, v in cols.items()}
            scal = {c: v[ok] for c, v in scal.items()}
        if len(t):
            np.add.at(self.s.t_hist, t, 1)
            self.consistency(keys, draw, t, cols, scal)
            self.moments(t, cols)

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

    def consistency(self, keys, draw, t, cols, scal) -> None:
        """Every record's arithmetic against the schedule, to the stored dtypes' precision.

        Scalar columns (float32): |stored - table[t]| <= 1 float32 ulp of the table value (its
        rounding is half an ulp; one more allows one float32 operation). Tensor identities: the
        error bound is the sum of half an ulp of every stored operand times its coefficient's
        magnitude, plus 4 float32 roundoffs of the magnitudes involved (float32 arithmetic).
        """
        s = self.sched
        for name, table in (
            ("alpha_bar", s.alphas_cumprod),
            ("posterior_variance", s.posterior_variance),
            ("posterior_log_variance", s.posterior_log_variance_clipped),
        ):
            exp = table[t]
            tol = np.abs(np.spacing(np.abs(exp).astype(np.float32))).astype(np.float64)
            self._tally(name, np.abs(scal[name] - exp) / tol, keys, draw, t)
        B, shp = len(t), (len(t), self.C, self.P)
        f = {c: v.reshape(shp).astype(np.float64) for c, v in cols.items()}
        h = {c: half_ulp(v).reshape(shp) for c, v in cols.items()}
        a = s.sqrt_alphas_cumprod[t][:, None, None]
        sg = s.sqrt_one_minus_alphas_cumprod[t][:, None, None]
        c1 = s.posterior_mean_coef1[t][:, None, None]
        c2 = s.posterior_mean_coef2[t][:, None, None]
        xt, ep, pm = f["x_t"], f["epsilon"], f["posterior_mean"]

        def worst(err, tol):
            return (np.abs(err) / tol).reshape(len(err), -1).max(axis=1)

        if self.store_x0:
            x0 = f["x_0"]
            tol = h["x_t"] + a * h["x_0"] + sg * h["epsilon"]
            tol += 4 * U32 * (a * np.abs(x0) + sg * np.abs(ep))
            self._tally("x_t", worst(xt - (a * x0 + sg * ep), tol), keys, draw, t)
            tol = h["posterior_mean"] + c1 * h["x_0"] + c2 * h["x_t"]
            tol += 4 * U32 * (c1 * np.abs(x0) + c2 * np.abs(xt) + np.abs(pm))
            self._tally("posterior_mean", worst(pm - (c1 * x0 + c2 * xt), tol), keys, draw, t)
            return
        ok = s.alphas_cumprod[t] >= self.plan.recon_min_alpha_bar
        self.s.counts["unchecked_pm"] += int(B - ok.sum())
        if not ok.any():
            return
        a, sg, c1, c2 = a[ok], sg[ok], c1[ok], c2[ok]
        xt, ep, pm = xt[ok], ep[ok], pm[ok]
        g, q = c1 / a + c2, c1 * sg / a  # pm = g x_t - q eps with x_0 reconstructed
        tol = h["posterior_mean"][ok] + g * h["x_t"][ok] + q * h["epsilon"][ok]
        tol += (
            4 * U32 * (c1 / a * (np.abs(xt) + 2 * sg * np.abs(ep)) + c2 * np.abs(xt) + np.abs(pm))
        )
        sel = np.flatnonzero(ok)
        self._tally(
            "posterior_mean",
            worst(pm - (g * xt - q * ep), tol),
            [keys[i] for i in sel],
            draw[ok],
            t[ok],
        )

    def moments(self, t, cols) -> None:
        st, plan, s = self.s, self.plan, self.sched
        B, C, P = len(t), self.C, self.P
        xt = cols["x_t"].reshape(B, C, P).astype(np.float64)
        ep = cols["epsilon"].reshape(B, C, P).astype(np.float64)
        ab, a, sg = (
            s.alphas_cumprod[t],
            s.sqrt_alphas_cumprod[t],
            s.sqrt_one_minus_alphas_cumprod[t],
        )
        bn, ch = self.tbin[t], np.arange(C)
        st.eps.update(ep, (bn[:, None, None], ch[None, :, None]))
        st.xt.update(xt, (bn[:, None, None], ch[None, :, None]))

        def with_all(v):  # [B, C] -> [B, C + 1], the last column averaging the channels
            return np.concatenate([v, v.mean(axis=1, keepdims=True)], axis=1)

        cells = (np.repeat(bn, C + 1), np.tile(np.arange(C + 1), B))
        per_t = [np.broadcast_to(v[:, None], (B, C + 1)) for v in (ab, a, sg)]
        feats = [with_all(xt.mean(2)), with_all((xt * xt).mean(2)), with_all((xt * ep).mean(2))]
        st.rec.update(np.stack(feats + per_t, axis=-1).reshape(-1, len(REC)), cells)
        if self.store_x0:
            av = np.ones(B, dtype=bool)
            x0 = cols["x_0"].reshape(B, C, P).astype(np.float64)
        else:
            av = ab >= plan.recon_min_alpha_bar
            x0 = (xt[av] - sg[av, None, None] * ep[av]) / a[av, None, None]
        if av.any():
            bav, nav = bn[av], int(av.sum())
            st.x0.update(x0, (bav[:, None, None], ch[None, :, None]))
            f0 = np.stack([with_all(x0.mean(2)), with_all((x0 * x0).mean(2))], axis=-1)
            st.x0rec.update(
                f0.reshape(-1, 2), (np.repeat(bav, C + 1), np.tile(np.arange(C + 1), nav))
            )
            rows = np.stack([ep[av], x0, xt[av]], axis=-1).reshape(-1, 3)
            idx = np.broadcast_to(bav[:, None, None], (nav, C, P)).reshape(-1)
            chx = np.broadcast_to(ch[None, :, None], (nav, C, P)).reshape(-1)
            st.cross.update(rows, (idx, chx))
        st.pos_sum += ep.sum(axis=0).reshape(-1)
        st.pos_n += B
        flat = ep.reshape(B, -1)
        fc = flat - flat.mean(axis=1, keepdims=True)
        norm = np.sqrt((fc * fc).sum(axis=1))
        if self.prev is not None:
            fc, norm = np.concatenate([self.prev[0], fc]), np.concatenate([self.prev[1], norm])
        if len(fc) > 1:
            with np.errstate(invalid="ignore", divide="ignore"):
                r = (fc[:-1] * fc[1:]).sum(axis=1) / (norm[:-1] * norm[1:])
            z = np.nan_to_num(r) * math.sqrt(fc.shape[1] - 1)
            st.adj["n"] += len(z)
            st.adj["sum_z"] += float(z.sum())
            st.adj["max_abs_z"] = max(st.adj["max_abs_z"], float(np.abs(z).max()))
        self.prev = (fc[-1:], norm[-1:])
        st.eps_res.update(cols["epsilon"].reshape(-1))
        top = bn == plan.bins - 1
        if top.any():
            st.xT_res.update(cols["x_t"][top].reshape(-1))
        for b in np.unique(bn) if st.grid else ():
            st.grid[int(b)].update(cols["x_t"][bn == b])

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


def scan_shard(out: OutputDir, shard: str, plan: ScanPlan) -> ShardStats:
    """Read one committed shard batch by batch and return its statistics. Never raises for a
    bad file: the error is returned in ``ShardStats.error`` (reported by ``completeness``)."""
    t0 = time.perf_counter()
    name = OutputDir.data_name(shard)
    st = ShardStats(shard=shard, file=out.display(name))
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
            cols = list(pf.schema_arrow.names)
            rows = max(1, plan.batch_elements // max(1, scanner.C * scanner.P))
            row0 = 0
            for rb in pf.iter_batches(batch_size=rows, columns=cols):
                scanner.batch(rb, row0)
                row0 += rb.num_rows
            scanner.finish()
    except Exception as exc:  # reported, not raised: one bad shard must not stop the others
        st.error = f"{type(exc).__name__}: {exc}"
    st.seconds = time.perf_counter() - t0
    return st


def scan_shard_bucketed(out: OutputDir, shard: str, plan: ScanPlan, buckets: int) -> tuple:
    """:func:`scan_shard` for a Ray task with ``num_returns=1 + buckets``: the ShardStats
    without its hashes, then its hashes split into ``buckets`` by prefix
    (:func:`split_hashes`), each its own object for the bucket's reduce task."""
    st = scan_shard(out, shard, plan)
    hashes = st.hashes if st.hashes is not None else np.zeros((0, 12), dtype=np.uint8)
    st.hashes = None
    return (st, *split_hashes(hashes, buckets))
