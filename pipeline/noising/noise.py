"""Keyed randomness: every record's timestep and noise are a pure function of its identity.

A record is identified by ``(seed, shard, key, draw)``: the global seed, the shard's id (its file
name without extension, see :func:`pipeline.read.source.shard_id`), the sample's WebDataset
``__key__`` (keys are only unique within a shard) and the draw index ``0 <= draw < K``. The
identity is hashed with BLAKE2b (32-byte digest):

* bytes ``0:16`` key a Philox-4x64 counter-based generator (``numpy.random.Philox``) that draws
  the noise ``eps ~ N(0, I)`` with ``Generator.standard_normal(dtype=float32)``;
* bytes ``16:24`` give the ``uniform`` timestep ``t = floor(u * T)``, ``u = bytes / 2**64``
  (53-bit resolution, so the bias is below 2**-53 * T).

The ``stratified`` sampler replaces the second step by a low-discrepancy Weyl sequence over the
record's position in its shard (``n = index * K + draw``): ``t = floor(T * frac(u_shard + n
phi))`` in exact 64-bit fixed point, with ``u_shard`` hashed from ``(seed, shard)``. Any window of
consecutive records, and so every shard and every batch, covers ``[0, T)`` evenly. Its noise is
keyed exactly as for ``uniform``.

Rectified flow (``family="flow"``) draws ``u`` from the same bytes (or the same Weyl sequence)
and picks diffusers' high-to-low sigmas with ``floor(u T)``, as its training scripts do; the
``logit_normal`` and ``mode`` densities of SD3 transform that keyed uniform
(:meth:`KeyedNoise.timesteps`). DDPM streams are unchanged by them.

Guarantees: the output is independent of the number of workers, the batch size and the order in
which shards are processed; a single record can be regenerated from its identity alone (plus its
position for ``stratified``). Noise is always generated on the CPU, so ``t`` and ``eps`` are
bit-identical on CPU-only and GPU nodes. The ``Philox`` bit stream is fixed, but NumPy promises
``Generator.standard_normal`` streams only within one NumPy build (NEP 19, numpy.random
compatibility policy), so ``eps`` is pinned by a regression test (tests/test_noise.py).
Arithmetic derived from them (x_t, posterior) may differ in the last float32 bit between device
types (fused multiply-add).

With an encoder (``encoder=vae``, :mod:`pipeline.encode.encoder`) each record also draws its latent
``z = mean + std * n``: ``n`` is keyed on the same identity with another BLAKE2b personalisation
(``ddpm-latent``), so it is independent of eps (:meth:`KeyedNoise.latent_noise`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLERS = ("uniform", "stratified", "logit_normal", "mode")
DENSITIES = ("logit_normal", "mode")  # SD3's training densities: rectified flow only
FAMILIES = ("ddpm", "flow")
_PERSON = b"ddpm-precompute"  # BLAKE2b personalisation: domain separation from other hashes
_LATENT_PERSON = b"ddpm-latent"  # the latent draws of an encoder: independent of eps
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # floor(2**64 / phi), odd: a full-period step
_TO_UNIT = 2.0**-53


def _digest(*parts: object, person: bytes = _PERSON) -> bytes:
    msg = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return hashlib.blake2b(msg, digest_size=32, person=person).digest()


def _unit_to_index(u: np.ndarray, n: int) -> np.ndarray:
    """Map uint64 values to integers in [0, n) via their top 53 bits."""
    return ((u >> np.uint64(11)).astype(np.float64) * _TO_UNIT * n).astype(np.int64)


@dataclass(frozen=True)
class KeyedNoise:
    """Draws (t, eps) for records from their identity. Immutable; safe to share.

    seed: global seed; num_timesteps: T; draws: K draws per sample; sampler: uniform |
    stratified | logit_normal | mode; family: ddpm | flow (flow: u picks diffusers' sigmas, which
    run from high to low noise, see :meth:`timesteps`); logit_mean, logit_std, mode_scale: the
    parameters of the logit_normal and mode densities.
    """

    seed: int
    num_timesteps: int
    draws: int = 1
    sampler: str = "uniform"
    family: str = "ddpm"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown timestep sampler {self.sampler!r}; allowed: {SAMPLERS}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown process family {self.family!r}; allowed: {FAMILIES}")
        if self.sampler in DENSITIES and self.family != "flow":
            raise ValueError(
                f"sampling.timesteps={self.sampler} is a rectified-flow density (SD3): use it with "
                "schedule=flow, or uniform|stratified with a DDPM schedule"
            )
        if not self.logit_std > 0:
            raise ValueError(f"sampling.logit_std must be > 0, got {self.logit_std}")
        for name in ("draws", "num_timesteps"):
            value = getattr(self, name)
            # bool is an int; a float T would let floor(u * T) reach T itself
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def digests(self, shard: str, keys: Sequence[str]) -> np.ndarray:
        """Identity hashes, uint8 [N*K, 32], sample-major (sample i's draws are rows iK..iK+K-1)."""
        out = np.empty((len(keys) * self.draws, 32), dtype=np.uint8)
        row = 0
        for key in keys:
            for d in range(self.draws):
                out[row] = np.frombuffer(_digest(self.seed, shard, key, d), dtype=np.uint8)
                row += 1
        return out

    def latent_noise(self, shard: str, keys: Sequence[str], shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 [N*K, *shape], sample-major: the draw ``n`` of an encoder's
        latent ``z = mean + std * n`` per record. Keyed on ``(seed, shard, key, draw)`` like eps,
        with another BLAKE2b personalisation (``ddpm-latent``), so the two streams are
        independent; drawn on the CPU, so the same on every device and batch."""
        d = np.empty((len(keys) * self.draws, 32), dtype=np.uint8)
        for row, (key, draw) in enumerate((k, i) for k in keys for i in range(self.draws)):
            d[row] = np.frombuffer(
                _digest(self.seed, shard, key, draw, person=_LATENT_PERSON), dtype=np.uint8
            )
        return self.noise(d, shape)

    def timesteps(self, digests: np.ndarray, shard: str, indices: Sequence[int]) -> np.ndarray:
        """Grid indices int64 [N*K] in [0, T), 0 the least noisy point (DDPM's 0-based t).
        ``indices``: the samples' ordinals in the shard, [N].

        DDPM: ``t = floor(u T)``. Flow, as diffusers' training scripts pick sigma
        (train_dreambooth_sd3.py, compute_density_for_timestep_sampling): ``j = floor(u T)``
        indexes diffusers' sigmas, which run from high to low noise, so the grid index is
        ``T - 1 - j``; ``u`` is uniform, stratified, ``sigmoid(logit_mean + logit_std z)``
        (logit_normal, ``z = Phi^-1(u')`` of a keyed uniform ``u'``) or ``1 - u' - mode_scale
        (cos^2(pi u' / 2) - 1 + u')`` (mode); j is clipped to [0, T) where rounding or the mode
        density would leave it.
        """
        T = self.num_timesteps
        if self.sampler == "stratified":
            idx = np.asarray(indices, dtype=np.uint64)
            n = np.arange(self.draws, dtype=np.uint64)
            n = (idx[:, None] * np.uint64(self.draws) + n).ravel()
            offset = np.frombuffer(_digest(self.seed, shard, "stratified")[:8], dtype="<u8")[0]
            with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
                bits = offset + n * _GOLDEN
        else:
            bits = np.ascontiguousarray(digests[:, 16:24]).view("<u8").reshape(-1)
        if self.sampler in DENSITIES:
            j = np.clip(np.floor(self.unit(bits) * T), 0, T - 1).astype(np.int64)
        else:
            j = _unit_to_index(bits, T)
        return T - 1 - j if self.family == "flow" else j

    def timestep_pmf(self, resolution: int = 1 << 20) -> np.ndarray:
        """P(t) float64 [T] over grid indices (as :meth:`timesteps` returns them): the one place
        a plot or a check reads the expected distribution of t from. uniform and stratified:
        1/T (stratified only spaces the draws evenly); a density of :data:`DENSITIES`: its
        :meth:`unit` map evaluated at ``resolution`` evenly spaced keyed uniforms (midpoints),
        binned as :meth:`timesteps` bins them, so it is exact to 1/resolution per bin."""
        T = self.num_timesteps
        if self.sampler in DENSITIES:
            step = np.uint64((1 << 53) // resolution)
            bits = (np.arange(resolution, dtype=np.uint64) * step + step // 2) << np.uint64(11)
            j = np.clip(np.floor(self.unit(bits) * T), 0, T - 1).astype(np.int64)
            p = np.bincount(j, minlength=T) / resolution
        else:
            p = np.full(T, 1.0 / T)
        return p[::-1].copy() if self.family == "flow" else p

    def unit(self, bits: np.ndarray) -> np.ndarray:
        """u in [0, 1] (float64) of the configured density from uint64 keyed ``bits``."""
        from scipy.special import expit, ndtri

        u = (bits >> np.uint64(11)).astype(np.float64) * _TO_UNIT
        if self.sampler == "logit_normal":  # the midpoint keeps Phi^-1 finite
            z = ndtri(u + 0.5 * _TO_UNIT)
            return expit(self.logit_mean + self.logit_std * z)
        if self.sampler == "mode":
            return 1.0 - u - self.mode_scale * (np.cos(np.pi * u / 2.0) ** 2 - 1.0 + u)
        return u

    def noise(
        self, digests: np.ndarray, shape: Sequence[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Standard normal noise, float32 [N*K, *shape], one Philox stream per record."""
        shape = tuple(int(s) for s in shape)
        if out is None:
            out = np.empty((len(digests),) + shape, dtype=np.float32)
        elif out.shape != (len(digests),) + shape or out.dtype != np.float32:
            raise ValueError(
                f"out must be float32 {(len(digests),) + shape}, got {out.dtype} {out.shape}"
            )
        keys = np.ascontiguousarray(digests[:, :16]).view("<u8")
        for row in range(len(digests)):
            gen = np.random.Generator(np.random.Philox(key=keys[row]))
            gen.standard_normal(dtype=np.float32, out=out[row])
        return out

    def draw(
        self, shard: str, keys: Sequence[str], indices: Sequence[int], shape: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(t int64 [N*K], eps float32 [N*K, *shape]) for N samples of one shard."""
        d = self.digests(shard, keys)
        return self.timesteps(d, shard, indices), self.noise(d, shape)

    def describe(self) -> dict:
        out = {
            "seed": self.seed,
            "sampler": self.sampler,
            "draws_per_sample": self.draws,
            "generator": "blake2b(seed,shard,key,draw) -> numpy Philox4x64 standard_normal float32",
            "numpy_version": np.__version__,  # Generator streams are pinned per NumPy build
        }
        if self.family != "ddpm":  # DDPM files keep today's description
            out["family"] = self.family
        if self.sampler == "logit_normal":
            out.update(logit_mean=self.logit_mean, logit_std=self.logit_std)
        if self.sampler == "mode":
            out["mode_scale"] = self.mode_scale
        return out

    @classmethod
    def from_description(cls, noise: dict, num_timesteps: int) -> KeyedNoise:
        """The KeyedNoise a file's metadata ``noise`` entry describes."""
        names = ("family", "logit_mean", "logit_std", "mode_scale")
        return cls(
            seed=noise["seed"],
            num_timesteps=num_timesteps,
            draws=noise["draws_per_sample"],
            sampler=noise["sampler"],
            **{k: noise[k] for k in names if k in noise},
        )
