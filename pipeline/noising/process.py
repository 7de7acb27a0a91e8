"""One Gaussian forward process, two families: DDPM and rectified flow, as float64 tables.

Every process here is ``x_t = alpha_t x_0 + sigma_t eps`` on a discrete grid of ``T`` points
(Kingma et al. 2021, "Variational Diffusion Models"). Grid index ``i`` in ``[0, T)`` runs from the
least to the most noisy point (DDPM's 0-based ``t``); index ``-1`` is the data itself
(``alpha = 1``, ``sigma = 0``).

* DDPM: ``alpha_t = sqrt(ab_t)``, ``sigma_t = sqrt(1 - ab_t)`` (:mod:`pipeline.noising.schedule`).
* Rectified flow: ``alpha = 1 - sigma``, ``sigma_i`` the training grid of diffusers'
  ``FlowMatchEulerDiscreteScheduler``: ``sigma = shift s / (1 + (shift - 1) s)``,
  ``s = (i + 1) / T``; Flux's dynamic shift uses ``shift = exp(mu)`` with ``mu`` linear in the
  latent sequence length (diffusers' ``calculate_shift`` and ``time_shift``). The model's
  timestep is ``sigma * T``.

The posterior q(x_s | x_t, x_0) for the previous grid point ``s = i - 1`` (general form):

    alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
    mean        = (alpha_s sigma_{t|s}^2 / sigma_t^2) x_0 + (alpha_{t|s} sigma_s^2 / sigma_t^2) x_t
    variance    = sigma_{t|s}^2 sigma_s^2 / sigma_t^2
    SNR_t       = alpha_t^2 / sigma_t^2

At ``i = 0`` the variance is 0 (a point mass on x_0) and the clipped log-variance is that of
``i = 1`` (improved-diffusion's choice). For DDPM the posterior tables are the schedule's own
(Ho et al. eq. 7, computed from the betas): the general form equals them to float64 rounding
(tests/test_process.py), and the records stay bit-identical.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.noising.schedule import NoiseSchedule

FAMILIES = ("ddpm", "flow")
# the targets a record can carry beside eps, and the families that define them
TARGETS = {"x_0": FAMILIES, "v": ("ddpm",), "velocity": ("flow",)}
TABLES = ("alpha", "sigma", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
          "posterior_log_variance_clipped", "snr", "timesteps")  # fmt: skip
FLOW_DEFAULTS = {
    "shift": 1.0,
    "dynamic_shift": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_seq_len": 256,
    "max_seq_len": 4096,
    "patch_size": 2,
}


def general_posterior(alpha: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Coefficients of q(x_{i-1} | x_i, x_0) for grid tables ``alpha``, ``sigma`` [T] (float64),
    the point before index 0 being the data (alpha 1, sigma 0). Returns ``coef_x0``,
    ``coef_xt``, ``variance``, ``log_variance_clipped``, each [T]."""
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    a_s = np.concatenate([[1.0], alpha[:-1]])
    s_s = np.concatenate([[0.0], sigma[:-1]])
    a_ts = alpha / a_s
    var_ts = sigma**2 - a_ts**2 * s_s**2
    out = {
        "coef_x0": a_s * var_ts / sigma**2,
        "coef_xt": a_ts * s_s**2 / sigma**2,
        "variance": var_ts * s_s**2 / sigma**2,
    }
    out["coef_x0"][0], out["coef_xt"][0], out["variance"][0] = 1.0, 0.0, 0.0
    v = out["variance"]
    with np.errstate(divide="ignore"):
        out["log_variance_clipped"] = np.log(np.concatenate([v[1:2], v[1:]]) if len(v) > 1 else v)
    return out


def flow_shift(seq_len: int, cfg: dict) -> float:
    """The shift of a flow process: ``cfg['shift']``, or with ``dynamic_shift`` Flux's
    ``exp(mu)``, mu = base_shift + (max_shift - base_shift) (seq_len - base_seq_len) /
    (max_seq_len - base_seq_len) (diffusers' ``calculate_shift``, same arithmetic)."""
    if not cfg["dynamic_shift"]:
        return float(cfg["shift"])
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_seq_len"] - cfg["base_seq_len"])
    b = cfg["base_shift"] - m * cfg["base_seq_len"]
    return math.exp(seq_len * m + b)


def seq_len(shape, patch_size: int) -> int:
    """Latent tokens of a [C, H, W] sample in patches of ``patch_size``: (H / p) (W / p)."""
    h, w = int(shape[-2]), int(shape[-1])
    return (h // patch_size) * (w // patch_size)


def flow_sigmas(T: int, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """The training grid, low to high noise, float64 [T]: sigma_i = shift s / (1 + (shift-1) s),
    s = (i + 1) / T; with ``mu``: diffusers' time_shift exp(mu) / (exp(mu) + (1 / s - 1))."""
    s = np.arange(1, T + 1, dtype=np.float64) / T
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True)
class GaussianProcess:
    """x_t = alpha x_0 + sigma eps on a grid of T points; every table is read-only float64 [T].

    ``timesteps``: the model's timestep at each point (DDPM: the index; flow: sigma * T).
    ``description``: JSON-ready and independent of the sample shape, enough to rebuild the
    process (:func:`from_description`); ``grid``: what this instance's grid depends on beyond
    it (flow: the shift, and for a dynamic shift the sequence length and mu) and its hash, the
    per-file ``grid`` entry of the metadata. ``schedule``: DDPM's :class:`NoiseSchedule`."""

    family: str
    num_timesteps: int
    alpha: np.ndarray = field(repr=False)
    sigma: np.ndarray = field(repr=False)
    posterior_mean_coef1: np.ndarray = field(repr=False)  # x_0
    posterior_mean_coef2: np.ndarray = field(repr=False)  # x_t
    posterior_variance: np.ndarray = field(repr=False)
    posterior_log_variance_clipped: np.ndarray = field(repr=False)
    snr: np.ndarray = field(repr=False)
    timesteps: np.ndarray = field(repr=False)
    description: dict = field(repr=False, default_factory=dict)
    grid: dict = field(repr=False, default_factory=dict)
    schedule: NoiseSchedule | None = field(repr=False, default=None)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in TABLES:
            value = np.array(getattr(self, name), dtype=np.float64)
            if value.shape != (self.num_timesteps,):
                raise ValueError(f"{name} must have shape [{self.num_timesteps}]")
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @property
    def sigmas_sha256(self) -> str:
        return hashlib.sha256(self.sigma.astype("<f8").tobytes()).hexdigest()

    def describe(self) -> dict:
        """The metadata's ``schedule`` entry (what :func:`pipeline.output.records.make_metadata`
        asks)."""
        return dict(self.description)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """alpha_t^2 [T] (DDPM's alpha_bar: the schedule's own table)."""
        return self.schedule.alphas_cumprod if self.schedule is not None else self.alpha**2

    def terminal(self) -> dict[str, float]:
        """Figures at the noisiest grid point: what is left of x_0 in x_T. DDPM: the keys of
        :meth:`pipeline.noising.schedule.NoiseSchedule.terminal` (``alpha_bar_T`` first);
        rectified flow in its own terms: ``sigma_T`` (1 on every grid), then ``mean_shift`` =
        alpha_T = 1 - sigma_T, ``variance_ratio`` = sigma_T^2 and ``snr_T``."""
        if self.schedule is not None:
            return self.schedule.terminal()
        a, s = float(self.alpha[-1]), float(self.sigma[-1])
        return {"sigma_T": s, "mean_shift": a, "variance_ratio": s * s,
                "snr_T": float(self.snr[-1])}  # fmt: skip

    def grid_index(self, t: np.ndarray) -> np.ndarray:
        """Grid indices int64 [N] of stored ``t`` values [N]; -1 where a value is not on the grid
        (DDPM: an integer in [0, T); flow: float32(sigma_i * T) exactly)."""
        t = np.asarray(t)
        T = self.num_timesteps
        if self.family != "flow":
            i = t.astype(np.int64)
            return np.where((i == t) & (i >= 0) & (i < T), i, -1)
        ts = self.timesteps.astype(np.float32)
        i = np.clip(np.searchsorted(ts, t.astype(np.float32)), 0, T - 1)
        return np.where(ts[i] == t, i, -1)

    def targets(self) -> tuple[str, ...]:
        """The target columns this family defines."""
        return tuple(k for k, fams in TARGETS.items() if self.family in fams)

    def t_column(self, index: np.ndarray) -> np.ndarray:
        """The record's ``t`` for grid indices [N]: DDPM int32 index, flow float32 sigma * T."""
        if self.family == "flow":
            return self.timesteps[index].astype(np.float32)
        return np.asarray(index).astype(np.int32)


def ddpm(schedule: NoiseSchedule) -> GaussianProcess:
    """DDPM as a Gaussian process: the schedule's own tables (bit-identical records)."""
    return GaussianProcess(
        family="ddpm",
        num_timesteps=schedule.num_timesteps,
        alpha=schedule.sqrt_alphas_cumprod,
        sigma=schedule.sqrt_one_minus_alphas_cumprod,
        posterior_mean_coef1=schedule.posterior_mean_coef1,
        posterior_mean_coef2=schedule.posterior_mean_coef2,
        posterior_variance=schedule.posterior_variance,
        posterior_log_variance_clipped=schedule.posterior_log_variance_clipped,
        snr=schedule.snr,
        timesteps=np.arange(schedule.num_timesteps, dtype=np.float64),
        description=schedule.describe(),  # no "family" key: a file without one is DDPM
        schedule=schedule,
    )


def check_flow_config(cfg: dict) -> list[tuple[str, str]]:
    """(key, message) for every invalid flow schedule value (keys of :data:`FLOW_DEFAULTS`)."""
    bad = []
    if not cfg["shift"] > 0:
        bad.append(("schedule.shift", f"must be > 0, got {cfg['shift']}"))
    if not cfg["max_seq_len"] > cfg["base_seq_len"]:
        bad.append(
            ("schedule.max_seq_len", f"must be > schedule.base_seq_len ({cfg['base_seq_len']}), "
             f"got {cfg['max_seq_len']}")
        )  # fmt: skip
    if not (isinstance(cfg["patch_size"], int) and cfg["patch_size"] >= 1):
        bad.append(("schedule.patch_size", f"must be an integer >= 1, got {cfg['patch_size']}"))
    return bad


def flow(num_timesteps: int, shape=None, **cfg) -> GaussianProcess:
    """Rectified flow (alpha = 1 - sigma) on diffusers' training grid. ``cfg``: the keys of
    :data:`FLOW_DEFAULTS`; ``shape`` ([C, H, W]) fixes the sequence length of a dynamic shift
    (H and W must be multiples of ``patch_size``, as Flux's 2x2 packing needs)."""
    unknown = set(cfg) - set(FLOW_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown flow schedule keys {sorted(unknown)}; allowed: {FLOW_DEFAULTS}")
    cfg = {**FLOW_DEFAULTS, **cfg}
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    for key, message in check_flow_config(cfg):
        raise ValueError(f"{key} {message}")
    desc = {"family": "flow", "name": "flow", "num_timesteps": T, **cfg}
    desc["t_convention"] = "t = sigma * T (float32), sigma on diffusers' training grid"
    if cfg["dynamic_shift"]:
        if shape is None:
            raise ValueError("schedule.dynamic_shift=true needs the sample shape")
        p = int(cfg["patch_size"])
        if int(shape[-1]) % p or int(shape[-2]) % p:
            raise ValueError(
                f"schedule.patch_size={p} does not divide the sample's height and width "
                f"{list(shape)[-2:]} (the sequence length of the dynamic shift)"
            )
        n = seq_len(shape, p)
        mu = math.log(flow_shift(n, cfg))
        sigma = flow_sigmas(T, mu=mu)
        grid = {"seq_len": n, "mu": mu, "shift": math.exp(mu)}
    else:
        sigma = flow_sigmas(T, float(cfg["shift"]))
        grid = {"shift": float(cfg["shift"])}
    alpha = 1.0 - sigma
    post = general_posterior(alpha, sigma)
    with np.errstate(divide="ignore"):
        snr = alpha**2 / sigma**2
    proc = GaussianProcess(
        family="flow",
        num_timesteps=T,
        alpha=alpha,
        sigma=sigma,
        posterior_mean_coef1=post["coef_x0"],
        posterior_mean_coef2=post["coef_xt"],
        posterior_variance=post["variance"],
        posterior_log_variance_clipped=post["log_variance_clipped"],
        snr=snr,
        timesteps=sigma * T,
    )
    grid["sigmas_sha256"] = proc.sigmas_sha256
    if not cfg["dynamic_shift"]:  # one grid for every shape: the dataset's description pins it
        desc["sigmas_sha256"] = grid["sigmas_sha256"]
    object.__setattr__(proc, "description", desc)
    object.__setattr__(proc, "grid", grid)
    return proc


def from_config(sch: dict, shape=None) -> GaussianProcess:
    """The process of a ``schedule`` config group (a dict)."""
    from pipeline.noising.schedule import make_schedule

    if sch["name"] == "flow":
        keys = {k: sch[k] for k in FLOW_DEFAULTS if k in sch}
        return flow(sch["num_timesteps"], shape, **keys)
    return ddpm(
        make_schedule(
            sch["name"],
            sch["num_timesteps"],
            zero_terminal_snr=sch.get("zero_terminal_snr", False),
            **(sch.get("params") or {}),
        )
    )


def from_description(desc: dict, shape=None, grid: dict | None = None) -> GaussianProcess:
    """Rebuild a process from its ``description`` (a file's metadata ``schedule`` entry) for
    samples of ``shape``; ValueError when the rebuilt grid's hash differs from the
    description's or from the file's ``grid`` entry (another shape or library version)."""
    if desc.get("family", "ddpm") != "flow":
        from pipeline.output.description import schedule_from_metadata

        return ddpm(schedule_from_metadata({"schedule": desc}))
    proc = flow(desc["num_timesteps"], shape, **{k: desc[k] for k in FLOW_DEFAULTS})
    for want in (desc.get("sigmas_sha256"), (grid or {}).get("sigmas_sha256")):
        if want is not None and proc.sigmas_sha256 != want:
            raise ValueError(
                f"flow grid rebuilt here does not match the file's sigmas hash "
                f"({proc.sigmas_sha256[:12]} != {want[:12]}): shape or library versions differ"
            )
    return proc


def from_metadata(meta: dict, shape=None) -> GaussianProcess:
    """The process of a file from its metadata (``schedule`` and its ``grid`` entry) and its
    sample ``shape`` (default the metadata's ``shape``)."""
    shape = meta.get("shape") if shape is None else shape
    return from_description(meta["schedule"], shape, meta.get("grid"))


class Processes:
    """The process of each sample shape of a dataset, built once per shape: one grid for all
    shapes, except Flux's dynamic shift, whose grid follows each file's sequence length."""

    def __init__(self, description: dict):
        self.description = dict(description)
        self._by_shape: dict[tuple, GaussianProcess] = {}

    def __call__(self, shape) -> GaussianProcess:
        key = tuple(int(s) for s in shape) if self.shape_dependent else ()
        if key not in self._by_shape:
            self._by_shape[key] = from_description(self.description, key or shape)
        return self._by_shape[key]

    @property
    def family(self) -> str:
        return self.description.get("family", "ddpm")

    @property
    def shape_dependent(self) -> bool:
        return self.family == "flow" and bool(self.description["dynamic_shift"])

    def grid_of(self, shape) -> dict | None:
        """The ``grid`` entry of a file of sample ``shape``: flow's grid, None for DDPM."""
        return self(shape).grid if self.family == "flow" else None

    def file_metadata(self, meta: dict, shape) -> dict:
        """A file's metadata: ``meta`` plus, for flow, the ``grid`` of its ``shape``."""
        grid = self.grid_of(shape)
        return meta if grid is None else {**meta, "grid": grid}


def resolve(process, shape) -> GaussianProcess:
    """A :class:`GaussianProcess` from a process, a :class:`Processes` (for ``shape``) or a DDPM
    :class:`NoiseSchedule`."""
    if isinstance(process, GaussianProcess):
        return process
    if isinstance(process, Processes):
        return process(shape)
    if isinstance(process, NoiseSchedule):
        return ddpm(process)
    raise TypeError(f"not a process: {type(process).__name__}")
