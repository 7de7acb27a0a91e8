"""The scan plan: what every shard's scan measures, decided once on the driver.

:class:`ScanPlan` carries the process (the manifest's ``process`` block), the t-bins, the
reservoir sizes and the records whose (t, eps) are regenerated; :func:`scan_columns` names the
columns a scan reads. The plan is shipped to every shard task (:mod:`pipeline.validate.scan`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pipeline.output import records
from pipeline.output.description import ProcessMetadata

U32 = 2.0**-24  # float32 unit roundoff: relative error bound of one float32 operation
CHUNK_ELEMENTS = 1 << 17  # values per tensor in one chunk of the scan (1 MiB as float64)

# The stored values checked record by record against the process (record_consistency).
CONSISTENCY = ("alpha_bar", "sigma", "snr", "posterior_variance", "posterior_log_variance", "x_t",
               "posterior_mean", "velocity", "v")  # fmt: skip
TARGETS = ("velocity", "v")  # the target columns checked record by record


@dataclass(frozen=True)
class ScanPlan:
    """What a shard scan needs; built once on the driver, shipped to every task."""

    process: ProcessMetadata  # the manifest's "process" block (its JSON dict is read as one)
    edges: tuple  # t-bin edges, len bins + 1, edges[0] = 0, edges[-1] = T
    reservoir_size: int = 20000
    recon_min_alpha_bar: float = 0.1
    batch_elements: int = 1 << 20
    seed: int = 0
    consistency_quota: int = 0  # records per shard whose (t, eps) are regenerated
    grid: bool = True  # keep the samples the report's plots draw (strip, eps per channel)
    # the sample shape the statistics per tensor position are taken at; None: process["shape"]
    # (a bucketed dataset's is its largest configured bucket, which may hold no record)
    sample_shape: tuple | None = None
    # rectified flow: the record t (float32 sigma_i T) of every grid point when every file has
    # the same grid (shared_grid_t), to label the t-bins by the t the records carry; None for
    # DDPM (t is the grid index) and for a dynamic shift over several sample shapes
    grid_t: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "process", ProcessMetadata.from_json(self.process))

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    @property
    def flow(self) -> bool:
        """Rectified flow (alpha = 1 - sigma, t = sigma * T): its report speaks of sigma where
        a DDPM report speaks of alpha_bar."""
        return (self.process.schedule or {}).get("family") == "flow"

    @property
    def shape(self) -> tuple:
        shape = self.process.shape if self.sample_shape is None else self.sample_shape
        return tuple(int(s) for s in shape)

    @property
    def T(self) -> int:
        return self.process.num_timesteps

    @property
    def P(self) -> int:
        """Elements per channel."""
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def store_x0(self) -> bool:
        return bool(self.process.store_x0)


def make_plan(
    cfg, process: ProcessMetadata, n_files: int, sample_shape=None, grid_t=None
) -> ScanPlan:
    """The plan for ``n_files`` shards from the validator's config (t-bins, reservoir sizes,
    regenerated records per file); ``sample_shape`` and ``grid_t``: see :class:`ScanPlan`."""
    T = process.num_timesteps
    edges = t_edges(T, int(cfg.bins), float(cfg.terminal_window))
    quota = math.ceil(cfg.max_consistency_records / max(n_files, 1))
    return ScanPlan(
        process=process,
        edges=edges,
        reservoir_size=int(cfg.reservoir_size),
        recon_min_alpha_bar=float(cfg.reconstruct_min_alpha_bar),
        batch_elements=int(cfg.batch_elements),
        seed=int(cfg.seed),
        consistency_quota=quota,
        grid=bool(cfg.plots),
        sample_shape=None if sample_shape is None else tuple(int(x) for x in sample_shape),
        grid_t=grid_t,
    )


def shared_grid_t(process: ProcessMetadata, manifest: dict) -> tuple | None:
    """The record t (float32 sigma_i T, as a float) of every grid point of a rectified-flow
    dataset whose files all have one grid: a static shift, or a dynamic shift whose records
    are of one sample shape (the manifest's bucket table; without buckets, the process's
    shape). None for DDPM (its t is the grid index itself) and for a dynamic shift over several
    shapes, where each bucket's files have their own grid and a grid point's t differs."""
    schedule = process.schedule or {}
    if schedule.get("family") != "flow":
        return None
    shape = process.shape
    if schedule.get("dynamic_shift") and process.buckets is not None:
        rows = manifest.get("buckets") or ()
        shapes = {tuple(r["shape"]) for r in rows if r.get("records") and r.get("shape")}
        if len(shapes) != 1:
            return None
        (shape,) = shapes
    grid = records.process_from_metadata(process, shape).timesteps.astype(np.float32)
    return tuple(float(t) for t in grid)


def scan_columns(plan: ScanPlan) -> list[str]:
    """The columns a scan reads, from the column registry (:data:`pipeline.output.records.COLUMNS`):
    every column of the dataset's files but an encoder's latent_mean/latent_std (a projection:
    they are not checked)."""
    layout = records.Layout.of(plan.process)
    return [c.name for c in records.columns_of(layout) if c.name not in records.DIST_COLUMNS]


def bin_of_t(edges, T: int) -> np.ndarray:
    """t-bin index of every timestep 0..T-1."""
    return np.searchsorted(np.asarray(edges), np.arange(T), side="right") - 1


def t_edges(T: int, bins: int, terminal_window: float) -> tuple[int, ...]:
    """t-bin edges: ``bins`` equal ranges over [0, T - w), then the terminal bin [T - w, T) with
    w = max(1, round(T * terminal_window)) (where convergence looks at x_T)."""
    w = min(T, max(1, round(T * terminal_window)))
    main = np.floor(np.linspace(0, T - w, min(bins, T - w) + 1)) if T > w else np.zeros(1)
    return tuple(int(e) for e in np.unique(main)) + (T,)


def seed_of(*parts) -> list[int]:
    """A PCG64 seed (four uint32) hashed from ``parts``: one stream per (seed, shard, use)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
    return list(np.frombuffer(h, dtype="<u4"))
