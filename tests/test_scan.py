"""The scan's fast paths equal the plain formulas they replace (pipeline.scan)."""

from __future__ import annotations

import numpy as np

from pipeline.scan import _finite_rows, half_ulp


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
        np.testing.assert_array_equal(_finite_rows(x), [1, 0, 1, 0, 0, 1])
