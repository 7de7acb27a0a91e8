"""Rounding bounds and finiteness of stored values, with float16 fast paths.

The record-consistency check compares each stored value with its recomputation from the
schedule; its tolerance is half an ulp of every stored operand (their rounding to the stored
dtype) plus a few float32 roundoffs (the writer's arithmetic). These helpers give those bounds
per element, float16 by table look-up (np.spacing is ~10x slower on float16).
"""

from __future__ import annotations

import functools

import numpy as np

from .plan import U32


def _half_ulp(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return 0.5 * np.abs(np.spacing(np.abs(v))).astype(np.float64)


@functools.cache
def _half_ulp16() -> np.ndarray:
    """:func:`half_ulp` of every float16 bit pattern (65536 float64, 512 KiB)."""
    return _half_ulp(np.arange(1 << 16, dtype=np.uint16).view(np.float16))


def half_ulp(v: np.ndarray) -> np.ndarray:
    """Half the spacing of the stored values (their dtype) at v: the round-to-nearest bound.
    float16: one look-up per value in a table built by the same formula, so the values are the
    same."""
    if v.dtype == np.float16:
        return _half_ulp16()[v.view(np.uint16)]
    return _half_ulp(v)


def finite_rows(v: np.ndarray) -> np.ndarray:
    """[n, ...] -> [n] bool: every value of the row finite. float16: from the exponent bits
    (all ones = inf or NaN), 5x faster than np.isfinite on float16."""
    n = len(v)
    if v.dtype == np.float16:
        bits = np.bitwise_and(v.reshape(n, -1).view(np.uint16), 0x7C00)
        return bits.max(axis=1, initial=0) < 0x7C00
    return np.isfinite(v.reshape(n, -1)).all(axis=1)


def op_tol(v: np.ndarray, f: np.ndarray, k: float) -> np.ndarray:
    """Half an ulp of the stored operand v plus k float32 roundoffs of its value f (float64)."""
    h = half_ulp(v).reshape(f.shape)
    h += (k * U32) * np.abs(f)
    return h
