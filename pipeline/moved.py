"""The flat module paths of version 0.1 (``pipeline.records``, ``pipeline.dataset``, ...), which
moved into subpackages: importing an old path still works, warns, and gives the very module of its
new home (one module object, so classes and isinstance checks are shared).

:data:`MOVED` is the one table of the moves; :func:`install` adds :class:`MovedFinder` to
``sys.meta_path`` once, when ``pipeline`` is imported. ``python -m pipeline.<old path>`` runs the
new module too (the loader hands runpy the new module's code).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module under ``pipeline`` -> its home under ``pipeline`` since the subpackage layout
MOVED: dict[str, str] = {
    "batching": "consume.batching",
    "buckets": "read.buckets",
    "commit": "output.commit",
    "conditioning": "read.conditioning",
    "config": "run.config",
    "config_rules": "run.config_rules",
    "contracts": "output.contracts",
    "dataset": "consume.dataset",
    "decoders": "read.decoders",
    "description": "output.description",
    "device": "encode.device",
    "diffusion": "noising.diffusion",
    "dispatch": "run.dispatch",
    "encode_stage": "encode.encode_stage",
    "encoder": "encode.encoder",
    "executor": "validate.executor",
    "hf": "consume.hf",
    "jobstate": "run.jobstate",
    "labels": "consume.labels",
    "lease": "output.lease",
    "manifest": "output.manifest",
    "memory": "encode.memory",
    "metadata": "run.metadata",
    "modelfiles": "encode.modelfiles",
    "noise": "noising.noise",
    "noisehash": "validate.noisehash",
    "overrides": "run.overrides",
    "plots": "validate.plots",
    "pool": "run.pool",
    "prefetch": "read.prefetch",
    "prepare": "output.prepare",
    "process": "noising.process",
    "raysession": "run.raysession",
    "reaper": "run.reaper",
    "records": "output.records",
    "recordsdir": "consume.recordsdir",
    "report": "validate.report",
    "resume": "output.resume",
    "schedule": "noising.schedule",
    "source": "read.source",
    "stage": "run.stage",
    "stages": "run.stages",
    "stats": "validate.stats",
    "targets": "noising.targets",
    "tarheader": "read.tarheader",
    "tarstream": "read.tarstream",
    "text": "encode.text",
    "text_encode": "encode.text_encode",
    "text_store": "output.text_store",
    "validate_config": "validate.config",
    "weights": "encode.weights",
    "worker": "run.worker",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module of its new home (imported first, under its own name)."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        """Nothing to run: the new module ran when it was imported under its own name."""

    def get_code(self, fullname: str):
        """The new module's code, for ``python -m pipeline.<old path>`` (runpy asks for it)."""
        return importlib.util.find_spec(self.new).loader.get_code(self.new)


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds ``pipeline.<old>`` for every old path in :data:`MOVED` (and nothing else)."""

    PREFIX = "pipeline."

    def find_spec(self, fullname: str, path=None, target=None):
        old = fullname[len(self.PREFIX) :] if fullname.startswith(self.PREFIX) else None
        if old not in MOVED:
            return None
        new = self.PREFIX + MOVED[old]
        warnings.warn(
            f"{fullname} moved to {new}: import it from there ({fullname} keeps working)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put one :class:`MovedFinder` first on ``sys.meta_path`` (a second call adds none): it
    answers only for the old paths, before an editable install's finder could map one to a stale
    file."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
