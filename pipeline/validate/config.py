"""The validator's config: the schema ``conf/validate.yaml`` extends, and its allowed values.

``conf/validate.yaml`` lists :data:`SCHEMA_NAME` first in its defaults list, so Hydra merges the
YAML and the command-line overrides into :class:`ValidateConfig`: an unknown key (``bins2=3``,
``output.dirr=x``) or a value of the wrong type (``bins=many``) fails when the config is
composed, before the dataset is opened or Ray starts. :func:`check_values` then checks ranges,
with messages that name the key. The YAML is the one home of the defaults (``-h`` prints it);
the schema fixes each key's type and holds no value (``MISSING``), so a key the YAML stopped
setting fails when it is read instead of falling back to a second, stale default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.errors import need as _need

SCHEMA_NAME = "validate_schema"  # in the ConfigStore next to the precompute's "base_config"
EXECUTORS = ("auto", "ray", "local")  # where the scans run: pipeline.validate.executor


@dataclass
class ValidateOutputConfig:
    dir: str = MISSING  # the dataset written by pipeline.precompute (path or URI)
    report_dir: str | None = MISSING  # None: <dir>/validation


@dataclass
class ValidateRayConfig:
    address: str | None = MISSING
    num_cpus_per_task: float = MISSING
    max_in_flight: int | None = MISSING


@dataclass
class ValidateConfig:
    output: ValidateOutputConfig = field(default_factory=ValidateOutputConfig)
    z: float = MISSING
    family_correction: bool = MISSING
    bins: int = MISSING
    terminal_window: float = MISSING
    reservoir_size: int = MISSING
    max_consistency_records: int = MISSING
    text_recheck: int = MISSING
    reconstruct_min_alpha_bar: float = MISSING
    terminal_mean_shift: float = MISSING
    batch_elements: int = MISSING
    seed: int = MISSING
    plots: bool = MISSING
    progress: bool = MISSING
    executor: str = MISSING
    workers: int | None = MISSING
    ray: ValidateRayConfig = field(default_factory=ValidateRayConfig)


def register_validate_configs() -> None:
    """Register :class:`ValidateConfig` as :data:`SCHEMA_NAME` in Hydra's ConfigStore
    (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ValidateConfig)


def check_values(cfg: DictConfig) -> None:
    """Check values beyond their types; a UsageError (a ValueError) names the key and what is
    allowed."""
    o = cfg.output
    _need(
        not OmegaConf.is_missing(o, "dir") and bool(o.dir),
        "output.dir",
        "required: python -m pipeline.validate output.dir=/path/or/uri",
    )
    _need(cfg.z > 0, "z", f"must be > 0, got {cfg.z}")
    _need(cfg.bins >= 1, "bins", f"must be >= 1, got {cfg.bins}")
    _need(cfg.reservoir_size >= 0, "reservoir_size", f"must be >= 0, got {cfg.reservoir_size}")
    _need(
        cfg.max_consistency_records >= 0,
        "max_consistency_records",
        f"must be >= 0 (0: skip), got {cfg.max_consistency_records}",
    )
    _need(
        0 < cfg.reconstruct_min_alpha_bar <= 1,
        "reconstruct_min_alpha_bar",
        f"must be in (0, 1], got {cfg.reconstruct_min_alpha_bar}",
    )
    _need(
        cfg.terminal_mean_shift >= 0,
        "terminal_mean_shift",
        f"must be >= 0, got {cfg.terminal_mean_shift}",
    )
    _need(
        0 <= cfg.terminal_window < 1,
        "terminal_window",
        f"must be in [0, 1), got {cfg.terminal_window}",
    )
    _need(cfg.batch_elements >= 1, "batch_elements", f"must be >= 1, got {cfg.batch_elements}")
    _need(
        cfg.executor in EXECUTORS,
        "executor",
        f"must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}",
    )
    _need(
        cfg.workers is None or cfg.workers >= 1,
        "workers",
        f"must be >= 1 or null (the CPUs this process may use), got {cfg.workers}",
    )
    _need(
        cfg.ray.num_cpus_per_task > 0,
        "ray.num_cpus_per_task",
        f"must be > 0, got {cfg.ray.num_cpus_per_task}",
    )
