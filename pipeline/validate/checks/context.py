"""What every check receives: the merged statistics and what the driver knows of the dataset."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from pipeline.output.manifest import OutputDir
from pipeline.validate.inventory import Inventory
from pipeline.validate.measures import DatasetStats


@dataclass(frozen=True)
class Context:
    """The input of a check's ``run``.

    ``ds``: the merged statistics of the scan; ``out``: the output directory (to name paths in
    messages; a check reads no file: what it holds is in ``inventory``); ``manifest``: its
    ``_manifest.json``; ``schedule`` and ``noise``: the process rebuilt from the manifest
    (:class:`pipeline.noising.process.GaussianProcess` of either family,
    :class:`pipeline.noising.noise.KeyedNoise`); ``cfg``: the validator's config
    (conf/validate.yaml), where a check finds its own keys.
    """

    ds: DatasetStats
    out: OutputDir
    manifest: dict
    inventory: Inventory
    schedule: object
    noise: object
    cfg: DictConfig

    @property
    def z(self) -> float:
        """The test threshold in standard errors (``z``)."""
        return float(self.cfg.z)

    @property
    def correct(self) -> bool:
        """Raise ``z`` for families of tests (``family_correction``)."""
        return bool(self.cfg.family_correction)
