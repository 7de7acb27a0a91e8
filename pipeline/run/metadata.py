"""What every file of a job shares, fixed on the driver before Ray starts: the sample shape
(:func:`sample_shape`: from the config, the first valid array, or the VAE's latent of the input)
and the process description written into every file's metadata (:func:`dataset_metadata`, see
:func:`pipeline.output.records.make_metadata`).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from pipeline import __version__
from pipeline.errors import JobError, UsageError
from pipeline.noising.noise import KeyedNoise
from pipeline.noising.process import from_config as process_from_config
from pipeline.output.description import ProcessMetadata, make_metadata
from pipeline.read.buckets import config_problems as bucket_problems
from pipeline.read.buckets import describe_buckets, largest_shape
from pipeline.read.conditioning import Conditioning
from pipeline.read.decoders import make_decoder
from pipeline.read.source import Sample, iter_shard, missing_local_shards
from pipeline.read.tarstream import ReadLimits, ShardReadError
from pipeline.run.config import process_config, targets

log = logging.getLogger(__name__)


def sample_shape(cfg: DictConfig, urls: list[str]) -> list[int]:
    """The [C, ...] shape every record of this dataset has: from the config, or for arrays
    without ``source.shape`` from the first valid sample of the first shards (deterministic).
    With ``encoder=vae`` the latent shape of that input, from the model's config.json (no weights
    are loaded); JobError when the input does not fit the model (channels, size)."""
    from pipeline.encode import encoder

    buckets = bucket_shapes(cfg)
    if buckets is not None:  # aspect-ratio buckets: the largest of their shapes
        return largest_shape(buckets)
    shape = _input_shape(cfg, urls)
    if not encoder.enabled(cfg):
        return shape
    try:
        return encoder.latent_shape(encoder.describe_encoder(cfg).config, shape)
    except encoder.EncoderError as exc:
        raise JobError(f"encoder.model={cfg.encoder.model}: {exc}") from None


def bucket_shapes(cfg: DictConfig) -> list[dict] | None:
    """The aspect-ratio buckets and the record shape of each (:func:`describe_buckets`; the
    latent's with ``encoder=vae``); None when ``source.buckets`` is null. With an encoder every
    bucket must be a whole number of its latent cells (the downsampling factor f): JobError
    naming ``source.bucket_step`` (auto) or ``source.buckets`` otherwise."""
    from pipeline.encode import encoder

    source = cfg.source
    if source.kind != "images" or source.buckets is None:
        return None
    if not encoder.enabled(cfg):
        return describe_buckets(source)
    config = encoder.describe_encoder(cfg).config
    for key, message in bucket_problems(source, patch=encoder.downsampling_factor(config)):
        raise JobError(f"{key}: {message} (encoder.model={cfg.encoder.model})")
    try:
        return describe_buckets(source, lambda pixels: encoder.latent_shape(config, pixels))
    except encoder.EncoderError as exc:
        raise JobError(f"encoder.model={cfg.encoder.model}: {exc}") from None


def refuse_missing_shards(urls: list[str]) -> None:
    """UsageError (exit 2) naming the first of ``urls`` that is a local path and not a file: on
    the driver in a second, before Ray starts, instead of by an actor's retries."""
    missing = missing_local_shards(urls)
    if missing:
        more = (
            f" ({len(missing)} of the {len(urls)} shards to read are missing)"
            if len(missing) > 1
            else ""
        )
        raise UsageError(f"source.urls: shard {missing[0]} does not exist{more}")


def _input_shape(cfg: DictConfig, urls: list[str]) -> list[int]:
    src = cfg.source
    if src.kind == "images":
        return [src.channels, src.resolution, src.resolution]
    if src.shape is not None:
        return list(src.shape)
    refuse_missing_shards(urls)  # before reading the first shards for their shape
    for url in urls:
        try:
            limits = ReadLimits.from_source(src)
            for item in iter_shard(url, make_decoder(src), on_error="skip", limits=limits):
                if isinstance(item, Sample):
                    log.info(
                        "array shape %s taken from %s key %s", list(item.array.shape), url, item.key
                    )
                    return list(item.array.shape)
        except ShardReadError:
            continue
    raise JobError(
        "no valid sample found in any shard to fix the array shape; set source.shape=[C,H,W]"
    )


def dataset_metadata(cfg: DictConfig, shape: list[int], chash: str) -> ProcessMetadata:
    """The process description of every file of this job (``chash``: its config hash)."""
    sch, s = cfg.schedule, cfg.sampling
    try:  # the grid of this shape is built here: a dynamic shift's shape problem is exit 2
        proc = process_from_config(OmegaConf.to_container(sch, resolve=True), shape)
    except ValueError as exc:
        raise JobError(f"sample shape {list(shape)}: {exc}") from None
    noise = KeyedNoise(
        cfg.seed, sch.num_timesteps, s.draws_per_sample, s.timesteps, family=proc.family,
        logit_mean=s.logit_mean, logit_std=s.logit_std, mode_scale=s.mode_scale,
    )  # fmt: skip
    extra, store_x0 = targets(cfg)
    meta = ProcessMetadata.from_json(
        make_metadata(
            schedule=proc,
            noise=noise,
            dtype=cfg.output.dtype,
            shape=shape,
            store_x0=store_x0,
            targets=extra,
            config_hash=chash,
            source=process_config(cfg)["source"],
            library_version=__version__,
            encoder=_encoder_metadata(cfg, shape),
            conditioning=Conditioning.from_source(cfg.source).describe(),
            buckets=bucket_shapes(cfg),
        )
    )
    from pipeline.encode import text

    if text.enabled(cfg):  # the text encoders' identity (pipeline/encode/text.py)
        meta.text = process_config(cfg)["text"]
    return meta


def _encoder_metadata(cfg: DictConfig, shape: list[int]) -> dict | None:
    """The ``encoder`` entry of the metadata: the model's identity and the input shape the
    actors decode to (``shape`` is the latent's)."""
    from pipeline.encode import encoder

    if not encoder.enabled(cfg):
        return None
    meta = process_config(cfg)["encoder"]
    return {**meta, "input_shape": encoder.input_shape(meta, shape)}
