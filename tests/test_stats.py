"""Mergeable statistics: any split merged equals one pass; values agree with numpy/scipy."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.stats as sps
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.validate.stats import (
    GroupedCoMoments,
    GroupedMoments,
    Moments,
    Reservoir,
    correlation,
    linear_mean_se,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
values = arrays(np.float64, st.integers(2, 200), elements=finite)


def _splits(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(x, sorted({c % (len(x) + 1) for c in cuts}))


def _close(a: dict, b: dict) -> None:
    keys = ["n", "mean", "var"]
    if b["var"] > 1e-6 * max(1.0, b["mean"] ** 2):  # shape is undefined for constant data
        keys += ["skew", "excess_kurtosis"]
    for k in keys:
        scale = max(1.0, abs(b[k]))
        if np.isnan(b[k]):
            assert np.isnan(a[k]), k
        else:
            assert abs(a[k] - b[k]) <= 1e-7 * scale, (k, a[k], b[k])


@settings(max_examples=60, deadline=None)
@given(values, st.lists(st.integers(0, 400), max_size=6), st.randoms(use_true_random=False))
def test_any_split_merged_in_any_order_equals_one_pass(x, cuts, rnd):
    one = Moments().update(x).summary()
    parts = [Moments().update(p) for p in _splits(x, cuts)]
    rnd.shuffle(parts)
    while len(parts) > 1:  # merge in a random tree shape
        i = rnd.randrange(len(parts) - 1)
        parts[i : i + 2] = [parts[i].merge(parts[i + 1])]
    _close(parts[0].summary(), one)
    # batches fed into one accumulator too
    acc = Moments()
    for p in _splits(x, cuts):
        acc.update(p)
    _close(acc.summary(), one)


@settings(max_examples=40, deadline=None)
@given(values)
def test_moments_match_numpy_and_scipy(x):
    s = Moments().update(x).summary()
    assert s["n"] == len(x)
    assert s["mean"] == pytest.approx(np.mean(x), rel=1e-9, abs=1e-9)
    assert s["var"] == pytest.approx(np.var(x, ddof=1), rel=1e-7, abs=1e-9)
    if np.var(x) > 1e-6 * max(1.0, np.mean(x) ** 2):  # skip near-constant data (cancellation)
        assert s["skew"] == pytest.approx(sps.skew(x), rel=1e-6, abs=1e-6)
        assert s["excess_kurtosis"] == pytest.approx(sps.kurtosis(x), rel=1e-6, abs=1e-6)


def test_standard_errors_under_normality():
    x = np.random.default_rng(0).standard_normal(40_000)
    s = Moments().update(x).summary()
    n = len(x)
    assert s["se_mean"] == pytest.approx(np.sqrt(s["var"] / n))
    assert s["se_var"] == pytest.approx(np.sqrt(2 / (n - 1)) * s["var"])
    assert s["se_skew"] == pytest.approx(np.sqrt(6 / n))
    assert s["se_kurtosis"] == pytest.approx(np.sqrt(24 / n))
    for k, expected in (("mean", 0), ("var", 1), ("skew", 0), ("excess_kurtosis", 0)):
        se = s["se_" + {"excess_kurtosis": "kurtosis"}.get(k, k)]
        assert abs(s[k] - expected) < 5 * se


def test_empty_and_tiny_streams():
    m = Moments()
    assert m.count == 0 and np.isnan(m.summary()["var"])
    m.update(np.array([3.0]))
    s = m.summary()
    assert s["mean"] == 3.0 and np.isnan(s["var"]) and np.isnan(s["skew"])
    assert Moments().merge(m).summary()["mean"] == 3.0 and m.merge(Moments()).count == 1


@settings(max_examples=30, deadline=None)
@given(
    arrays(
        np.float64, st.tuples(st.integers(1, 30), st.just(3), st.integers(1, 5)), elements=finite
    ),
    st.integers(0, 29),
)
def test_grouped_moments_per_cell_collapse_and_split(x, cut):
    bins = np.arange(len(x)) % 2  # cell = (record parity, channel)
    idx = (bins[:, None, None], np.arange(3)[None, :, None])
    g = GroupedMoments((2, 3)).update(x, idx)
    cut = cut % (len(x) + 1)
    h = GroupedMoments((2, 3)).update(x[:cut], (bins[:cut, None, None], idx[1]))
    h.merge(GroupedMoments((2, 3)).update(x[cut:], (bins[cut:, None, None], idx[1])))
    for b in range(2):
        for c in range(3):
            cell = x[bins == b][:, c].ravel()
            if len(cell):
                ref = Moments().update(cell).summary()
                _close(g[b, c].summary(), ref)
                _close(h[b, c].summary(), ref)
    for c in range(3):  # collapsing the first axis pools the cells of each channel
        _close(g.collapse(0)[c].summary(), Moments().update(x[:, c].ravel()).summary())
    _close(g.total().summary(), Moments().update(x.ravel()).summary())


def test_grouped_moments_are_picklable_and_reject_bad_input():
    g = GroupedMoments((2, 2)).update(
        np.ones((4, 2)), (np.array([0, 1, 0, 1])[:, None], np.arange(2))
    )
    g2 = pickle.loads(pickle.dumps(g))
    np.testing.assert_array_equal(g2.n, g.n)
    with pytest.raises(ValueError):
        g.update(np.ones(3), ())
    with pytest.raises(ValueError):
        g.merge(GroupedMoments((3,)))


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(3, 120), st.just(3)), elements=finite),
    st.lists(st.integers(0, 200), max_size=4),
)
def test_comoments_split_merge_and_numpy(rows, cuts):
    groups = np.arange(len(rows)) % 2
    one = GroupedCoMoments(2, 3).update(rows, (groups,))
    merged = GroupedCoMoments(2, 3)
    for part in np.split(np.arange(len(rows)), sorted({c % (len(rows) + 1) for c in cuts})):
        merged.merge(GroupedCoMoments(2, 3).update(rows[part], (groups[part],)))
    for g in range(2):
        n, mean, c = one.cell(g)
        n2, mean2, c2 = merged.cell(g)
        sel = rows[groups == g]
        assert n == n2 == len(sel)
        np.testing.assert_allclose(mean, sel.mean(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(mean2, mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(c2, c, rtol=1e-7, atol=1e-6)
        if len(sel) > 1:
            np.testing.assert_allclose(c / (n - 1), np.cov(sel.T), rtol=1e-7, atol=1e-6)
    n, mean, c = one.pooled([0, 1])
    np.testing.assert_allclose(c / (n - 1), np.cov(rows.T), rtol=1e-7, atol=1e-6)


def test_linear_combination_and_correlation():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(5000)
    rows = np.stack([a, 0.6 * a + 0.8 * rng.standard_normal(5000)], 1)
    n, mean, c = GroupedCoMoments((), 2).update(rows).cell(())
    v, se = linear_mean_se(n, mean, c, [1, -1])
    d = rows[:, 0] - rows[:, 1]
    assert v == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(n))
    assert correlation(n, c) == pytest.approx(np.corrcoef(rows.T)[0, 1])


def test_reservoir_bounded_deterministic_and_uniform():
    k, N = 50, 2000
    counts = np.zeros(N)
    for seed in range(400):
        r = Reservoir(k, seed=seed)
        for start in range(0, N, 137):
            r.update(np.arange(start, min(start + 137, N)))
        assert len(r) == k and r.seen == N and len(set(r.sample().tolist())) == k
        counts[r.sample().astype(int)] += 1
    # every item is kept with probability k / N: counts ~ Binomial(400, 0.025) per item
    expected = 400 * k / N
    assert sps.chisquare(counts.reshape(20, -1).sum(1)).pvalue > 1e-4
    assert counts.mean() == pytest.approx(expected)
    a = Reservoir(k, seed=7).update(np.arange(N))
    b = Reservoir(k, seed=7).update(np.arange(N))
    np.testing.assert_array_equal(a.sample(), b.sample())


def test_reservoir_merge_is_a_uniform_sample_of_the_union():
    k, counts = 20, np.zeros(300)
    for seed in range(600):
        a = Reservoir(k, seed=(seed, 0)).update(np.arange(0, 100))  # small stream
        b = Reservoir(k, seed=(seed, 1)).update(np.arange(100, 300))  # twice as long
        m = a.merge(b)
        assert len(m) == k and m.seen == 300
        counts[m.sample().astype(int)] += 1
    first, second = counts[:100].sum(), counts[100:].sum()
    assert first / (first + second) == pytest.approx(1 / 3, abs=0.02)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.lists(st.integers(0, 300), max_size=5), st.integers(1, 40))
def test_reservoir_with_identity_keys_is_split_independent(n, cuts, k):
    items = np.arange(n, dtype=np.float64)
    keys = np.random.default_rng(n).random(n)  # e.g. hashed from each item's identity
    one = Reservoir(k).update(items, keys)
    parts = np.split(np.arange(n), sorted({c % (n + 1) for c in cuts}))
    merged = Reservoir(k)
    for p in parts:
        merged.merge(Reservoir(k, seed=len(p)).update(items[p], keys[p]))
    np.testing.assert_array_equal(merged.sample(), one.sample())
    np.testing.assert_array_equal(one.sample(), items[np.argsort(keys)[:k]])


def test_reservoir_items_and_pickle():
    r = Reservoir(3, seed=1, item_shape=(2, 2)).update(np.arange(40.0).reshape(10, 2, 2))
    assert r.sample().shape == (3, 2, 2)
    r2 = pickle.loads(pickle.dumps(r))
    r.update(np.zeros((5, 2, 2)))
    r2.update(np.zeros((5, 2, 2)))
    np.testing.assert_array_equal(r.sample(), r2.sample())  # the generator state travels too
    with pytest.raises(ValueError):
        r.merge(Reservoir(3))
    assert len(Reservoir(0).update(np.arange(5))) == 0


def test_summary_properties_follow_updates_and_merges():
    g = GroupedMoments(2).update(np.array([1.0, 2.0, 4.0]), (np.array([0, 0, 1]),))
    s = g.summary()
    for name in ("n", "mean", "skew", "excess_kurtosis", "se_mean", "se_var", "se_skew"):
        np.testing.assert_array_equal(getattr(g, name), s[name], err_msg=name)
    np.testing.assert_array_equal(g.se_kurtosis, s["se_kurtosis"])
    g.update(np.array([10.0]), (np.array([1]),))  # a new state: the properties see it
    np.testing.assert_array_equal(g.n, [2, 2])
    np.testing.assert_array_equal(g.mean, [1.5, 7.0])
    g.merge(GroupedMoments(2).update(np.array([0.0]), (np.array([0]),)))
    np.testing.assert_array_equal(g.n, [3, 2])
    assert pickle.loads(pickle.dumps(g))._summary is None  # the cache is not shipped
    m = Moments().update(np.array([1.0, 3.0]))
    assert (m.n, m.mean) == (2, 2.0) and isinstance(m.mean, float)


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 9)), elements=finite),
    st.randoms(use_true_random=False),
)
def test_add_parts_of_rows_equals_update_of_their_values(x, rnd):
    """The scan feeds (record, channel) rows as parts (their row moments): the same cells as
    feeding every value with its cell index."""
    cells = np.array([rnd.randrange(4) for _ in range(len(x))])
    ref = GroupedMoments(4).update(x, (cells[:, None],))
    mu = x.mean(axis=1)
    e = x - mu[:, None]
    got = GroupedMoments(4)
    half = len(x) // 2  # two batches: merged like update's
    for sl in (slice(0, half), slice(half, None)):
        got.add_parts(x.shape[1], mu[sl], *((e[sl] ** k).sum(axis=1) for k in (2, 3, 4)), cells[sl])
    scale = max(1.0, float(np.abs(x).max()))
    for k in ("n", "mean", "m2", "m3", "m4"):
        tol = 1e-9 * scale ** {"n": 0, "mean": 1, "m2": 2, "m3": 3, "m4": 4}[k] * x.size
        np.testing.assert_allclose(got._a[k], ref._a[k], rtol=1e-9, atol=tol, err_msg=k)
    rows = np.stack([x, x * 0.5 + 1.0, -x], axis=-1)  # [m, P, 3]
    cref = GroupedCoMoments(4, 3).update(rows.reshape(-1, 3), (np.repeat(cells, x.shape[1]),))
    rmean = rows.mean(axis=1)
    dev = rows - rmean[:, None, :]
    c = np.einsum("mpi,mpj->mij", dev, dev)
    cgot = GroupedCoMoments(4, 3).add_parts(x.shape[1], rmean, c, cells)
    np.testing.assert_allclose(cgot.n, cref.n)
    np.testing.assert_allclose(cgot.mean_, cref.mean_, rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(cgot.c, cref.c, rtol=1e-9, atol=1e-9 * scale**2 * x.size)
