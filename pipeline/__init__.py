"""Offline diffusion forward process: WebDataset shards in, validated Parquet training records out.

The package follows a record's journey: :mod:`pipeline.read` (shards -> samples),
:mod:`pipeline.encode` (frozen VAE and text encoders), :mod:`pipeline.noising` (the keyed forward
process), :mod:`pipeline.output` (the record format and the output directory), :mod:`pipeline.run`
(the job: config, Ray, workers and their stages), :mod:`pipeline.validate` (the proof) and
:mod:`pipeline.consume` (what trainers read). The commands: ``python -m pipeline.precompute``,
``python -m pipeline.validate``, ``python -m pipeline.demo``.

For trainers, ``pipeline.PrecomputedDataset``, ``pipeline.to_hf_dataset`` and
``pipeline.export_hf_parquet`` (imported on first use: ``import pipeline`` loads no torch).
Version 0.1's flat module paths still import, with a DeprecationWarning (the table of moves:
:data:`pipeline.moved.MOVED`).
"""

from pipeline import moved

__version__ = "0.1.0"

_PUBLIC = {
    "PrecomputedDataset": "pipeline.consume.dataset",
    "to_hf_dataset": "pipeline.consume.hf",
    "export_hf_parquet": "pipeline.consume.hf",
}
__all__ = ["__version__", *_PUBLIC]

moved.install()


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
