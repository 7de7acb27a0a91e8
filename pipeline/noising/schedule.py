"""Noise schedules of the DDPM forward process, as float64 tables built once.

Conventions (used everywhere in this project):

* Timesteps are 0-based: ``t`` in ``[0, T)``. Table entry ``t`` describes the step that
  takes ``x_{t}`` (in 1-based papers: ``x_{t}`` -> ``x_{t+1}``); ``alphas_cumprod[t]`` is
  ``alpha_bar`` *after* applying step ``t``, so ``alphas_cumprod[0] = 1 - betas[0]`` and
  ``alphas_cumprod[T - 1]`` is the terminal ``alpha_bar_T`` of the texts.
* ``alphas_cumprod_prev[0] = 1`` (``x_{-1}`` is the data ``x_0`` itself).
* ``posterior_variance[0] = 0`` (the posterior at the first step is a point mass on ``x_0``),
  and ``posterior_log_variance_clipped[0] = log(posterior_variance[1])`` so the log-variance is
  finite everywhere (improved-diffusion's choice). With ``T = 1`` it is ``log(betas[0])``.
* Every table is a read-only 1-D float64 array of length ``T``.

Equations (Ho et al. 2020, eq. 4, 6, 7), with ``a_t = 1 - beta_t`` and ``ab_t = prod_{s<=t} a_s``:

    q(x_t | x_0)          = N( sqrt(ab_t) x_0, (1 - ab_t) I )
    q(x_{t-1} | x_t, x_0) = N( c1_t x_0 + c2_t x_t, beta~_t I )
    beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)
    c1_t    = beta_t sqrt(ab_{t-1}) / (1 - ab_t)
    c2_t    = (1 - ab_{t-1}) sqrt(a_t) / (1 - ab_t)
    SNR_t   = ab_t / (1 - ab_t)

Run ``python -m pipeline.noising.schedule --help`` for the terminal-figure report and plot.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UsageError, internal_error

MAX_BETA = 0.999
SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")


def _linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020, scaled by 1000/T so that any T gives a comparable process."""
    scale = 1000.0 / T
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def _scaled_linear(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion: linear in sqrt(beta)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _betas_from_alpha_bar(
    alpha_bar: Callable[[np.ndarray], np.ndarray], T: int, max_beta: float
) -> np.ndarray:
    """beta_t = 1 - ab((t+1)/T) / ab(t/T), capped at max_beta (Nichol & Dhariwal 2021, eq. 17)."""
    grid = np.arange(T + 1, dtype=np.float64) / T
    ab = alpha_bar(grid)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def _cosine(T: int, s: float = 0.008, max_beta: float = MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal 2021: ab(u) = cos^2(pi/2 (u + s) / (1 + s)), normalised to ab(0) = 1."""

    def alpha_bar(u: np.ndarray) -> np.ndarray:
        f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
        return f / math.cos(s / (1.0 + s) * math.pi / 2.0) ** 2

    return _betas_from_alpha_bar(alpha_bar, T, max_beta)


def _sigmoid(
    T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = MAX_BETA
) -> np.ndarray:
    """Jabri et al. 2022 / Chen 2023: ab(u) = (s(end/tau) - s((u (end-start) + start)/tau))
    / (s(end/tau) - s(start/tau)) with s the logistic function, clipped below at 1e-9."""

    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    if not end > start or not tau > 0:
        raise UsageError(
            f"sigmoid schedule needs end > start and tau > 0, got {start=}, {end=}, {tau=}"
        )
    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(u: np.ndarray) -> np.ndarray:
        out = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
        return np.clip(out, 1e-9, 1.0)

    return np.clip(_betas_from_alpha_bar(alpha_bar, T, max_beta), 0.0, max_beta)


_BUILDERS: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ab) so that ab_0 is kept and
    ab_{T-1} is exactly 0 (the last beta becomes 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def _check_betas(b: np.ndarray, name: str) -> None:
    """ValueError unless every beta is in (0, 1] and alpha_bar (with alpha_bar_{-1} = 1) is
    strictly decreasing, so that 1 - alpha_bar_t > 0 and every table is well defined."""
    if not np.all(np.isfinite(b)) or b.min() <= 0.0 or b.max() > 1.0:
        raise UsageError(
            f"betas must lie in (0, 1]; schedule {name!r} gives min {b.min():.3g}, "
            f"max {b.max():.3g}"
        )
    ab = np.concatenate([[1.0], np.cumprod(1.0 - b)])
    flat = np.diff(ab) >= 0
    if np.any(flat):
        bad = int(np.argmax(flat))
        hint = (
            "alpha_bar underflows to 0: use fewer timesteps or smaller betas"
            if ab[bad + 1] == 0.0
            else "betas below float64 resolution: use larger betas"
        )
        raise UsageError(
            f"alpha_bar must be strictly decreasing; schedule {name!r} is not at t={bad} "
            f"(alpha_bar {ab[bad]:.6g} -> {ab[bad + 1]:.6g}); {hint}"
        )


@dataclass(frozen=True)
class NoiseSchedule:
    """An immutable DDPM schedule. Every table is a read-only float64 array of shape [T]."""

    name: str
    num_timesteps: int
    zero_terminal_snr: bool
    params: dict = field(repr=False)
    betas: np.ndarray = field(repr=False)
    alphas: np.ndarray = field(init=False, repr=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)
    snr: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) != self.num_timesteps:
            raise UsageError(f"betas must have shape [{self.num_timesteps}], got {b.shape}")
        _check_betas(b, self.name)
        a = 1.0 - b
        ab = np.cumprod(a)
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        with np.errstate(divide="ignore"):
            pvar = b * (1.0 - ab_prev) / (1.0 - ab)
            tables = {
                "betas": b,
                "alphas": a,
                "alphas_cumprod": ab,
                "alphas_cumprod_prev": ab_prev,
                "sqrt_alphas_cumprod": np.sqrt(ab),
                "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
                "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(ab),
                "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1.0),
                "posterior_variance": pvar,
                "posterior_log_variance_clipped": np.log(
                    np.concatenate([pvar[1:2], pvar[1:]]) if len(b) > 1 else b
                ),
                "posterior_mean_coef1": b * np.sqrt(ab_prev) / (1.0 - ab),
                "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(a) / (1.0 - ab),
                "snr": ab / (1.0 - ab),
            }
        # c1_0 = beta_0 / (1 - ab_0) is 1 in exact arithmetic (the posterior at t = 0 is a point
        # mass on x_0); 1 - (1 - beta_0) rounds, which left it 1 +- 1e-13.
        tables["posterior_mean_coef1"][0] = 1.0
        for key, value in tables.items():
            value = np.array(value, dtype=np.float64)
            value.flags.writeable = False
            object.__setattr__(self, key, value)

    @property
    def betas_sha256(self) -> str:
        """Hash of the betas (little-endian float64 bytes): identifies the process exactly."""
        return hashlib.sha256(self.betas.astype("<f8").tobytes()).hexdigest()

    def terminal(self) -> dict[str, float]:
        """Figures at the last step t = T-1: what is left of x_0 in x_T."""
        ab = float(self.alphas_cumprod[-1])
        return {
            "alpha_bar_T": ab,
            "mean_shift": math.sqrt(ab),
            "variance_ratio": 1.0 - ab,
            "snr_T": float(self.snr[-1]),
        }

    def describe(self) -> dict:
        """A JSON-ready description (for file metadata and reports)."""
        return {
            "name": self.name,
            "num_timesteps": self.num_timesteps,
            "zero_terminal_snr": self.zero_terminal_snr,
            "params": dict(self.params),
            "betas_sha256": self.betas_sha256,
            "t_convention": "0-based, t in [0, T)",
        }


def make_schedule(
    name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **params
) -> NoiseSchedule:
    """Build a schedule by name: one of ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``.

    ``params`` override the builder's defaults: ``beta_start``/``beta_end`` (linear,
    scaled_linear), ``s``/``max_beta`` (cosine), ``start``/``end``/``tau``/``max_beta`` (sigmoid).
    """
    if name not in _BUILDERS:
        raise UsageError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise UsageError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise UsageError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if zero_terminal_snr and num_timesteps < 2:
        raise UsageError("zero_terminal_snr needs num_timesteps >= 2")
    builder = _BUILDERS[name]
    try:
        betas = builder(int(num_timesteps), **params)
    except TypeError as exc:
        allowed = ", ".join(list(inspect.signature(builder).parameters)[1:])
        raise UsageError(
            f"bad parameters {params} for schedule {name!r} (allowed: {allowed}): {exc}"
        ) from None
    if zero_terminal_snr:
        _check_betas(np.asarray(betas, dtype=np.float64), name)  # before rescaling: no NaNs
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(
        name=name,
        num_timesteps=int(num_timesteps),
        zero_terminal_snr=bool(zero_terminal_snr),
        params=dict(params),
        betas=betas,
    )


def report_rows(num_timesteps: int, zero_terminal_snr: bool = False) -> list[dict]:
    """The terminal figures of every named schedule at T = num_timesteps."""
    rows = []
    for name in SCHEDULES:
        sched = make_schedule(name, num_timesteps, zero_terminal_snr=zero_terminal_snr)
        rows.append({"schedule": name, **sched.terminal()})
    return rows


def format_report(rows: list[dict], num_timesteps: int) -> str:
    head = (
        f"{'schedule':<14} {'alpha_bar_T':>12} {'mean shift':>12} {'var ratio':>12} {'SNR_T':>12}"
    )
    lines = [
        f"Terminal figures at T = {num_timesteps} (t = T-1, 0-based): "
        "x_T = sqrt(alpha_bar_T) x_0 + sqrt(1 - alpha_bar_T) eps",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['schedule']:<14} {r['alpha_bar_T']:>12.4g} {r['mean_shift']:>10.4g}x0 "
            f"{r['variance_ratio']:>12.8f} {r['snr_T']:>12.4g}"
        )
    return "\n".join(lines)


def plot_schedules(num_timesteps: int, path: str, zero_terminal_snr: bool = False) -> None:
    """Save alpha_bar_t and SNR(t) of every named schedule (log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    t = np.arange(num_timesteps)
    for name in SCHEDULES:
        s = make_schedule(name, num_timesteps, zero_terminal_snr=zero_terminal_snr)
        ax1.plot(t, s.alphas_cumprod, label=name)
        ax2.plot(t, s.snr, label=name)
    ax1.set(yscale="log", xlabel="t (0-based)", ylabel="alpha_bar_t", title="alpha_bar_t")
    ax2.set(yscale="log", xlabel="t (0-based)", ylabel="SNR(t)", title="SNR(t) = ab / (1 - ab)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Noise schedules, T = {num_timesteps}, zero_terminal_snr={zero_terminal_snr}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.noising.schedule",
        description="Print the terminal figures of every noise schedule, optionally plot them.",
    )
    parser.add_argument("--timesteps", "-T", type=int, default=1000)
    parser.add_argument("--zero-terminal-snr", action="store_true")
    parser.add_argument("--plot", metavar="PNG", help="save alpha_bar_t and SNR(t) curves here")
    args = parser.parse_args(argv)
    try:
        rows = report_rows(args.timesteps, args.zero_terminal_snr)
    except UsageError as exc:  # what the schedules allow; any other exception is a bug
        parser.error(str(exc))
    except Exception:
        return internal_error()
    print(format_report(rows, args.timesteps))
    if args.plot:
        plot_schedules(args.timesteps, args.plot, args.zero_terminal_snr)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
