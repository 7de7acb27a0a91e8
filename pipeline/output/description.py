"""The process description in every records file: the ``ddpm`` key of its Parquet schema's
metadata (:data:`pipeline.output.records.METADATA_KEY`), written by :func:`make_metadata` (on the
driver, from the config: :func:`pipeline.run.metadata.dataset_metadata`) and read back by the
workers, the loader and the validator (:func:`process_metadata`, :func:`records_metadata`), which
rebuild the schedule, forward process and keyed noise from it (:func:`schedule_from_metadata`,
:func:`process_from_metadata`, :func:`noise_from_metadata`). Its keys are listed in the module
docstring of :mod:`pipeline.output.records`; :data:`PROCESS_KEYS` must agree across a dataset's
files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pyarrow as pa

from pipeline.output.records import (
    FORMAT,
    HF_METADATA_KEY,
    METADATA_KEY,
    TENSOR_COLUMNS,
    check_dtype,
    is_tensor,
)


def make_metadata(
    *,
    schedule,
    noise,
    dtype: str,
    shape: Sequence[int],
    store_x0: bool,
    config_hash: str,
    source: Mapping | None = None,
    library_version: str | None = None,
    encoder: Mapping | None = None,
    conditioning: Mapping | None = None,
    targets: Sequence[str] = (),
    buckets: Sequence[Mapping] | None = None,
) -> dict:
    """The ``ddpm`` process description of a dataset (see the module docstring): what a reader
    needs to interpret and regenerate every record. ``schedule`` is a NoiseSchedule or a
    :class:`pipeline.noising.process.GaussianProcess` (anything with ``describe()``), ``noise`` a
    KeyedNoise; ``targets``: the extra target columns (``output.targets`` but ``x_0``, which is
    ``store_x0``; recorded only when not empty); ``source`` describes the input (decoding,
    normalisation; the shard URL is added per file); ``encoder`` identifies the VAE of latent
    records (see :mod:`pipeline.encode.encoder`); ``conditioning`` lists the kept members and their
    columns' types (:meth:`pipeline.read.conditioning.Conditioning.describe`); ``buckets`` the
    aspect-ratio buckets and their sample shapes (:func:`pipeline.read.buckets.describe_buckets`;
    ``shape`` is then the largest of them)."""
    meta = {
        "format": FORMAT,
        "schedule": schedule.describe(),
        "noise": noise.describe(),
        "dtype": check_dtype(dtype),
        "shape": [int(s) for s in shape],
        "store_x0": bool(store_x0),
        "config_hash": config_hash,
    }
    if source is not None:
        meta["source"] = dict(source)
    if library_version is not None:
        meta["library_version"] = library_version
    if encoder is not None:
        meta["encoder"] = dict(encoder)
    if conditioning is not None:
        meta["conditioning"] = dict(conditioning)
    if targets:
        meta["targets"] = sorted(targets)
    if buckets is not None:
        meta["buckets"] = [dict(b) for b in buckets]
    return meta


def process_metadata(schema: pa.Schema) -> dict:
    """The ``ddpm`` JSON of a file's schema; ValueError when the file has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            "no 'ddpm' process metadata in this Parquet schema: not written by pipeline.precompute"
        )
    return json.loads(raw)


def records_metadata(schema: pa.Schema) -> dict:
    """:func:`process_metadata` of a file that must be records; ValueError saying what it is
    otherwise: no such metadata, or a Hugging Face export of records (``pipeline.consume.hf``),
    which keeps the metadata but holds the tensor columns as nested lists."""
    meta = process_metadata(schema)
    lists = [n for n in TENSOR_COLUMNS if n in schema.names and not is_tensor(schema.field(n).type)]
    if lists or HF_METADATA_KEY in (schema.metadata or {}):
        raise ValueError(
            "not records but a Hugging Face datasets export of records (pipeline.consume.hf."
            f"export_hf_parquet: tensor columns {lists or 'ArrayND'} as nested lists); read it "
            "with datasets.load_dataset('parquet', ...), or load the records directory it was "
            "exported from"
        )
    return meta


# Keys of the process metadata that must agree across every file of one dataset.
PROCESS_KEYS = (
    "format", "schedule", "noise", "dtype", "shape", "store_x0", "config_hash", "encoder",
    "conditioning", "text", "targets", "buckets",
)  # fmt: skip


def same_process(a: Mapping, b: Mapping) -> list[str]:
    """The process keys on which two metadata dicts differ (empty when they describe one
    process)."""
    return [k for k in PROCESS_KEYS if a.get(k) != b.get(k)]


def schedule_from_metadata(meta: Mapping):
    """Rebuild the NoiseSchedule a file was written with; ValueError if its betas hash differs,
    or if the file is not DDPM (see :func:`process_from_metadata` for every family)."""
    from pipeline.noising.schedule import make_schedule

    s = meta["schedule"]
    if s.get("family", "ddpm") != "ddpm":
        raise ValueError(
            f"these records are {s['family']!r}, not DDPM: they have no beta schedule; use "
            "pipeline.output.records.process_from_metadata"
        )
    sched = make_schedule(
        s["name"], s["num_timesteps"], zero_terminal_snr=s["zero_terminal_snr"], **s["params"]
    )
    if sched.betas_sha256 != s["betas_sha256"]:
        raise ValueError(
            f"schedule {s['name']!r} rebuilt here does not match the file's betas hash "
            f"({sched.betas_sha256[:12]} != {s['betas_sha256'][:12]}): library versions differ"
        )
    return sched


def process_from_metadata(meta: Mapping, shape: Sequence[int] | None = None):
    """Rebuild the :class:`pipeline.noising.process.GaussianProcess` of a file (any family) from its
    metadata and sample ``shape`` (default the metadata's; a dynamic shift depends on it)."""
    from pipeline.noising.process import from_metadata

    return from_metadata(dict(meta), shape)


def noise_from_metadata(meta: Mapping):
    """Rebuild the KeyedNoise that drew a file's (t, eps)."""
    from pipeline.noising.noise import KeyedNoise

    return KeyedNoise.from_description(meta["noise"], meta["schedule"]["num_timesteps"])
