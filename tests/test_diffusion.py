"""Forward process q(x_t | x_0), its posterior and inverse, against float64 NumPy formulas and
Monte-Carlo moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.noising.diffusion import (
    compute_dtype,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    snr,
)
from pipeline.noising.schedule import SCHEDULES, make_schedule

T = 1000
ALL = [(name, zts) for name in SCHEDULES for zts in (False, True)]
IDS = [f"{n}{'-zts' if z else ''}" for n, z in ALL]


@pytest.fixture(scope="module")
def schedules():
    return {(n, z): make_schedule(n, T, zero_terminal_snr=z) for n, z in ALL}


def batch(seed: int, B: int = 64, shape=(3, 4, 4), dtype=torch.float64):
    """x0 in [-1, 1] (image-like), noise ~ N(0, 1), t uniform in [0, T) plus both ends."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((B, *shape), generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn((B, *shape), generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (B,), generator=g)
    t[0], t[1] = 0, T - 1
    return x0.to(dtype), noise.to(dtype), t


def col(table: np.ndarray, t: torch.Tensor, ndim: int) -> np.ndarray:
    """table[t] as a float64 column [B, 1, ..., 1]."""
    return np.asarray(table)[t.numpy()].reshape((-1,) + (1,) * (ndim - 1))


def np_q_sample(s, x0: np.ndarray, t: torch.Tensor, noise: np.ndarray) -> np.ndarray:
    ab = col(s.alphas_cumprod, t, x0.ndim)
    return np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * noise


# --------------------------------------------------------------------------------------------
# q_sample
# --------------------------------------------------------------------------------------------


def test_compute_dtype():
    assert compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert compute_dtype(torch.zeros(1, dtype=dt)) == torch.float32


@pytest.mark.parametrize(("name", "zts"), ALL, ids=IDS)
def test_q_sample_float64_formula(schedules, name, zts):
    s = schedules[(name, zts)]
    x0, noise, t = batch(1)
    x_t = q_sample(s, x0, t, noise)
    assert x_t.dtype == torch.float64 and x_t.shape == x0.shape
    ref = np_q_sample(s, x0.numpy(), t, noise.numpy())
    np.testing.assert_allclose(x_t.numpy(), ref, rtol=1e-15, atol=1e-15)
    if zts:  # the last step is pure noise
        np.testing.assert_array_equal(x_t[1].numpy(), noise[1].numpy())


@pytest.mark.parametrize(("name", "zts"), ALL, ids=IDS)
def test_q_sample_float32_formula(schedules, name, zts):
    s = schedules[(name, zts)]
    x0, noise, t = batch(2, dtype=torch.float32)
    x_t = q_sample(s, x0, t, noise)
    assert x_t.dtype == torch.float32
    ref = np_q_sample(s, x0.double().numpy(), t, noise.double().numpy())
    ab = col(s.alphas_cumprod, t, x0.ndim)
    scale = np.sqrt(ab) * np.abs(x0.double().numpy()) + np.sqrt(1 - ab) * np.abs(noise.numpy())
    assert np.all(np.abs(x_t.double().numpy() - ref) <= 4 * np.finfo(np.float32).eps * scale)


def test_q_sample_float64_coefficients_not_rounded_to_float32(schedules):
    s = schedules[("linear", False)]
    x0 = torch.ones(2, 1, dtype=torch.float64)
    t = torch.tensor([0, 500])
    x_t = q_sample(s, x0, t, torch.zeros_like(x0))
    assert x_t[:, 0].tolist() == [math.sqrt(s.alphas_cumprod[0]), math.sqrt(s.alphas_cumprod[500])]
    assert x_t[0, 0].item() != float(np.float32(math.sqrt(s.alphas_cumprod[0])))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_q_sample_half_precision_keeps_noise_at_t0(schedules, dtype):
    # linear, t = 0: alpha_bar = 0.9999, which rounds to 1.0 in fp16 and bf16. Were the
    # coefficients taken in half precision, x_t would be x0 and the noise would be gone.
    s = schedules[("linear", False)]
    assert torch.tensor(s.alphas_cumprod[0], dtype=dtype).item() == 1.0  # the trap is real
    x0, noise, _ = batch(3, B=256, shape=(64,), dtype=dtype)
    t = torch.zeros(256, dtype=torch.long)
    x_t = q_sample(s, x0, t, noise)
    assert x_t.dtype == dtype

    # (x_t - x0) is the noise term: 0.01 * noise - 5e-5 * x0, plus rounding of x_t
    diff = (x_t.double() - x0.double()).flatten().numpy()
    r = np.corrcoef(diff, noise.double().flatten().numpy())[0, 1]
    assert r > (0.99 if dtype == torch.float16 else 0.95)
    np.testing.assert_allclose(diff.std(), math.sqrt(1 - s.alphas_cumprod[0]), rtol=0.1)

    # It is the float32 computation, rounded once to the output dtype ...
    a = torch.tensor(math.sqrt(s.alphas_cumprod[0]), dtype=torch.float32)
    b = torch.tensor(math.sqrt(1 - s.alphas_cumprod[0]), dtype=torch.float32)
    torch.testing.assert_close(x_t, (a * x0.float() + b * noise.float()).to(dtype), rtol=0, atol=0)
    # ... so within one output ulp of the exact float64 value.
    ref = np_q_sample(s, x0.double().numpy(), t, noise.double().numpy())
    fi = torch.finfo(dtype)
    assert np.all(np.abs(x_t.double().numpy() - ref) <= fi.eps * np.abs(ref) + fi.tiny)


def test_q_sample_out_dtype(schedules):
    s = schedules[("cosine", False)]
    x0, noise, t = batch(4, dtype=torch.float16)
    full = q_sample(s, x0, t, noise, out_dtype=torch.float32)
    assert full.dtype == torch.float32
    assert q_sample(s, x0, t, noise).dtype == torch.float16
    torch.testing.assert_close(q_sample(s, x0, t, noise), full.half(), rtol=0, atol=0)
    # float32 output of half inputs is not rounded to half
    assert not torch.equal(full, full.half().float())
    x64 = q_sample(s, x0.double(), t, noise.double(), out_dtype=torch.bfloat16)
    assert x64.dtype == torch.bfloat16
    # mixed input dtypes: noise is cast to x0's compute dtype
    mixed = q_sample(s, x0.float(), t, noise.double())
    assert mixed.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# q_posterior
# --------------------------------------------------------------------------------------------


def bayes_posterior_np(s, x0: np.ndarray, x_t: np.ndarray, t: torch.Tensor):
    """Product of Gaussians for t >= 1: prior N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) times the
    likelihood N(x_t; sqrt(a_t) x_{t-1}, beta_t), by precision weighting."""
    ab = np.cumprod(1.0 - s.betas)
    ti = t.numpy()
    ab_prev = ab[ti - 1].reshape(-1, *([1] * (x0.ndim - 1)))
    b = col(s.betas, t, x0.ndim)
    a = 1.0 - b
    prec_prior, prec_lik = 1.0 / (1.0 - ab_prev), a / b
    var = 1.0 / (prec_prior + prec_lik)
    mean = var * (prec_prior * np.sqrt(ab_prev) * x0 + np.sqrt(a) / b * x_t)
    return mean, var


@pytest.mark.parametrize(("name", "zts"), ALL, ids=IDS)
def test_q_posterior_closed_form_and_bayes(schedules, name, zts):
    s = schedules[(name, zts)]
    x0, noise, t = batch(5)
    t[0] = 1  # t = 0 is a point mass; tested separately
    x_t = q_sample(s, x0, t, noise)
    mean, var, log_var = q_posterior(s, x0, x_t, t)
    B = x0.shape[0]
    assert mean.shape == x0.shape and var.shape == (B, 1, 1, 1) and log_var.shape == (B, 1, 1, 1)
    assert mean.dtype == var.dtype == log_var.dtype == torch.float64
    c1, c2 = col(s.posterior_mean_coef1, t, 4), col(s.posterior_mean_coef2, t, 4)
    np.testing.assert_allclose(mean.numpy(), c1 * x0.numpy() + c2 * x_t.numpy(), rtol=1e-15)
    np.testing.assert_array_equal(var.numpy(), col(s.posterior_variance, t, 4))
    np.testing.assert_array_equal(log_var.numpy(), col(s.posterior_log_variance_clipped, t, 4))
    np.testing.assert_allclose(np.exp(log_var.numpy()), var.numpy(), rtol=1e-12)  # t >= 1
    bmean, bvar = bayes_posterior_np(s, x0.numpy(), x_t.numpy(), t)
    np.testing.assert_allclose(mean.numpy(), bmean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), bvar, rtol=1e-9, atol=0)
    # broadcastable: a posterior sample has x0's shape
    assert (mean + var.sqrt() * torch.randn_like(mean)).shape == x0.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize(("name", "zts"), ALL, ids=IDS)
def test_q_posterior_t0_is_point_mass(schedules, name, zts, dtype):
    s = schedules[(name, zts)]
    x0, noise, _ = batch(6, dtype=dtype)
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    x_t = q_sample(s, x0, t, noise)
    mean, var, log_var = q_posterior(s, x0, x_t, t)
    assert mean.dtype == dtype
    torch.testing.assert_close(mean, x0, rtol=0, atol=0)
    assert torch.all(var == 0)
    assert torch.all(torch.isfinite(log_var))
    expected = torch.tensor(s.posterior_log_variance_clipped[0]).to(dtype)
    assert torch.all(log_var == expected)


def test_q_posterior_log_var_at_t0(schedules):
    s = schedules[("cosine", False)]
    x0, noise, _ = batch(7, B=2)
    t = torch.tensor([0, 1])
    _, var, log_var = q_posterior(s, x0, q_sample(s, x0, t, noise), t)
    assert var[0].item() == 0.0
    assert log_var[0].item() == log_var[1].item() == math.log(s.posterior_variance[1])


def test_q_posterior_out_dtype(schedules):
    s = schedules[("sigmoid", False)]
    x0, noise, t = batch(8, dtype=torch.bfloat16)
    x_t = q_sample(s, x0, t, noise)
    out = q_posterior(s, x0, x_t, t)
    assert all(o.dtype == torch.bfloat16 for o in out)
    out32 = q_posterior(s, x0, x_t, t, out_dtype=torch.float32)
    assert all(o.dtype == torch.float32 for o in out32)
    # var in float32 is the float64 table rounded once, not via bfloat16
    np.testing.assert_array_equal(
        out32[1].numpy(), col(s.posterior_variance, t, 4).astype(np.float32)
    )


# --------------------------------------------------------------------------------------------
# predict_x0_from_eps, snr
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "zts"), ALL, ids=IDS)
def test_predict_x0_inverts_q_sample(schedules, name, zts):
    s = schedules[(name, zts)]
    x0, noise, _ = batch(9, B=T, shape=(8,))
    t = torch.arange(T)
    if zts:  # ab = 0 at t = T-1: x_t carries no x_0 and the inverse is undefined
        t = t[: T - 1]
        x0, noise = x0[: T - 1], noise[: T - 1]
    x_t = q_sample(s, x0, t, noise)
    back = predict_x0_from_eps(s, x_t, t, noise)
    assert back.dtype == torch.float64
    # Rounding error, in units of eps64: the table products carry ~eps relative error, amplified
    # by 1/sqrt(ab_t) where little of x_0 is left; and sqrt(1/ab - 1) loses eps/(1 - ab) to
    # cancellation where ab ~ 1. Measured worst case 1.6 of this bound; allow 4.
    amp = col(s.sqrt_recip_alphas_cumprod, t, 2)
    one_minus_ab = 1.0 - col(s.alphas_cumprod, t, 2)
    n_abs = np.abs(noise.numpy())
    bound = 4 * np.finfo(np.float64).eps * (amp * (1 + n_abs) + n_abs / np.sqrt(one_minus_ab))
    assert bound.max() < 1e-9  # still a tight check
    assert np.all(np.abs(back.numpy() - x0.numpy()) <= bound)


def test_predict_x0_undefined_at_zero_terminal_snr(schedules):
    s = schedules[("cosine", True)]
    x_t = torch.randn(2, 3, dtype=torch.float64)
    out = predict_x0_from_eps(s, x_t, torch.tensor([T - 1, T - 1]), torch.randn_like(x_t))
    assert not torch.any(torch.isfinite(out))


def test_predict_x0_float32_and_out_dtype(schedules):
    s = schedules[("linear", False)]
    x0, noise, t = batch(10, dtype=torch.float32)
    t[:] = torch.arange(0, 640, 10)  # ab >= 0.04: error amplification <= 5
    back = predict_x0_from_eps(s, q_sample(s, x0, t, noise), t, noise)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-5)
    half = predict_x0_from_eps(s, q_sample(s, x0, t, noise), t, noise, out_dtype=torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parametrize(("name", "zts"), ALL, ids=IDS)
def test_snr_equals_table(schedules, name, zts):
    s = schedules[(name, zts)]
    t = torch.tensor([0, 1, 17, 500, T - 2, T - 1])
    out = snr(s, t)
    assert out.dtype == torch.float64 and out.shape == (6,)
    np.testing.assert_array_equal(out.numpy(), s.snr[t.numpy()])
    np.testing.assert_array_equal(snr(s, [3, 4]).numpy(), s.snr[[3, 4]])  # list input
    ab = s.alphas_cumprod[t.numpy()]
    np.testing.assert_allclose(out.numpy(), ab / (1 - ab), rtol=1e-15)


# --------------------------------------------------------------------------------------------
# Moments of q(x_t | x_0), Monte Carlo
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("var0", [0.25, 1.0])
@pytest.mark.parametrize(
    ("name", "t"), [("linear", 0), ("linear", 300), ("cosine", 500), ("cosine", 999)]
)
def test_forward_moments_monte_carlo(schedules, name, t, var0):
    """Var(x_t) = ab Var(x0) + 1 - ab; Cov(x_t, x0) / Var(x0) = sqrt(ab); E[x_t] = 0."""
    s = schedules[(name, False)]
    ab = float(s.alphas_cumprod[t])
    rng = np.random.default_rng(1234 + t)
    B, D = 400, 1000  # n = 400_000
    x0 = torch.from_numpy(rng.normal(0.0, math.sqrt(var0), (B, D)))
    noise = torch.from_numpy(rng.standard_normal((B, D)))
    x_t = q_sample(s, x0, torch.full((B,), t), noise).numpy().ravel()
    x0n = x0.numpy().ravel()
    n = x_t.size
    var_t = ab * var0 + 1.0 - ab
    # x_t is Gaussian: SE of the mean sqrt(var/n), of the sample variance var * sqrt(2/(n-1))
    assert abs(x_t.mean()) < 5 * math.sqrt(var_t / n)
    assert abs(x_t.var(ddof=1) - var_t) < 5 * var_t * math.sqrt(2.0 / (n - 1))
    # regression of x_t on x0: slope sqrt(ab), residual variance 1 - ab
    slope = np.dot(x0n - x0n.mean(), x_t - x_t.mean()) / np.dot(x0n - x0n.mean(), x0n - x0n.mean())
    assert abs(slope - math.sqrt(ab)) < 5 * math.sqrt((1.0 - ab) / (n * var0))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, T, T + 5])
def test_t_out_of_range(schedules, bad):
    s = schedules[("linear", False)]
    x0, noise, t = batch(11, B=4)
    t[2] = bad
    calls = [
        lambda: q_sample(s, x0, t, noise),
        lambda: q_posterior(s, x0, x0, t),
        lambda: predict_x0_from_eps(s, x0, t, noise),
        lambda: snr(s, t),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"0-based") as e:
            call()
        assert f"[0, {T})" in str(e.value)


def test_shape_mismatch(schedules):
    s = schedules[("linear", False)]
    x0, noise, t = batch(12, B=4)
    with pytest.raises(ValueError, match=r"noise shape .* != x0 shape"):
        q_sample(s, x0, t, noise[:, :2])
    with pytest.raises(ValueError, match=r"x_t shape .* != x0 shape"):
        q_posterior(s, x0, x0[:, :, :2], t)
    # [1, ...] eps would broadcast silently against [B, ...] x_t; it must not
    with pytest.raises(ValueError, match=r"eps shape .* != x_t shape"):
        predict_x0_from_eps(s, x0, t, noise[:1])


@pytest.mark.parametrize(
    "bad_t",
    [
        torch.zeros(5, dtype=torch.long),  # B + 1
        torch.zeros(3, dtype=torch.long),  # B - 1
        torch.zeros(4, 1, dtype=torch.long),  # not 1-D
        torch.tensor(0),  # scalar
    ],
    ids=["long", "short", "2d", "scalar"],
)
def test_t_wrong_shape(schedules, bad_t):
    s = schedules[("linear", False)]
    x0, noise, _ = batch(13, B=4)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
        q_sample(s, x0, bad_t, noise)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
        q_posterior(s, x0, x0, bad_t)


@pytest.mark.parametrize(
    "bad_t",
    [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([True, False, False, False])],
    ids=["float", "bool"],
)
def test_t_not_integer(schedules, bad_t):
    # a bool t of length B = T would otherwise index the table as a mask
    s = schedules[("linear", False)]
    x0, noise, _ = batch(14, B=4)
    with pytest.raises(ValueError, match=r"t must hold integer timesteps"):
        q_sample(s, x0, bad_t, noise)


def test_t_integer_kinds_and_empty_batch(schedules):
    s = schedules[("linear", False)]
    x0, noise, _ = batch(15, B=3)
    ref = q_sample(s, x0, torch.tensor([0, 5, 999]), noise)
    for t in (
        torch.tensor([0, 5, 999], dtype=torch.int32),
        np.array([0, 5, 999], dtype=np.uint16),
        [0, 5, 999],
    ):
        torch.testing.assert_close(q_sample(s, x0, t, noise), ref, rtol=0, atol=0)
    empty = q_sample(s, x0[:0], torch.zeros(0, dtype=torch.long), noise[:0])
    assert empty.shape == (0, 3, 4, 4)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_cuda_matches_cpu(schedules, dtype):
    s = schedules[("cosine", True)]
    x0, noise, t = batch(16, dtype=dtype)
    dev = torch.device("cuda")
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    cpu = q_sample(s, x0, t, noise)
    gpu = q_sample(s, x0.to(dev), t.to(dev), noise.to(dev))
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)
    t[0] = 1
    for a, b in zip(q_posterior(s, x0, cpu, t), q_posterior(s, x0.to(dev), gpu, t.to(dev))):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, **tol)
    keep = t < T - 1
    a = predict_x0_from_eps(s, cpu[keep], t[keep], noise[keep])
    b = predict_x0_from_eps(s, gpu[keep.to(dev)], t[keep].to(dev), noise[keep].to(dev))
    torch.testing.assert_close(b.cpu(), a, **tol)
    g = snr(s, t.to(dev))
    assert g.device.type == "cuda" and g.dtype == torch.float64
    torch.testing.assert_close(g.cpu(), snr(s, t), rtol=0, atol=0)
