"""Rounding bounds and finiteness of stored values, with float16 fast paths.

The record-consistency check compares each stored value with its recomputation from the
schedule; its tolerance is half an ulp of every stored operand (their rounding to the stored
dtype) plus a few float32 roundoffs (the writer's arithmetic). These helpers give those bounds
per element, float16 by table look-up (np.spacing is ~10x slower on float16), and the targets'
(velocity, v) errors against those bounds (:func:`target_ratios`).
"""

from __future__ import annotations

import functools

import numpy as np

from pipeline.validate.plan import TARGETS, U32


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


def target_ratios(sl: slice, f: dict, cols: dict, a, sg, x0) -> dict:
    """[r] worst |error| / tolerance of each stored target of the chunk ``sl`` of a scan (``f``:
    its float64 values [r, C, P], ``cols`` the stored ones; ``a``, ``sg``: alpha and sigma
    [r, 1, 1]): ``velocity = eps - x_0`` and ``v = alpha eps - sigma x_0`` from the stored x_0
    when there is one, else from identities without x_0 (exact for every record): ``x_t + alpha
    velocity = (alpha + sigma) eps`` and ``sigma x_t + alpha v = (alpha^2 + sigma^2) eps``.
    Tolerance as for x_t: half an ulp of every stored operand times its coefficient plus float32
    roundoffs of the terms."""
    out, r = {}, sl.stop - sl.start
    xt, ep = f["x_t"], f["epsilon"]
    tx, te = op_tol(cols["x_t"][sl], xt, 4), op_tol(cols["epsilon"][sl], ep, 8)
    t0 = None if x0 is None else op_tol(cols["x_0"][sl], x0, 4)
    for name in (n for n in TARGETS if n in f):
        y, ty = f[name], op_tol(cols[name][sl], f[name], 4)
        if name == "velocity":
            if x0 is not None:
                err, tol = y - (ep - x0), ty + te + t0
            else:
                err = xt + a * y - (a + sg) * ep
                tol = tx + a * ty + (a + sg) * te
        else:  # v
            if x0 is not None:
                err, tol = y - (a * ep - sg * x0), ty + a * te + sg * t0
            else:
                err = sg * xt + a * y - (a * a + sg * sg) * ep
                tol = sg * tx + a * ty + (a * a + sg * sg) * te
        out[name] = (np.abs(err) / tol).reshape(r, -1).max(axis=1)
    return out
