"""The scan's fast paths equal the plain formulas they replace (pipeline.validate.rounding)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.validate.rounding import finite_rows, half_ulp


def test_half_ulp_of_float16_is_the_spacing_formula_for_every_finite_value():
    v = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    v = v[np.isfinite(v)]
    with np.errstate(over="ignore"):
        ref = 0.5 * np.abs(np.spacing(np.abs(v))).astype(np.float64)
    np.testing.assert_array_equal(half_ulp(v[:1400].reshape(100, 2, 7)).ravel(), ref[:1400])
    np.testing.assert_array_equal(half_ulp(v), ref)
    f = np.array([1.0, -3.5, 1e-30], dtype=np.float32)  # other dtypes: np.spacing
    np.testing.assert_array_equal(half_ulp(f), 0.5 * np.abs(np.spacing(np.abs(f))))


def test_finite_rows_from_float16_exponent_bits():
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32):
        x = rng.standard_normal((6, 3, 4, 4)).astype(dtype)
        x[1, 0, 0, 0], x[3, 2, 3, 3], x[4, 1, 2, 0] = np.inf, np.nan, -np.inf
        x[5] = np.finfo(dtype).max  # finite, all exponent bits but one set
        np.testing.assert_array_equal(finite_rows(x), [1, 0, 1, 0, 0, 1])


def test_features_are_named_not_indexed():
    from pipeline.validate.features import REC, Cell

    assert REC.weights(xt_eps=1, sqrt_1mab=-1).tolist() == [0, 0, 1, 0, 0, -1, 0]
    with pytest.raises(KeyError, match="no feature 'x_t'"):
        REC.weights(x_t=1)
    v = {n: np.full(3, float(i)) for i, n in enumerate(REC.names)}
    assert REC.stack(v)[0].tolist() == list(range(len(REC)))
    with pytest.raises(KeyError):
        REC.stack({k: x for k, x in v.items() if k != "ab"})
    rows = np.random.default_rng(0).standard_normal((50, len(REC)))
    cell = Cell(REC, 50.0, rows.mean(axis=0), np.cov(rows.T) * 49)
    assert cell["ab"] == pytest.approx(rows[:, REC.index("ab")].mean())
    value, se = cell.linear(xt_eps=1, sqrt_1mab=-1)
    diff = rows[:, 2] - rows[:, 5]
    assert value == pytest.approx(diff.mean())
    assert se == pytest.approx(diff.std(ddof=1) / np.sqrt(50))
    assert cell.var("sqrt_ab") == pytest.approx(rows[:, 4].var(ddof=1))


def test_scan_columns_come_from_the_record_format():
    from pipeline.output import records
    from pipeline.validate.plan import ScanPlan, scan_columns

    process = {"shape": [3, 4, 4], "schedule": {"num_timesteps": 10}, "store_x0": True,
               "noise": {"draws_per_sample": 1},
               "dtype": "float16", "encoder": {"store_dist": True},
               "conditioning": {"keep": ["cls"],
                                "columns": [{"column": "cls", "type": "int64"}]}}  # fmt: skip
    cols = scan_columns(ScanPlan(process=process, edges=(0, 10)))
    ids = ["key", "index", "draw", "t"]
    assert cols == [*ids, *records.TENSOR_COLUMNS, *records.SCALAR_COLUMNS, "x_0", "cls"]
    assert "x_0" not in scan_columns(ScanPlan({**process, "store_x0": False}, (0, 10)))
