"""Noise schedules: independent reference formulas, literal figures, conventions, invariants,
errors and the report CLI.

The references below are deliberately written in plain-Python float64 loops (``math`` only),
straight from the papers, so they share no code path with ``pipeline.noising.schedule``.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.noising import schedule as sched_mod
from pipeline.noising.schedule import SCHEDULES, make_schedule

TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "snr",
)


# --------------------------------------------------------------------------------------------
# Independent references (plain Python floats)
# --------------------------------------------------------------------------------------------


def ref_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> list[float]:
    """Ho et al. 2020 (1e-4 .. 0.02 over 1000 steps), rescaled by 1000/T (improved-diffusion)."""
    lo, hi = beta_start * 1000.0 / T, beta_end * 1000.0 / T
    if T == 1:
        return [lo]
    return [lo + (hi - lo) * i / (T - 1) for i in range(T)]


def ref_scaled_linear(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> list[float]:
    """Stable Diffusion: linear in sqrt(beta)."""
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    if T == 1:
        return [lo * lo]
    return [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]


def ref_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> list[float]:
    """Nichol & Dhariwal 2021, eq. 17: ab(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
    beta_t = min(1 - ab(t)/ab(t-1), 0.999)."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    return [min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]


def ref_sigmoid(
    T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-9
) -> list[float]:
    """Jabri et al. 2022 / Chen 2023 ("On the importance of noise scheduling", Algorithm 1):
    ab(u) = clip((v_end - sigmoid((u (end - start) + start) / tau)) / (v_end - v_start), 1e-9, 1),
    betas = clip(1 - ab(u_{i+1}) / ab(u_i), 0, 0.999)."""

    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def ab(u: float) -> float:
        out = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
        return min(max(out, clip_min), 1.0)

    return [min(max(1.0 - ab((i + 1) / T) / ab(i / T), 0.0), 0.999) for i in range(T)]


REFS = {
    "linear": ref_linear,
    "scaled_linear": ref_scaled_linear,
    "cosine": ref_cosine,
    "sigmoid": ref_sigmoid,
}


def ref_zero_terminal_snr(betas: list[float]) -> list[float]:
    """Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", Alg. 1."""
    ab, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ab.append(prod)
    sq = [math.sqrt(v) for v in ab]
    s0, sT = sq[0], sq[-1]
    sq = [(v - sT) * s0 / (s0 - sT) for v in sq]
    ab = [v * v for v in sq]
    alphas = [ab[0]] + [ab[i] / ab[i - 1] for i in range(1, len(ab))]
    return [1.0 - a for a in alphas]


def ref_betas(name: str, T: int, zero_terminal_snr: bool = False) -> list[float]:
    b = REFS[name](T)
    return ref_zero_terminal_snr(b) if zero_terminal_snr else b


def ref_tables(betas: list[float]) -> dict[str, list[float]]:
    """Ho et al. 2020 eq. 4, 6, 7 from betas; 0-based t, ab_{-1} = 1."""
    T = len(betas)
    a = [1.0 - b for b in betas]
    ab, prod = [], 1.0
    for v in a:
        prod *= v
        ab.append(prod)
    abp = [1.0] + ab[:-1]

    def div(x: float, y: float) -> float:
        return x / y if y != 0.0 else math.inf

    pvar = [betas[i] * (1.0 - abp[i]) / (1.0 - ab[i]) for i in range(T)]
    return {
        "betas": list(betas),
        "alphas": a,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": abp,
        "sqrt_alphas_cumprod": [math.sqrt(v) for v in ab],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1.0 - v) for v in ab],
        "sqrt_recip_alphas_cumprod": [div(1.0, math.sqrt(v)) for v in ab],
        "sqrt_recipm1_alphas_cumprod": [math.sqrt(div(1.0, v) - 1.0) for v in ab],
        "posterior_variance": pvar,
        "posterior_log_variance_clipped": (
            [math.log(pvar[1])] + [math.log(v) for v in pvar[1:]] if T > 1 else [math.log(betas[0])]
        ),
        "posterior_mean_coef1": [betas[i] * math.sqrt(abp[i]) / (1.0 - ab[i]) for i in range(T)],
        "posterior_mean_coef2": [
            (1.0 - abp[i]) * math.sqrt(a[i]) / (1.0 - ab[i]) for i in range(T)
        ],
        "snr": [v / (1.0 - v) for v in ab],
    }


def linear_valid(T: int) -> bool:
    """The 1000/T-rescaled linear schedule has beta_end = 20/T, a valid beta only for T >= 20."""
    return 0.02 * 1000.0 / T <= 1.0


# --------------------------------------------------------------------------------------------
# Reference values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zts", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_terminal_alpha_bar_matches_reference_T1000(name, zts):
    s = make_schedule(name, 1000, zero_terminal_snr=zts)
    ref = ref_tables(ref_betas(name, 1000, zts))
    if zts:
        assert s.alphas_cumprod[-1] == 0.0 == ref["alphas_cumprod"][-1]
        # the step before the last is where the rescaling shows; pin it too
        assert s.alphas_cumprod[-2] == pytest.approx(ref["alphas_cumprod"][-2], rel=1e-9, abs=0)
    else:
        assert s.alphas_cumprod[-1] == pytest.approx(ref["alphas_cumprod"][-1], rel=1e-9, abs=0)
    np.testing.assert_allclose(s.betas, ref["betas"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("zts", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [2, 7, 32])
def test_whole_tables_match_reference_small_T(name, T, zts):
    if name == "linear" and not linear_valid(T):
        T = 20  # the smallest T at which the 1000/T-rescaled linear schedule is valid
    s = make_schedule(name, T, zero_terminal_snr=zts)
    ref = ref_tables(ref_betas(name, T, zts))
    for key in TABLES:
        got = getattr(s, key)
        np.testing.assert_allclose(got, ref[key], rtol=1e-9, atol=0, err_msg=key)


def test_linear_terminal_literal():
    # Ho et al. linear, T = 1000: alpha_bar_T = prod(1 - beta) = 4.036e-5 (the 6e-6 quoted in
    # some texts is wrong). Cross-checked against the independent reference in the test above.
    s = make_schedule("linear", 1000)
    ab_T = s.alphas_cumprod[-1]
    assert float(f"{ab_T:.4g}") == 4.036e-5
    assert ab_T == pytest.approx(4.0358e-5, rel=1e-4)
    assert ab_T == pytest.approx(ref_tables(ref_linear(1000))["alphas_cumprod"][-1], rel=1e-9)
    term = s.terminal()
    assert term["alpha_bar_T"] == ab_T
    assert term["mean_shift"] == pytest.approx(math.sqrt(4.0358e-5), rel=1e-4)  # 0.006353
    assert term["variance_ratio"] == pytest.approx(1 - ab_T, rel=1e-15)
    assert term["snr_T"] == pytest.approx(ab_T / (1 - ab_T), rel=1e-12)


def test_scaled_linear_terminal_literal():
    # Stable Diffusion's schedule leaves 6.8% of x_0 in x_T: the flaw Lin et al. 2023 fix.
    term = make_schedule("scaled_linear", 1000).terminal()
    assert term["alpha_bar_T"] == pytest.approx(4.66e-3, rel=1e-3)
    assert term["mean_shift"] == pytest.approx(0.068, abs=5e-4)
    ref = ref_tables(ref_scaled_linear(1000))["alphas_cumprod"][-1]
    assert term["alpha_bar_T"] == pytest.approx(ref, rel=1e-9)


# --------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zts", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_conventions(name, zts):
    T = 100
    s = make_schedule(name, T, zero_terminal_snr=zts)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == math.log(s.posterior_variance[1])
    assert np.all(np.isfinite(s.posterior_log_variance_clipped))
    # posterior at t = 0 is a point mass on x_0: mean = 1 * x_0 + 0 * x_t exactly
    assert s.posterior_mean_coef1[0] == 1.0
    assert s.posterior_mean_coef2[0] == 0.0
    for key in TABLES:
        arr = getattr(s, key)
        assert isinstance(arr, np.ndarray), key
        assert arr.dtype == np.float64, key
        assert arr.shape == (T,), key
        assert not arr.flags.writeable, key
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0.5
    with pytest.raises(AttributeError):
        s.betas = np.zeros(T)  # frozen dataclass


@pytest.mark.parametrize("name", SCHEDULES)
def test_single_step(name):
    s = make_schedule(name, 1)
    ref = ref_tables(ref_betas(name, 1))
    for key in TABLES:
        arr = getattr(s, key)
        assert arr.shape == (1,), key
        np.testing.assert_allclose(arr, ref[key], rtol=1e-12, atol=0, err_msg=key)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == math.log(s.betas[0])
    assert 0.0 < s.alphas_cumprod[0] < 1.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr(name):
    plain = make_schedule(name, 1000)
    zts = make_schedule(name, 1000, zero_terminal_snr=True)
    assert zts.alphas_cumprod[-1] == 0.0  # exactly
    assert zts.snr[-1] == 0.0
    assert zts.betas[-1] == 1.0
    assert zts.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-14)
    assert zts.alphas_cumprod[-2] > 0.0
    # shape of the rescaling: sqrt(ab) is an affine map of the original sqrt(ab)
    x, y = plain.sqrt_alphas_cumprod, zts.sqrt_alphas_cumprod
    expected = (x - x[-1]) * (x[0] / (x[0] - x[-1]))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-15)
    assert zts.terminal() == {
        "alpha_bar_T": 0.0,
        "mean_shift": 0.0,
        "variance_ratio": 1.0,
        "snr_T": 0.0,
    }
    assert zts.betas_sha256 != plain.betas_sha256


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


def bayes_posterior(s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q(x_{t-1} | x_t, x_0) ∝ N(x_{t-1}; sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) N(x_t; sqrt(a_t) x_{t-1},
    beta_t), solved by precision weighting for t >= 1: returns (c1, c2, var) with
    mean = c1 x0 + c2 x_t."""
    ab = np.cumprod(1.0 - np.asarray(s.betas, dtype=np.float64))
    ab_prev, a, b = ab[:-1], 1.0 - s.betas[1:], s.betas[1:]
    prec_prior = 1.0 / (1.0 - ab_prev)
    prec_lik = a / b  # N(x_t; sqrt(a) y, b) as a function of y: precision a / b, mean x_t / sqrt(a)
    var = 1.0 / (prec_prior + prec_lik)
    c1 = var * prec_prior * np.sqrt(ab_prev)
    c2 = var * np.sqrt(a) / b
    return c1, c2, var


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(SCHEDULES),
    T=st.integers(min_value=2, max_value=2000),
    zts=st.booleans(),
)
def test_invariants(name, T, zts):
    if name == "linear" and not linear_valid(T):
        with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
            make_schedule(name, T, zero_terminal_snr=zts)
        return
    s = make_schedule(name, T, zero_terminal_snr=zts)
    ab = s.alphas_cumprod
    assert np.all(np.diff(ab) < 0)
    assert ab[0] < 1.0 and ab[-1] >= 0.0
    assert (ab[-1] == 0.0) == (zts or s.betas[-1] == 1.0)
    assert np.all(s.betas > 0) and np.all(s.betas <= 1)
    # 0 <= beta~ <= beta; beta~ = beta (1 - ab_{t-1}) / (1 - ab_t) rounds in three places
    eps = np.finfo(np.float64).eps
    assert np.all(s.posterior_variance >= 0)
    assert np.all(s.posterior_variance <= s.betas * (1 + 4 * eps))
    assert np.all(np.diff(s.snr) < 0)
    assert np.all(s.snr >= 0)
    c1, c2, var = bayes_posterior(s)
    np.testing.assert_allclose(s.posterior_variance[1:], var, rtol=1e-9, atol=0)
    np.testing.assert_allclose(s.posterior_mean_coef1[1:], c1, rtol=1e-9, atol=0)
    np.testing.assert_allclose(s.posterior_mean_coef2[1:], c2, rtol=1e-9, atol=0)
    # the reference formulas agree at every T, not only at 1000 and small T
    np.testing.assert_allclose(s.betas, ref_betas(name, T, zts), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'") as e:
        make_schedule("quadratic", 1000)
    for name in SCHEDULES:
        assert name in str(e.value)


@pytest.mark.parametrize("T", [0, -3])
def test_nonpositive_T(T):
    with pytest.raises(ValueError, match=r"num_timesteps must be >= 1"):
        make_schedule("cosine", T)


@pytest.mark.parametrize("T", [2.5, 1000.0, "1000", None, True])
def test_non_integer_T(T):
    with pytest.raises(ValueError, match=r"num_timesteps must be an integer >= 1"):
        make_schedule("cosine", T)


def test_numpy_integer_T_accepted():
    a = make_schedule("cosine", np.int64(50))
    b = make_schedule("cosine", 50)
    assert a.num_timesteps == 50 and type(a.num_timesteps) is int
    assert a.betas_sha256 == b.betas_sha256


def test_zero_terminal_snr_needs_two_steps():
    with pytest.raises(ValueError, match=r"zero_terminal_snr needs num_timesteps >= 2"):
        make_schedule("cosine", 1, zero_terminal_snr=True)


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("linear", "beta_start, beta_end"),
        ("scaled_linear", "beta_start, beta_end"),
        ("cosine", "s, max_beta"),
        ("sigmoid", "start, end, tau, max_beta"),
    ],
)
def test_unknown_parameter(name, allowed):
    with pytest.raises(ValueError, match="bad parameters") as e:
        make_schedule(name, 1000, foo=1.0)
    msg = str(e.value)
    assert "foo" in msg and f"allowed: {allowed}" in msg


def test_parameters_are_used_and_recorded():
    s = make_schedule("linear", 1000, beta_end=0.01)
    np.testing.assert_allclose(s.betas, ref_linear(1000, beta_end=0.01), rtol=1e-12)
    assert s.params == {"beta_end": 0.01}
    c = make_schedule("cosine", 100, s=0.02, max_beta=0.5)
    np.testing.assert_allclose(c.betas, ref_cosine(100, s=0.02, max_beta=0.5), rtol=1e-12)
    assert c.betas.max() == 0.5
    g = make_schedule("sigmoid", 100, start=-2.0, end=4.0, tau=0.7)
    np.testing.assert_allclose(g.betas, ref_sigmoid(100, -2.0, 4.0, 0.7), rtol=1e-9)
    g = make_schedule("sigmoid", 1000, start=0.0, end=3.0, tau=0.3)  # Chen 2023, Table 1
    np.testing.assert_allclose(g.betas, ref_sigmoid(1000, 0.0, 3.0, 0.3), rtol=1e-9)


def test_sigmoid_alpha_bar_clip():
    # At tau = 0.3 the 1e-9 floor on alpha_bar sets the last beta (0.9989 < the 0.999 cap), so
    # the clip constant is observable here; at tau = 1 the cap hides it.
    s = make_schedule("sigmoid", 1000, tau=0.3)
    ref = ref_sigmoid(1000, tau=0.3)
    assert 0.998 < s.betas[-1] < 0.999
    np.testing.assert_allclose(s.betas, ref, rtol=1e-9, atol=0)
    assert s.betas[-1] != pytest.approx(ref_sigmoid(1000, tau=0.3, clip_min=1e-8)[-1], rel=1e-6)
    # sharper still, alpha_bar sits on the floor for several steps (beta = 0) and 1 - ab
    # vanishes in rounding near u = 0: such a schedule is rejected, not silently degenerate
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]; schedule 'sigmoid'"):
        make_schedule("sigmoid", 1000, tau=0.1)


@pytest.mark.parametrize(
    "params", [{"start": 3.0, "end": -3.0}, {"start": 1.0, "end": 1.0}, {"tau": 0.0}]
)
def test_bad_sigmoid_parameters(params):
    with pytest.raises(ValueError, match="sigmoid schedule needs end > start and tau > 0"):
        make_schedule("sigmoid", 100, **params)


@pytest.mark.parametrize("zts", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize(
    ("name", "T", "params"),
    [
        ("linear", 1000, {"beta_end": 2.0}),
        ("linear", 1000, {"beta_start": 0.0}),
        ("linear", 1000, {"beta_start": -1e-4}),
        ("linear", 1000, {"beta_end": float("nan")}),
        ("linear", 10, {}),  # 1000/T rescaling: beta_end = 2
        ("scaled_linear", 100, {"beta_end": 1.5}),
    ],
)
def test_betas_outside_unit_interval(name, T, params, zts):
    # zero_terminal_snr must report the bad betas, not the NaNs its rescaling would make of them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
            make_schedule(name, T, zero_terminal_snr=zts, **params)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        # alpha_bar underflows to exactly 0 long before the end and stays there
        ({"beta_start": 0.5, "beta_end": 0.9}, "underflows to 0"),
        # betas below float64 resolution: 1 - beta == 1, alpha_bar stays at 1
        ({"beta_start": 1e-20, "beta_end": 1e-19}, "below float64 resolution"),
        # only beta_0 is too small: alpha_bar_0 == 1 == alpha_bar_{-1}; left posterior_variance[0]
        # = 0/0 = NaN and snr[0] = inf before the check included alpha_bar_{-1} = 1
        ({"beta_start": 1e-17}, "not at t=0"),
    ],
)
def test_alpha_bar_not_strictly_decreasing(params, fragment):
    with pytest.raises(ValueError, match="alpha_bar must be strictly decreasing") as e:
        make_schedule("linear", 1000, **params)
    assert fragment in str(e.value)


# --------------------------------------------------------------------------------------------
# Identity, description, report
# --------------------------------------------------------------------------------------------

# The betas hash is stored in every output file and checked on reload, so a change to the
# betas (even in the last bit) makes existing datasets unreadable. linear and scaled_linear are
# pure IEEE arithmetic (linspace, sqrt, square); cosine and sigmoid go through libm cos/exp,
# whose last bit may legitimately vary by platform, so only their stability is checked.
PINNED_SHA256 = {
    "linear": "44b6b53a2c88",
    "scaled_linear": "3ed3f26b0df1",
}


def test_betas_sha256():
    hashes = {}
    for name in SCHEDULES:
        for zts in (False, True):
            a = make_schedule(name, 1000, zero_terminal_snr=zts)
            b = make_schedule(name, 1000, zero_terminal_snr=zts)
            assert a.betas_sha256 == b.betas_sha256
            assert a.betas_sha256 == hashlib.sha256(a.betas.astype("<f8").tobytes()).hexdigest()
            hashes[(name, zts)] = a.betas_sha256
    assert len(set(hashes.values())) == len(hashes)
    assert make_schedule("cosine", 999).betas_sha256 != hashes[("cosine", False)]
    for name, prefix in PINNED_SHA256.items():
        assert hashes[(name, False)].startswith(prefix), name


@pytest.mark.parametrize("zts", [False, True])
def test_describe_json(zts):
    s = make_schedule("sigmoid", 500, zero_terminal_snr=zts, tau=0.9)
    d = json.loads(json.dumps(s.describe()))
    assert d == {
        "name": "sigmoid",
        "num_timesteps": 500,
        "zero_terminal_snr": zts,
        "params": {"tau": 0.9},
        "betas_sha256": s.betas_sha256,
        "t_convention": "0-based, t in [0, T)",
    }
    # the description rebuilds the same process
    again = make_schedule(d["name"], d["num_timesteps"], zero_terminal_snr=zts, **d["params"])
    assert again.betas_sha256 == d["betas_sha256"]


def test_report_cli(capsys):
    assert sched_mod.main(["--timesteps", "1000"]) == 0
    out = capsys.readouterr().out
    assert "T = 1000" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for name in SCHEDULES:
        assert name in rows
    assert "4.036e-05" in rows["linear"]
    assert "0.00466" in rows["scaled_linear"]
    assert "0.06826x0" in rows["scaled_linear"]


def test_report_cli_zero_terminal_snr(capsys):
    assert sched_mod.main(["-T", "1000", "--zero-terminal-snr"]) == 0
    out = capsys.readouterr().out
    for name in SCHEDULES:
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert line.split()[1] == "0" and line.split()[-1] == "0"


def test_report_cli_bad_T(capsys):
    with pytest.raises(SystemExit) as e:
        sched_mod.main(["--timesteps", "0"])
    assert e.value.code == 2
    assert "num_timesteps must be >= 1" in capsys.readouterr().err


def test_report_cli_bug_is_exit_70_not_a_usage_error(monkeypatch, capsys):
    """A ValueError that is not a refused argument (a bug) is reported as a bug (exit 70 with
    its traceback), never as 'exit 2: usage'."""

    def broken(*args, **kwargs):
        raise ValueError("a bug inside the report")

    monkeypatch.setattr(sched_mod, "report_rows", broken)
    assert sched_mod.main(["--timesteps", "1000"]) == 70
    err = capsys.readouterr().err
    assert "a bug inside the report" in err and "internal error (a bug, exit 70)" in err


def test_report_cli_plot(tmp_path, capsys):
    path = tmp_path / "x.png"
    assert sched_mod.main(["--timesteps", "200", "--plot", str(path)]) == 0
    assert f"plot saved to {path}" in capsys.readouterr().out
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
