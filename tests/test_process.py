"""The general Gaussian process: DDPM tables reproduced, flow grid and shifts against diffusers,
the general posterior against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.noising import process
from pipeline.noising.schedule import SCHEDULES, make_schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("zts", [False, True])
def test_general_posterior_equals_ddpm_tables(name, zts):
    sched = make_schedule(name, 1000, zero_terminal_snr=zts)
    p = process.ddpm(sched)
    g = process.general_posterior(p.alpha, p.sigma)
    last = -1 if zts else None  # ab_T = 0: x_0's coefficient is 0 in both, var is beta
    np.testing.assert_allclose(g["coef_x0"][:last], sched.posterior_mean_coef1[:last], rtol=1e-9)
    np.testing.assert_allclose(g["coef_xt"], sched.posterior_mean_coef2, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(g["variance"], sched.posterior_variance, rtol=1e-9)
    np.testing.assert_allclose(
        g["log_variance_clipped"], sched.posterior_log_variance_clipped, rtol=1e-9, atol=1e-12
    )
    # the DDPM process keeps the schedule's own tables, bit for bit
    assert p.posterior_variance.tobytes() == sched.posterior_variance.tobytes()
    assert p.alpha.tobytes() == sched.sqrt_alphas_cumprod.tobytes()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid_matches_diffusers(shift):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    p = process.flow(1000, shift=shift)
    ref = sch.sigmas.numpy()[::-1]  # diffusers runs high -> low noise
    np.testing.assert_allclose(p.sigma, ref, rtol=2e-7, atol=0)
    np.testing.assert_allclose(p.timesteps, sch.timesteps.numpy()[::-1], rtol=2e-7)
    assert p.sigma[-1] == 1.0 and p.alpha[-1] == 0.0
    assert np.all(np.diff(p.sigma) > 0)


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (128, 96)])
def test_dynamic_shift_matches_diffusers_arithmetic(hw):
    pytest.importorskip("diffusers")
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    n = (hw[0] // 2) * (hw[1] // 2)
    mu = calculate_shift(n, 256, 4096, 0.5, 1.15)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    s = torch.arange(1, 1001, dtype=torch.float64) / 1000
    ref = sch.time_shift(mu, 1.0, s).numpy()
    p = process.flow(1000, (16, *hw), dynamic_shift=True)
    assert p.grid["seq_len"] == n and "seq_len" not in p.description  # per shape, not per dataset
    assert math.isclose(p.grid["mu"], mu, rel_tol=1e-12)
    np.testing.assert_allclose(p.sigma, ref, rtol=1e-12)
    # dynamic shift is a static shift exp(mu)
    np.testing.assert_allclose(p.sigma, process.flow(1000, shift=math.exp(mu)).sigma, rtol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_posterior_against_independent_float64(shift):
    p = process.flow(50, shift=shift)
    for i in range(1, 50):
        st, ss = p.sigma[i], p.sigma[i - 1]
        at, as_ = 1 - st, 1 - ss
        # q(x_s | x_t, x_0) by conditioning the joint Gaussian (x_s, x_t) given x_0
        cov_st = (at / as_) * ss**2  # Cov(x_s, x_t | x_0) = alpha_{t|s} sigma_s^2
        k = cov_st / st**2
        assert math.isclose(p.posterior_mean_coef2[i], k, rel_tol=1e-10)
        assert math.isclose(p.posterior_mean_coef1[i], as_ - k * at, rel_tol=1e-9, abs_tol=1e-14)
        assert math.isclose(p.posterior_variance[i], ss**2 - k * cov_st, rel_tol=1e-8)
    assert p.posterior_variance[0] == 0 and p.posterior_mean_coef1[0] == 1.0
    assert p.posterior_log_variance_clipped[0] == math.log(p.posterior_variance[1])
    np.testing.assert_allclose(p.snr, (1 - p.sigma) ** 2 / p.sigma**2)


def test_description_rebuilds_the_process():
    p = process.flow(100, (4, 16, 16), dynamic_shift=True, patch_size=2)
    q = process.from_description(p.description, (4, 16, 16), p.grid)
    assert q.sigma.tobytes() == p.sigma.tobytes()
    with pytest.raises(ValueError, match="sigmas hash"):  # the file's grid is of another shape
        process.from_description(p.description, (4, 32, 32), p.grid)
    # one description, a grid per shape (aspect-ratio buckets): Processes builds each once
    procs = process.Processes(p.description)
    assert procs((4, 16, 16)) is procs((4, 16, 16))
    assert procs((4, 32, 16)).grid["seq_len"] == 128 and procs.shape_dependent
    meta = procs.file_metadata({"schedule": p.description, "shape": [4, 32, 16]}, (4, 32, 16))
    assert process.from_metadata(meta).sigma.tobytes() == procs((4, 32, 16)).sigma.tobytes()
    with pytest.raises(ValueError, match="patch_size=2 does not divide"):
        process.flow(100, (4, 15, 16), dynamic_shift=True)
    static = process.flow(100, shift=3.0)
    assert static.description["sigmas_sha256"] == static.grid["sigmas_sha256"]
    one = process.Processes(static.description)
    assert one((4, 8, 8)) is one((4, 16, 32)) and not one.shape_dependent
    d = process.ddpm(make_schedule("cosine", 100))
    assert process.from_description(d.description).alpha.tobytes() == d.alpha.tobytes()


def test_bad_flow_config():
    with pytest.raises(ValueError, match="shift must be > 0"):
        process.flow(10, shift=0.0)
    with pytest.raises(ValueError, match="unknown flow schedule keys"):
        process.flow(10, shfit=2.0)


def _keyed_flow_indices(sampler: str, n: int = 20000, **kw):
    from pipeline.noising.noise import KeyedNoise

    noise = KeyedNoise(11, 1000, sampler=sampler, family="flow", **kw)
    keys = [f"k{i:06d}" for i in range(n)]
    return noise.timesteps(noise.digests("s", keys), "s", range(n))


def test_keyed_logit_normal_sigma_matches_diffusers_density():
    """Chi-square of the keyed sigma histogram against the exact probability of each bin under
    diffusers' logit-normal (u = sigmoid(N(0, 1)), sigma = sigmas_desc[floor(u T)]), and a
    two-sample KS test against diffusers' own sampler."""
    from scipy import special, stats

    pytest.importorskip("diffusers")
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    idx = _keyed_flow_indices("logit_normal")
    sig = process.flow(1000, shift=3.0).sigma
    j = 999 - idx  # diffusers' index into its high -> low sigmas
    edges = np.linspace(0, 1000, 41)  # 40 bins of j
    cdf = stats.norm.cdf(special.logit(edges / 1000))  # P(u < j / T), logit(0) = -inf
    expected = np.diff(cdf) * len(j)
    observed = np.histogram(j, edges)[0]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    gen = torch.Generator().manual_seed(0)
    u = compute_density_for_timestep_sampling("logit_normal", 20000, 0.0, 1.0, generator=gen)
    ref = sig[::-1][(u.numpy() * 1000).astype(np.int64)]
    assert stats.ks_2samp(sig[idx], ref).pvalue > 1e-3
    uniform = sig[_keyed_flow_indices("uniform")]
    assert stats.ks_2samp(uniform, ref).pvalue < 1e-6  # the test can fail


def test_keyed_mode_density_matches_diffusers():
    from scipy import stats

    pytest.importorskip("diffusers")
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    idx = _keyed_flow_indices("mode", mode_scale=1.29)
    gen = torch.Generator().manual_seed(1)
    u = compute_density_for_timestep_sampling("mode", 20000, mode_scale=1.29, generator=gen)
    ref = 999 - np.clip((u.numpy().astype(np.float64) * 1000).astype(np.int64), 0, 999)
    assert stats.ks_2samp(idx, ref).pvalue > 1e-3


def test_ddpm_refuses_flow_densities_and_keeps_its_streams():
    from pipeline.noising.noise import KeyedNoise

    with pytest.raises(ValueError, match="schedule=flow"):
        KeyedNoise(0, 1000, sampler="logit_normal")
    a = KeyedNoise(3, 1000, sampler="uniform", family="flow")
    b = KeyedNoise(3, 1000, sampler="uniform")
    d = a.digests("s", ["a", "b", "c"])
    assert (a.timesteps(d, "s", [0, 1, 2]) == 999 - b.timesteps(d, "s", [0, 1, 2])).all()
    assert "family" not in b.describe() and "logit_mean" not in b.describe()
