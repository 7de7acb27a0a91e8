"""The accumulation of one shard's statistics, batch by batch (:class:`Accumulator`).

Each Parquet batch of a shard (:func:`pipeline.validate.scan.scan_shard` reads them) adds to
the shard's :class:`pipeline.validate.measures.Stats`: mergeable moments and co-moments per
t-bin x channel, reservoirs, noise hashes, and the record-consistency counts (each stored x_t,
posterior and target value recomputed from x_0, eps and the float64 tables of the process,
within the rounding of the stored dtype, :mod:`pipeline.validate.rounding`).

Every statistic is stated in alpha_t and sigma_t (x_t = alpha_t x_0 + sigma_t eps), so one scan
serves both families (:mod:`pipeline.noising.process`): DDPM (alpha = sqrt(ab), sigma = sqrt(1 -
ab)) and rectified flow (alpha = 1 - sigma). t-bins are over the grid index (DDPM's t; flow's stored
t = sigma * T is mapped back to its index, and a value off the grid counts as out of range).

Cost (docs/benchmark.md, "Validation cost"): the scan reads only the columns it checks, casts
each tensor to float64 once per cache-sized chunk of records (:data:`CHUNK_ELEMENTS`) and
computes everything of that chunk (consistency, row moments, cross-products, adjacent
correlations, per-position sums) before the next; each (record, channel) row's moments go to
their (t-bin, channel) cell as one part (:meth:`pipeline.validate.stats.GroupedMoments.add_parts`),
not value by value with an index. The time per part is in ``ShardStats.cost``. Precision: all
arithmetic stays float64. float32 was measured and not kept: on chunks in cache it is no faster
(the float16 cast and the reads dominate), and the consistency tolerance is a few float32
roundoffs of the operands, so the check's own arithmetic must be far more precise than float32.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from pipeline.output import records
from pipeline.validate.bucketscan import BucketScan
from pipeline.validate.condscan import CondScan
from pipeline.validate.cost import Cost
from pipeline.validate.features import CROSS, REC, X0REC
from pipeline.validate.measures import ShardStats, Stats, strip_item
from pipeline.validate.plan import (
    CHUNK_ELEMENTS,
    TARGETS,
    ScanPlan,
    bin_of_t,
    scan_columns,
    seed_of,
)
from pipeline.validate.rounding import finite_rows, half_ulp, op_tol, target_ratios

# The axes of the (eps, x_0, x_t) cross-product matrices.
EPS, X0, XT = (CROSS.index(n) for n in ("eps", "x0", "xt"))


def _col(sl: slice, v: np.ndarray) -> np.ndarray:
    """Per-record coefficients of a chunk, broadcastable against its [r, C, P] values."""
    return v[sl][:, None, None]


@dataclass
class _Rows:
    """The valid records of a batch: identities, t-bin and schedule coefficients, [B] each."""

    keys: list
    draw: np.ndarray
    t: np.ndarray
    bn: np.ndarray  # t-bin
    ab: np.ndarray  # alpha_t^2 (DDPM: alpha_bar)
    a: np.ndarray  # alpha_t
    sg: np.ndarray  # sigma_t
    av: np.ndarray  # bool: x_0 known (stored, or reconstructable at this alpha_t^2)


@dataclass
class _Sums:
    """What the pass over a batch's chunks computed per record, before it goes to the cells."""

    ratio_xt: np.ndarray  # [B] worst |error| / tolerance of x_t (stored x_0 only)
    ratio_pm: np.ndarray  # [B] the same for posterior_mean
    mom: dict  # tensor -> [4, B, C]: mean, M2, M3, M4 of each (record, channel) row
    xe: np.ndarray  # [B, C] sum of (x_t - mean)(eps - mean) per row
    cr: np.ndarray  # [B, C, 3, 3] (eps, x_0, x_t) cross-products per row (rows av)
    pos: np.ndarray  # [C, P] eps summed per position


class Accumulator:
    """Accumulates one shard's statistics batch by batch into ``st.stats``."""

    def __init__(self, st: ShardStats, plan: ScanPlan):
        p = plan.process
        self.st, self.plan = st, plan
        self.proc = records.process_from_metadata(p, plan.shape)  # per file: use_file
        self.ab = self.proc.alphas_cumprod  # alpha^2; DDPM: the schedule's alpha_bar table
        self.noise = records.noise_from_metadata(p)
        self.T, self.K = self.proc.num_timesteps, self.noise.draws
        self.dtype, self.store_x0 = p.dtype, bool(p.store_x0)
        self.C, self.P = plan.shape[0], plan.P
        self.base = plan  # the dataset's shape: the positional statistics' (pos_sum, strip)
        self.positional = True  # False while a file of another shape is read (buckets)
        self.buckets = BucketScan(p)  # aspect-ratio buckets' columns, when the dataset has them
        self.tbin = bin_of_t(plan.edges, self.T)
        self.s = st.stats = Stats(plan, plan.seed, st.shard)
        self.columns = scan_columns(plan)
        self.pairs: set = set()
        self.draws_per_key: Counter = Counter()
        self.dups = self.bad_draw = 0
        self.hashes: list[bytes] = []
        self.cond = CondScan(p.conditioning)
        self.prev = None  # last record's eps deviations, channel offsets, squared norm
        self._first_prev_norm2 = np.nan
        self.cost = Cost()
        rng = np.random.Generator(np.random.PCG64(seed_of(plan.seed, st.shard, "keyed")))
        quota = min(plan.consistency_quota, st.num_rows)
        self.keyed_rows = set(rng.choice(st.num_rows, size=quota, replace=False).tolist())

    def use_file(self, shape, grid: dict | None = None) -> None:
        """The next batches come from a file of sample ``shape`` (aspect-ratio buckets: one per
        bucket) and, for flow, of that file's ``grid`` entry (a dynamic shift's grid follows the
        file's sequence length: the process is rebuilt for it, its hash checked): the keyed
        noise is regenerated at that shape, the moments count its pixels,
        and only a file of the dataset's shape adds to the statistics per tensor position
        (``pos_sum``, the plots' strip of whole records); consecutive-record correlations do
        not pair records across files."""
        shape = tuple(int(s) for s in shape)
        if grid is not None or shape != self.plan.shape:
            process = self.base.process if grid is None else replace(self.base.process, grid=grid)
            self.proc = records.process_from_metadata(process, shape)
            self.ab = self.proc.alphas_cumprod
        if shape != self.plan.shape:
            process = replace(self.base.process, shape=list(shape))
            self.plan = replace(self.base, process=process, sample_shape=shape)
            self.C, self.P = self.plan.shape[0], self.plan.P
            self.prev, self._first_prev_norm2 = None, np.nan
        self.positional = shape == self.base.shape

    # -- per batch -------------------------------------------------------------------------
    def batch(self, rb, row0: int) -> None:
        cost = self.cost
        n = rb.num_rows
        keys = rb.column("key").to_pylist()
        index = rb.column("index").to_numpy()
        draw = rb.column("draw").to_numpy().astype(np.int64)
        t = self.proc.grid_index(rb.column("t").to_numpy())  # -1: not on the grid
        cols = {c: records.tensor_to_numpy(rb.column(c)) for c in records.TENSOR_COLUMNS}
        for c in ("x_0", *TARGETS):
            if c in rb.schema.names:
                cols[c] = records.tensor_to_numpy(rb.column(c))
        scal = {  # snr: not in files written before it was added; sigma: flow
            c: rb.column(c).to_numpy().astype(np.float64)
            for c in (*records.SCALAR_COLUMNS, "sigma")
            if c in rb.schema.names
        }
        cost.lap("read")
        self.identities(keys, draw, cols["epsilon"])
        cost.lap("identities_and_hashes")
        self.cond.batch(rb, keys)
        self.buckets.batch(rb, keys, draw, self.plan.shape)
        cost.lap("conditioning")
        self.regenerate(keys, index, draw, t, cols["epsilon"], row0)
        cost.lap("keyed_regeneration")
        ok = (t >= 0) & (t < self.T)
        self.s.counts["t_out_of_range"] += int(n - ok.sum())
        finite = np.ones(n, dtype=bool)
        for v in cols.values():
            finite &= finite_rows(v)
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
            self.terminal(t, cols)
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
        s = self.proc
        for name, table in (
            ("alpha_bar", self.ab),
            ("sigma", s.sigma),
            ("snr", s.snr),
            ("posterior_variance", s.posterior_variance),
            ("posterior_log_variance", s.posterior_log_variance_clipped),
        ):
            if name not in scal:
                continue
            exp = table[t]
            tol = np.abs(np.spacing(np.abs(exp).astype(np.float32))).astype(np.float64)
            self._tally(name, np.abs(scal[name] - exp) / tol, keys, draw, t)

    def terminal(self, t, cols) -> None:
        """Where alpha_t = 0 (flow's sigma = 1, a zero-terminal-SNR DDPM's last step) x_t is
        eps exactly: 0 x_0 + 1 eps in any arithmetic, then the same rounding."""
        at = self.proc.alpha[t] == 0.0
        if not at.any():
            return
        xt, ep = cols["x_t"][at], cols["epsilon"][at]
        same = (xt.reshape(len(xt), -1) == ep.reshape(len(ep), -1)).all(axis=1)
        self.s.counts["terminal_checked"] += int(at.sum())
        self.s.counts["terminal_mismatch"] += int((~same).sum())

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
        cost, sc, plan = self.cost, self.proc, self.plan
        B, C, P = len(t), self.C, self.P
        R = max(1, CHUNK_ELEMENTS // (C * P))
        ab, a = self.ab[t], sc.alpha[t]
        sg, bn = sc.sigma[t], self.tbin[t]
        c1, c2 = sc.posterior_mean_coef1[t], sc.posterior_mean_coef2[t]
        av = np.ones(B, dtype=bool) if self.store_x0 else ab >= plan.recon_min_alpha_bar
        with np.errstate(invalid="ignore", divide="ignore"):
            g, q = c1 / a + c2, c1 * sg / a  # pm = g x_t - q eps with x_0 reconstructed
        ratio_xt, ratio_pm = np.zeros(B), np.zeros(B)
        ratio_tg = {n: np.zeros(B) for n in TARGETS if n in cols}
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
                t0 = op_tol(cols["x_0"][sl], x0, 4)
                te = op_tol(cols["epsilon"][sl], ep, 4)
                tol = half_ulp(cols["x_t"][sl]).reshape(xt.shape) + col(a) * t0 + col(sg) * te
                err = xt - (col(a) * x0 + col(sg) * ep)
                ratio_xt[sl] = (np.abs(err) / tol).reshape(r, -1).max(axis=1)
                tx = op_tol(cols["x_t"][sl], xt, 4)
                tol = op_tol(cols["posterior_mean"][sl], pm, 4) + col(c1) * t0 + col(c2) * tx
                err = pm - (col(c1) * x0 + col(c2) * xt)
                ratio_pm[sl] = (np.abs(err) / tol).reshape(r, -1).max(axis=1)
            elif k.any():
                kx, ke, kp = (
                    (v, cols[c][sl]) if k.all() else (v[k], cols[c][sl][k])
                    for c, v in (("x_t", xt), ("epsilon", ep), ("posterior_mean", pm))
                )
                gk, qk = g[sl][k][:, None, None], q[sl][k][:, None, None]
                tol = op_tol(kp[1], kp[0], 4) + gk * op_tol(kx[1], kx[0], 4)
                tol += qk * op_tol(ke[1], ke[0], 8)
                err = kp[0] - (gk * kx[0] - qk * ke[0])
                ratio_pm[i + np.flatnonzero(k)] = (np.abs(err) / tol).reshape(len(tol), -1).max(1)
            if ratio_tg:
                x0s = f["x_0"] if self.store_x0 else None
                for name, v in target_ratios(sl, f, cols, col(a), col(sg), x0s).items():
                    ratio_tg[name][sl] = v
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
                cr[rows, :, EPS, EPS] = mom["epsilon"][1, rows]
                cr[rows, :, X0, X0] = m0[1]
                cr[rows, :, XT, XT] = mom["x_t"][1, rows]
                cr[rows, :, EPS, XT] = cr[rows, :, XT, EPS] = xe[rows]
                for u, w, eu, ew in ((EPS, X0, e_epk, e_x0), (X0, XT, e_x0, e_xtk)):
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
        recs = _Rows(keys, draw, t, bn, ab, a, sg, av)
        for name, ratio in ratio_tg.items():
            self._tally(name, ratio, keys, draw, t)
        self._fold(recs, _Sums(ratio_xt, ratio_pm, mom, xe, cr, pos))
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

    def _fold(self, rows: _Rows, sums: _Sums) -> None:
        """Tally the batch's consistency ratios and add its row moments to the cells."""
        st, B, C, P = self.s, len(rows.t), self.C, self.P
        keys, draw, t, av, mom = rows.keys, rows.draw, rows.t, rows.av, sums.mom
        if self.store_x0:
            self._tally("x_t", sums.ratio_xt, keys, draw, t)
            self._tally("posterior_mean", sums.ratio_pm, keys, draw, t)
        else:
            self.s.counts["unchecked_pm"] += int(B - av.sum())
            if av.any():
                sel = np.flatnonzero(av)
                pm = sums.ratio_pm[av]
                self._tally("posterior_mean", pm, [keys[i] for i in sel], draw[av], t[av])
        self.cost.lap("consistency")
        bn, ch = rows.bn, np.arange(C)
        cells = (bn[:, None] * C + ch[None, :]).reshape(-1)
        st.eps.add_parts(P, *mom["epsilon"].reshape(4, -1), cells)
        st.xt.add_parts(P, *mom["x_t"].reshape(4, -1), cells)

        def with_all(v):  # [B, C] -> [B, C + 1], the last column averaging the channels
            return np.concatenate([v, v.mean(axis=1, keepdims=True)], axis=1)

        def per_record(v):  # [B] -> [B, C + 1]
            return np.broadcast_to(v[:, None], (B, C + 1))

        mx, me = mom["x_t"][0], mom["epsilon"][0]
        rcells = (np.repeat(bn, C + 1), np.tile(np.arange(C + 1), B))
        feats = {
            "xt_mean": with_all(mx),
            "xt_ms": with_all(mom["x_t"][1] / P + mx * mx),
            "xt_eps": with_all(sums.xe / P + mx * me),
            "ab": per_record(rows.ab),
            "sqrt_ab": per_record(rows.a),
            "sqrt_1mab": per_record(rows.sg),
            "s2": per_record(rows.sg * rows.sg),
        }
        st.rec.update(REC.stack(feats).reshape(-1, len(REC)), rcells)
        if av.any():
            bav, nav = bn[av], int(av.sum())
            m0 = mom["x_0"][:, av]
            st.x0.add_parts(P, *m0.reshape(4, -1), cells.reshape(B, C)[av].reshape(-1))
            f0 = {"x0_mean": with_all(m0[0]), "x0_ms": with_all(m0[1] / P + m0[0] * m0[0])}
            st.x0rec.update(
                X0REC.stack(f0).reshape(-1, len(X0REC)),
                (np.repeat(bav, C + 1), np.tile(np.arange(C + 1), nav)),
            )
            means = CROSS.stack({"eps": me[av], "x0": m0[0], "xt": mx[av]})
            cells_av = cells.reshape(B, C)[av].reshape(-1)
            st.cross.add_parts(P, means.reshape(-1, len(CROSS)), sums.cr[av], cells_av)
        if self.positional:
            st.pos_sum += sums.pos.reshape(-1)
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
        if st.strip.k:
            self.plot_samples(t, cols)

    def plot_samples(self, t, cols) -> None:
        """The plots' samples: eps per tensor position [C], and whole records (x_0 stored, or
        reconstructed as (x_t - sqrt(1 - ab) eps) / sqrt(ab) where ab is large enough)."""
        st, n = self.s, len(t)
        eps = cols["epsilon"].reshape(n, self.C, -1)
        st.eps_ch.update(np.moveaxis(eps, 1, 2).reshape(-1, self.C))
        if self.store_x0:
            x0, keep = cols["x_0"], slice(None)
        else:
            keep = self.ab[t] >= self.plan.recon_min_alpha_bar
            if not keep.any():
                return
            shape = (-1,) + (1,) * (cols["x_t"].ndim - 1)
            a, s1 = self.proc.alpha[t][keep].reshape(shape), self.proc.sigma[t][keep].reshape(shape)
            x0 = (cols["x_t"][keep].astype(np.float64) - s1 * cols["epsilon"][keep]) / a
        if self.positional:  # whole records of the dataset's shape
            st.strip.update(strip_item(x0, cols["epsilon"][keep], cols["x_t"][keep], t[keep]))

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
        st.buckets = self.buckets.summary()
        return st
