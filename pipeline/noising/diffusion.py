"""The Gaussian forward process and its posterior, as pure, batch-first torch functions.

``process`` is a :class:`pipeline.noising.process.GaussianProcess` (DDPM or rectified flow, x_t =
alpha_t x_0 + sigma_t eps) or a DDPM :class:`pipeline.noising.schedule.NoiseSchedule`.

Shapes: ``x0``, ``x_t`` and ``noise`` are ``[B, ...]`` (e.g. ``[B, C, H, W]``); ``t`` is an
integer tensor ``[B]`` of 0-based timesteps in ``[0, T)``. Per-timestep coefficients are gathered
from the schedule's float64 tables and applied in ``compute_dtype(x)``: float64 for float64
inputs, float32 otherwise, so float16/bfloat16 samples never round ``alpha_bar`` to 1 and drop
the noise. Results are cast to ``out_dtype`` (default: the dtype of the first tensor argument)
last. Nothing is cached: every function depends only on its arguments.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.noising.process import GaussianProcess, resolve
from pipeline.noising.schedule import NoiseSchedule

Process = GaussianProcess | NoiseSchedule


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every narrower floating dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather(table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] reshaped to [B, 1, ..., 1] so it broadcasts against ``like`` ([B, ...])."""
    t_np = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)
    if t_np.ndim != 1 or t_np.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape [B] = [{like.shape[0]}], got {tuple(t_np.shape)}")
    if t_np.dtype.kind not in "iu":  # a bool t would index as a mask, a float t not at all
        raise ValueError(f"t must hold integer timesteps, got dtype {t_np.dtype}")
    if t_np.size and (t_np.min() < 0 or t_np.max() >= len(table)):
        raise ValueError(
            f"t must lie in [0, {len(table)}) (0-based timesteps), got range "
            f"[{t_np.min()}, {t_np.max()}]"
        )
    values = torch.from_numpy(np.ascontiguousarray(table[t_np]))
    values = values.to(device=like.device, dtype=compute_dtype(like))
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _process(p: Process, like: torch.Tensor) -> GaussianProcess:
    return resolve(p, tuple(like.shape[1:]))


def q_sample(
    schedule: Process,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample q(x_t | x_0): x_t = alpha_t x_0 + sigma_t noise (DDPM, Ho et al. eq. 4:
    alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t); rectified flow: alpha_t = 1 - sigma_t).

    x0, noise: [B, ...]; t: [B] grid indices. Returns [B, ...] in ``out_dtype`` (default
    x0.dtype).
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    p = _process(schedule, x0)
    dt = compute_dtype(x0)
    a = _gather(p.alpha, t, x0)
    s = _gather(p.sigma, t, x0)
    x_t = a * x0.to(dt) + s * noise.to(device=x0.device, dtype=dt)
    return x_t.to(out_dtype or x0.dtype)


def q_posterior(
    schedule: Process,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7;
    for any process the general form of :mod:`pipeline.noising.process`, for its previous grid
    point).

    mean = c1_t x_0 + c2_t x_t, [B, ...]; variance = beta~_t and log_variance =
    posterior_log_variance_clipped[t], both [B, 1, ..., 1] (broadcastable against x0), in
    ``out_dtype`` (default x0.dtype). At t = 0 the variance is 0 and the mean is x_0.
    """
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t shape {tuple(x_t.shape)} != x0 shape {tuple(x0.shape)}")
    p = _process(schedule, x0)
    dt = compute_dtype(x0)
    out = out_dtype or x0.dtype
    c1 = _gather(p.posterior_mean_coef1, t, x0)
    c2 = _gather(p.posterior_mean_coef2, t, x0)
    mean = c1 * x0.to(dt) + c2 * x_t.to(device=x0.device, dtype=dt)
    var = _gather(p.posterior_variance, t, x0)
    log_var = _gather(p.posterior_log_variance_clipped, t, x0)
    return mean.to(out), var.to(out), log_var.to(out)


def velocity(
    x0: torch.Tensor, noise: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The rectified-flow target d x_t / d sigma = eps - x_0 (SD3, Flux). [B, ...] -> [B, ...],
    computed in ``compute_dtype(x0)``, returned in ``out_dtype`` (default x0.dtype)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    dt = compute_dtype(x0)
    return (noise.to(device=x0.device, dtype=dt) - x0.to(dt)).to(out_dtype or x0.dtype)


def v_target(
    schedule: Process,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The v-prediction target v = alpha_t eps - sigma_t x_0 (Salimans and Ho 2022; diffusers'
    ``get_velocity``). x0, noise: [B, ...]; t: [B]. Returns [B, ...] in ``out_dtype``."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    p = _process(schedule, x0)
    dt = compute_dtype(x0)
    a, s = _gather(p.alpha, t, x0), _gather(p.sigma, t, x0)
    v = a * noise.to(device=x0.device, dtype=dt) - s * x0.to(dt)
    return v.to(out_dtype or x0.dtype)


def predict_x0_from_eps(
    schedule: Process,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Invert q_sample: x_0 = (x_t - sigma_t eps) / alpha_t; for a DDPM schedule with its
    tables sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps. [B, ...] -> [B, ...].

    Undefined (infinite) where alpha_t = 0: the last step of a zero-terminal-SNR schedule, and
    flow's sigma = 1.
    """
    if eps.shape != x_t.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} != x_t shape {tuple(x_t.shape)}")
    dt = compute_dtype(x_t)
    if isinstance(schedule, NoiseSchedule):
        r = _gather(schedule.sqrt_recip_alphas_cumprod, t, x_t)
        rm1 = _gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t)
    else:
        with np.errstate(divide="ignore"):
            r = _gather(1.0 / schedule.alpha, t, x_t)
            rm1 = _gather(schedule.sigma / schedule.alpha, t, x_t)
    x0 = r * x_t.to(dt) - rm1 * eps.to(device=x_t.device, dtype=dt)
    return x0.to(out_dtype or x_t.dtype)


def snr(schedule: Process, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_t^2 / sigma_t^2 (DDPM: ab_t / (1 - ab_t)) as a float64 tensor [B] on t's
    device."""
    t = torch.as_tensor(t)
    return _gather(schedule.snr, t, torch.empty(t.shape[0], dtype=torch.float64, device=t.device))
