"""Mergeable streaming statistics: moments, co-moments and a bounded reservoir sample.

Everything here is a plain picklable object (Ray ships them between tasks and the driver), fed
batch by batch with vectorised numpy and merged in any order:

* :class:`GroupedMoments` / :class:`Moments`: count, mean and the central sums M2, M3, M4 of a
  stream, per group (e.g. per t-bin x channel), accumulated in float64 and merged with the
  pairwise formulas of Chan, Golub & LeVeque (1979) extended to M3/M4 by Pebay (2008). Merging
  the statistics of any split of a stream gives those of the whole stream (up to rounding).
* :class:`GroupedCoMoments`: count, mean vector and the matrix of centred cross-products of a
  d-dimensional stream, per group (covariances, correlations, variances of linear combinations).
* :class:`Reservoir`: a uniform sample of at most ``k`` items of a stream ("bottom-k": every item
  gets an iid uniform key and the k smallest keys are kept). Once full, only a Binomial number of
  candidates per batch gets a key (keys below the current threshold are uniform on it), which is
  Algorithm L's skipping in key form. Two reservoirs of disjoint streams merge exactly by keeping
  the k smallest keys of their union: no weighted subsampling needed. Deterministic for a seed.

* :func:`chi2_binned` / :func:`shared_chi2`: chi-square tests on accumulated counts (timestep
  histogram against uniform; per-position eps sums against independent noise).

Standard errors are those of iid normal data (``se_*``): SE(mean) = sqrt(var/n),
SE(var) = sqrt(2/(n-1)) var, SE(skew) = sqrt(6/n), SE(excess kurtosis) = sqrt(24/n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_STATS = ("n", "mean", "m2", "m3", "m4")


def _merge_arrays(a: dict, b: dict) -> dict:
    """Pairwise merge of moment arrays (Chan et al.; Pebay 2008, eq. 3.1), elementwise over
    groups."""
    na, nb = a["n"], b["n"]
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(n > 0, b["mean"] - a["mean"], 0.0)
        fb = np.where(n > 0, nb / n, 0.0)
        mean = a["mean"] + d * fb
        nanb_n = np.where(n > 0, na * nb / n, 0.0)
        m2 = a["m2"] + b["m2"] + d * d * nanb_n
        n_safe = np.where(n > 0, n, 1.0)
        m3 = (
            a["m3"]
            + b["m3"]
            + d**3 * nanb_n * (na - nb) / n_safe
            + 3.0 * d * (na * b["m2"] - nb * a["m2"]) / n_safe
        )
        m4 = (
            a["m4"]
            + b["m4"]
            + d**4 * nanb_n * (na * na - na * nb + nb * nb) / n_safe**2
            + 6.0 * d * d * (na * na * b["m2"] + nb * nb * a["m2"]) / n_safe**2
            + 4.0 * d * (na * b["m3"] - nb * a["m3"]) / n_safe
        )
    return {"n": n, "mean": mean, "m2": m2, "m3": m3, "m4": m4}


class GroupedMoments:
    """Moments up to order 4 of a scalar stream, for each cell of a group grid ``shape``.

    ``update(values, index)``: ``index`` is a tuple of integer arrays, one per grid axis,
    broadcastable against ``values``; every value goes to the cell ``index`` names.
    """

    def __init__(self, shape: Sequence[int] | int = ()):
        self.shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        size = int(np.prod(self.shape, dtype=np.int64))
        self._a = {k: np.zeros(size, dtype=np.float64) for k in _STATS}
        self._summary: tuple[dict, dict] | None = None  # (the _a it was computed from, summary)

    def __getstate__(self) -> dict:
        """Pickled without the cached summary (Ray ships these between processes)."""
        return {**self.__dict__, "_summary": None}

    @classmethod
    def _from_arrays(cls, shape: tuple, arrays: dict) -> GroupedMoments:
        out = cls(shape)
        out._a = {k: np.asarray(arrays[k], dtype=np.float64).reshape(-1).copy() for k in _STATS}
        return out

    def update(self, values: np.ndarray, index: Sequence[np.ndarray] = ()) -> GroupedMoments:
        values = np.asarray(values, dtype=np.float64)
        if len(index) != len(self.shape):
            raise ValueError(f"need {len(self.shape)} index arrays, got {len(index)}")
        if values.size == 0:
            return self
        size = len(self._a["n"])
        if self.shape:
            arrays = np.broadcast_arrays(values, *(np.asarray(i) for i in index))
            values = arrays[0].reshape(-1)
            groups = np.ravel_multi_index([a.reshape(-1) for a in arrays[1:]], self.shape)
        else:
            values = values.reshape(-1)
            groups = np.zeros(values.size, dtype=np.int64)
        n = np.bincount(groups, minlength=size).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, np.bincount(groups, values, size) / n, 0.0)
        dev = values - mean[groups]
        dev2 = dev * dev
        batch = {
            "n": n,
            "mean": mean,
            "m2": np.bincount(groups, dev2, size),
            "m3": np.bincount(groups, dev2 * dev, size),
            "m4": np.bincount(groups, dev2 * dev2, size),
        }
        self._a = _merge_arrays(self._a, batch)
        return self

    def add_parts(self, n, mean, m2, m3, m4, groups: np.ndarray) -> GroupedMoments:
        """Add sub-streams given by their moments (in place; returns self): part i has count
        ``n[i]`` (or one count for all), mean and central sums M2, M3, M4, and goes to the flat
        cell ``groups[i]``. The parts of a cell are combined exactly (their sums shifted from
        each part's mean to the cell's mean d_i = mean_i - mean:
        M2 = sum(M2_i + n_i d_i^2), M3 = sum(M3_i + 3 d_i M2_i + n_i d_i^3),
        M4 = sum(M4_i + 4 d_i M3_i + 6 d_i^2 M2_i + n_i d_i^4)), then merged like :meth:`update`.
        This is how the validator's scan feeds one (record, channel) row of pixels at a time
        (row moments from one cached pass) instead of an index per element."""
        groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        if groups.size == 0:
            return self
        size = len(self._a["n"])
        n = np.broadcast_to(np.asarray(n, dtype=np.float64), groups.shape)
        mean, m2, m3, m4 = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (mean, m2, m3, m4))
        cn = np.bincount(groups, n, size)
        with np.errstate(invalid="ignore", divide="ignore"):
            cmean = np.where(cn > 0, np.bincount(groups, n * mean, size) / cn, 0.0)
        d = mean - cmean[groups]
        d2 = d * d
        batch = {
            "n": cn,
            "mean": cmean,
            "m2": np.bincount(groups, m2 + n * d2, size),
            "m3": np.bincount(groups, m3 + d * (3.0 * m2 + n * d2), size),
            "m4": np.bincount(groups, m4 + d * (4.0 * m3 + d * (6.0 * m2 + n * d2)), size),
        }
        self._a = _merge_arrays(self._a, batch)
        return self

    def merge(self, other: GroupedMoments) -> GroupedMoments:
        """Add another accumulator of the same grid (in place; returns self)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge moments of grid {other.shape} into {self.shape}")
        self._a = _merge_arrays(self._a, other._a)
        return self

    def collapse(self, axis: int | Sequence[int]) -> GroupedMoments:
        """Merge the cells along ``axis`` (one or several), returning the smaller grid."""
        axes = sorted({a % len(self.shape) for a in np.atleast_1d(axis)}, reverse=True)
        shape = list(self.shape)
        arrays = {k: v.reshape(shape) for k, v in self._a.items()}
        for ax in axes:
            acc = {k: np.take(v, 0, axis=ax) for k, v in arrays.items()}
            for i in range(1, shape[ax]):
                acc = _merge_arrays(acc, {k: np.take(v, i, axis=ax) for k, v in arrays.items()})
            arrays = acc
            del shape[ax]
        return GroupedMoments._from_arrays(tuple(shape), arrays)

    def total(self) -> Moments:
        """All cells merged into one :class:`Moments`."""
        if not self.shape:
            return Moments._from_arrays((), self._a)
        return Moments._from_arrays((), self.collapse(range(len(self.shape)))._a)

    def __getitem__(self, idx) -> Moments:
        flat = int(np.ravel_multi_index(np.atleast_1d(idx), self.shape)) if self.shape else 0
        return Moments._from_arrays((), {k: v[flat : flat + 1] for k, v in self._a.items()})

    def var(self, ddof: int = 1) -> np.ndarray:
        n, m2 = (self._a[k].reshape(self.shape) for k in ("n", "m2"))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > ddof, m2 / (n - ddof), np.nan)

    def summary(self) -> dict[str, np.ndarray]:
        """n, mean, var (ddof 1), skew g1 = sqrt(n) M3 / M2^1.5 and excess kurtosis
        g2 = n M4 / M2^2 - 3 (scipy.stats.skew / kurtosis with bias=True), and their standard
        errors under normality; arrays of the grid's shape."""
        n, mean, m2, m3, m4 = (self._a[k].reshape(self.shape) for k in _STATS)
        var = self.var()
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "n": n,
                "mean": mean,
                "var": var,
                "skew": np.where(m2 > 0, np.sqrt(n) * m3 / m2**1.5, np.nan),
                "excess_kurtosis": np.where(m2 > 0, n * m4 / m2**2 - 3.0, np.nan),
                "se_mean": np.sqrt(var / n),
                "se_var": np.sqrt(2.0 / (n - 1)) * var,
                "se_skew": np.sqrt(6.0 / n),
                "se_kurtosis": np.sqrt(24.0 / n),
            }

    def _summary_once(self) -> dict:
        """:meth:`summary`, computed once per state: every update and merge replaces ``_a``."""
        if self._summary is None or self._summary[0] is not self._a:
            self._summary = (self._a, self.summary())
        return self._summary[1]

    # One statistic of the summary each; reading several computes the summary once.
    n = property(lambda self: self._summary_once()["n"])
    mean = property(lambda self: self._summary_once()["mean"])
    skew = property(lambda self: self._summary_once()["skew"])
    excess_kurtosis = property(lambda self: self._summary_once()["excess_kurtosis"])
    se_mean = property(lambda self: self._summary_once()["se_mean"])
    se_var = property(lambda self: self._summary_once()["se_var"])
    se_skew = property(lambda self: self._summary_once()["se_skew"])
    se_kurtosis = property(lambda self: self._summary_once()["se_kurtosis"])


class Moments(GroupedMoments):
    """Moments of a single scalar stream; its statistics are Python floats."""

    def __init__(self):
        super().__init__(())

    @classmethod
    def _from_arrays(cls, shape: tuple, arrays: dict) -> Moments:
        out = cls()
        out._a = {k: np.asarray(arrays[k], dtype=np.float64).reshape(1).copy() for k in _STATS}
        return out

    def update(self, values: np.ndarray, index: Sequence[np.ndarray] = ()) -> Moments:
        return super().update(values, ())

    def var(self, ddof: int = 1) -> float:
        return float(super().var(ddof))

    def summary(self) -> dict[str, float]:
        out = {k: float(v) for k, v in super().summary().items()}
        out["n"] = int(out["n"])
        return out

    @property
    def count(self) -> int:
        return int(self._a["n"][0])


class GroupedCoMoments:
    """Count, mean vector and centred cross-product matrix C of a d-dimensional stream, per
    group cell. ``cov = C / (n - 1)``; the variance of a linear combination ``w . x`` is
    ``w C w / (n - 1)``. ``update(rows [N, d], index)`` with one integer array [N] per grid axis.
    """

    def __init__(self, shape: Sequence[int] | int, dim: int):
        self.shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        self.dim = int(dim)
        size = int(np.prod(self.shape, dtype=np.int64))
        self.n = np.zeros(size, dtype=np.float64)
        self.mean_ = np.zeros((size, self.dim), dtype=np.float64)
        self.c = np.zeros((size, self.dim, self.dim), dtype=np.float64)

    def _merge(self, n, mean, c) -> None:
        tot = self.n + n
        with np.errstate(invalid="ignore", divide="ignore"):
            fb = np.where(tot > 0, n / tot, 0.0)
            w = np.where(tot > 0, self.n * n / tot, 0.0)
        d = mean - self.mean_
        self.mean_ = self.mean_ + d * fb[:, None]
        self.c = self.c + c + d[:, :, None] * d[:, None, :] * w[:, None, None]
        self.n = tot

    def update(self, rows: np.ndarray, index: Sequence[np.ndarray] = ()) -> GroupedCoMoments:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        if len(rows) == 0:
            return self
        size = len(self.n)
        if self.shape:
            groups = np.ravel_multi_index([np.asarray(i).reshape(-1) for i in index], self.shape)
            groups = np.broadcast_to(groups, (len(rows),))
        else:
            groups = np.zeros(len(rows), dtype=np.int64)
        n = np.bincount(groups, minlength=size).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.stack([np.bincount(groups, rows[:, j], size) for j in range(self.dim)], 1)
            mean = np.where(n[:, None] > 0, mean / n[:, None], 0.0)
        dev = rows - mean[groups]
        c = np.zeros((size, self.dim, self.dim), dtype=np.float64)
        for i in range(self.dim):
            for j in range(i, self.dim):
                c[:, i, j] = c[:, j, i] = np.bincount(groups, dev[:, i] * dev[:, j], size)
        self._merge(n, mean, c)
        return self

    def add_parts(self, n, mean: np.ndarray, c: np.ndarray, groups: np.ndarray):
        """Add sub-streams given by their count ``n[i]`` (or one for all), mean [m, d] and
        centred cross-products [m, d, d], part i to the flat cell ``groups[i]``: per cell
        C = sum(C_i + n_i d_i d_i^T) with d_i = mean_i - the cell's mean (exact), then merged.
        Returns self."""
        groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        if groups.size == 0:
            return self
        size, dim = len(self.n), self.dim
        n = np.broadcast_to(np.asarray(n, dtype=np.float64), groups.shape)
        mean = np.asarray(mean, dtype=np.float64).reshape(-1, dim)
        c = np.asarray(c, dtype=np.float64).reshape(-1, dim, dim)
        cn = np.bincount(groups, n, size)
        with np.errstate(invalid="ignore", divide="ignore"):
            sums = np.stack([np.bincount(groups, n * mean[:, j], size) for j in range(dim)], 1)
            cmean = np.where(cn[:, None] > 0, sums / cn[:, None], 0.0)
        d = mean - cmean[groups]
        parts = c + n[:, None, None] * d[:, :, None] * d[:, None, :]
        cc = np.zeros((size, dim, dim), dtype=np.float64)
        np.add.at(cc, groups, parts)
        self._merge(cn, cmean, cc)
        return self

    def merge(self, other: GroupedCoMoments) -> GroupedCoMoments:
        if other.shape != self.shape or other.dim != self.dim:
            raise ValueError("cannot merge co-moments of a different grid or dimension")
        self._merge(other.n, other.mean_, other.c)
        return self

    def cell(self, idx) -> tuple[float, np.ndarray, np.ndarray]:
        """(n, mean [d], C [d, d]) of one cell."""
        flat = int(np.ravel_multi_index(np.atleast_1d(idx), self.shape)) if self.shape else 0
        return float(self.n[flat]), self.mean_[flat].copy(), self.c[flat].copy()

    def pooled(self, cells: Sequence) -> tuple[float, np.ndarray, np.ndarray]:
        """(n, mean, C) of the union of several cells."""
        n, mean, c = 0.0, np.zeros(self.dim), np.zeros((self.dim, self.dim))
        for idx in cells:
            nb, mb, cb = self.cell(idx)
            tot = n + nb
            if tot == 0:
                continue
            d = mb - mean
            c = c + cb + np.outer(d, d) * (n * nb / tot)
            mean = mean + d * (nb / tot)
            n = tot
        return n, mean, c


def linear_mean_se(n: float, mean: np.ndarray, c: np.ndarray, w: Sequence[float]):
    """Mean of ``w . x`` and its standard error across rows: sqrt(w C w / (n (n - 1)))."""
    w = np.asarray(w, dtype=np.float64)
    if n < 2:
        return float(w @ mean) if n else math.nan, math.nan
    var = max(float(w @ c @ w), 0.0) / (n - 1)
    return float(w @ mean), math.sqrt(var / n)


def correlation(n: float, c: np.ndarray, i: int = 0, j: int = 1) -> float:
    """Pearson correlation of components i and j from a cross-product matrix."""
    den = math.sqrt(max(c[i, i], 0.0) * max(c[j, j], 0.0))
    return float(c[i, j] / den) if n > 1 and den > 0 else math.nan


class Reservoir:
    """A uniform random sample of at most ``k`` items (rows of ``item_shape``) of a stream.

    Bottom-k sampling: each item has an iid Uniform(0, 1) key; the k smallest are kept. Once the
    reservoir is full with threshold tau (its largest key), a batch of m items contributes
    Binomial(m, tau) candidates at random positions with keys Uniform(0, tau): the same
    distribution as drawing every key, at O(candidates) cost. ``merge`` keeps the k smallest keys
    of two reservoirs of disjoint streams, which is a uniform sample of the union. Keys may also
    be given (e.g. hashed from the items' identities): the sample is then independent of how
    the stream was split. ``values`` are stored as ``dtype`` (float32 by default).
    """

    def __init__(self, k: int, seed: int | Sequence[int] = 0, item_shape=(), dtype=np.float32):
        if k < 0:
            raise ValueError(f"reservoir size must be >= 0, got {k}")
        self.k = int(k)
        self.item_shape = tuple(item_shape)
        self.seen = 0
        self.keys = np.empty(0, dtype=np.float64)
        self.values = np.empty((0, *self.item_shape), dtype=dtype)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def __len__(self) -> int:
        return len(self.keys)

    def _keep(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.concatenate([self.keys, keys])
        values = np.concatenate([self.values, values.astype(self.values.dtype, copy=False)])
        if len(keys) > self.k:
            part = np.argpartition(keys, self.k - 1)[: self.k]
            keys, values = keys[part], values[part]
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], values[order]

    def update(self, values: np.ndarray, keys: np.ndarray | None = None) -> Reservoir:
        values = np.asarray(values).reshape((-1, *self.item_shape))
        m = len(values)
        self.seen += m
        if m == 0 or self.k == 0:
            return self
        if keys is not None:
            keys = np.asarray(keys, dtype=np.float64).reshape(-1)
            if len(keys) != m:
                raise ValueError(f"{len(keys)} keys for {m} items")
            if len(self.keys) == self.k:
                sel = keys < self.keys[-1]
                keys, values = keys[sel], values[sel]
        elif len(self.keys) < self.k:
            keys = self._rng.random(m)
            if m > self.k:  # only the k smallest new keys can stay: select before copying
                part = np.argpartition(keys, self.k - 1)[: self.k]
                keys, values = keys[part], values[part]
        else:
            tau = float(self.keys[-1])
            c = int(self._rng.binomial(m, tau))
            pos = np.sort(self._rng.choice(m, size=c, replace=False))
            keys, values = self._rng.random(c) * tau, values[pos]
        self._keep(keys, values)
        return self

    def merge(self, other: Reservoir) -> Reservoir:
        """Absorb a reservoir of a disjoint stream (in place; returns self)."""
        if other.item_shape != self.item_shape:
            raise ValueError(f"item shapes differ: {other.item_shape} vs {self.item_shape}")
        self.seen += other.seen
        if len(other):
            self._keep(other.keys, other.values)
        return self

    def sample(self) -> np.ndarray:
        """The kept items, [len, *item_shape], in key order."""
        return self.values


# -- tests on accumulated counts -----------------------------------------------------------


def chi2_binned(
    hist: np.ndarray, nbins: int, pmf: np.ndarray | None = None
) -> tuple[float, float, int, np.ndarray]:
    """Chi-square of a length-T histogram of t against uniform t, in ``nbins`` ranges; with
    ``pmf`` ([T], summing to 1: a non-uniform density such as SD3's logit-normal) against it,
    in up to ``nbins`` ranges of about equal probability (:func:`quantile_edges`).
    Returns (statistic, p-value, degrees of freedom, observed counts)."""
    T, n = len(hist), int(hist.sum())
    if pmf is None:
        edges = np.floor(np.linspace(0, T, nbins + 1)).astype(np.int64)
        exp = n * np.diff(edges) / T
    else:
        edges = quantile_edges(pmf, nbins)
        exp = n * np.add.reduceat(pmf, edges[:-1]) / pmf.sum()
    obs = np.add.reduceat(hist, edges[:-1]).astype(np.float64)
    from scipy import stats as sps  # on the driver; a scan task's import stays light

    res = sps.chisquare(obs, exp)
    return float(res.statistic), float(res.pvalue), len(obs) - 1, obs


def quantile_edges(pmf: np.ndarray, nbins: int) -> np.ndarray:
    """Edges [k + 1] (0 ... T) of at most ``nbins`` ranges of the grid, each of probability
    about 1 / nbins under ``pmf`` and none of probability 0."""
    cdf = np.cumsum(pmf) / pmf.sum()
    cut = np.searchsorted(cdf, np.arange(1, nbins) / nbins, side="right") + 1
    edges = np.unique(np.concatenate([[0], np.clip(cut, 1, len(pmf) - 1), [len(pmf)]]))
    # each range up to the last ends where the cdf has passed its quantile: mass > 0; the last
    # has none when the density ends before the grid does, and joins the one before
    if len(edges) > 2 and pmf[edges[-2] :].sum() <= 0:
        edges = np.delete(edges, -2)
    return edges


def shared_chi2(pos_sum, pos_n) -> tuple[float, float, int]:
    """Sum over tensor positions of n * mean(eps at position)^2 ~ chi2(d) when records' noises
    share no component. Returns (statistic, p-value, d)."""
    if pos_n < 2:
        return math.nan, math.nan, 0
    stat = float((pos_sum * pos_sum).sum() / pos_n)
    from scipy import stats as sps

    return stat, float(sps.chi2.sf(stat, len(pos_sum))), len(pos_sum)
