"""Structured configs (schemas) for the Hydra configs in ``conf/``.

The YAML files under ``conf/`` extend these dataclasses through their defaults lists, so an unknown
key or a value of the wrong type fails when Hydra composes the config, before Ray starts.
:func:`pipeline.run.config_rules.validate` then checks values (ranges, choices) with messages that
name the config key; :mod:`pipeline.run.overrides` handles the command line. This module also says
which part of a config determines the records (:func:`process_config`, :func:`config_hash`).

Each default has one home. Where the YAML files set a key, the schema fixes its type and holds
no value (``MISSING``), and every option of the group sets it: a key an option stopped setting
reads as ``???`` (an error naming it), not as a second, stale default. The schema keeps a value
only for what no YAML sets: the ``kind`` of a source or encoder schema, the read limits and
``source.keep`` (their homes are :mod:`pipeline.read.tarstream` and
:mod:`pipeline.read.conditioning`), ``source.require``, ``source.class_names``, and the fields
of :class:`TextEncoderConfig` (the items of ``text.encoders``, which users write themselves).
tests/test_config.py holds both sides to this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.read.conditioning import DEFAULT_KEEP
from pipeline.read.tarstream import MAX_MEMBER_BYTES, SHARD_TIMEOUT_S
from pipeline.run.config_rules import validate as validate
from pipeline.run.overrides import check_keys, quote_url_overrides
from pipeline.run.overrides import config_error_message as config_error_message
from pipeline.run.overrides import multirun_refusal as multirun_refusal

BUCKET_KEYS = ("buckets", "bucket_step", "max_aspect", "crop", "flip")  # source.*, images only


@dataclass
class SourceConfig:
    kind: str = MISSING
    urls: Any = MISSING  # a brace-expandable string or a list of URLs
    max_member_bytes: int = MAX_MEMBER_BYTES  # a larger tar member is rejected unread
    shard_timeout_s: float | None = SHARD_TIMEOUT_S  # reading + decoding one shard; null: no bound
    # member extensions carried into the records, one column each (pipeline/read/conditioning.py)
    keep: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP))
    require: list[str] = field(default_factory=list)  # a sample lacking one is rejected
    class_names: Any = None  # null | [names] | a names file: the cls labels (conditioning.py)


@dataclass
class ImagesSource(SourceConfig):
    kind: str = "images"
    resolution: int = MISSING
    channels: int = MISSING
    normalize: bool = MISSING
    alpha: str = MISSING
    # aspect-ratio buckets (pipeline/read/buckets.py): null (square crop) | auto | [[H, W], ...]
    buckets: Any = MISSING
    bucket_step: int = MISSING
    max_aspect: float = MISSING
    crop: str = MISSING  # center | random (keyed on seed, shard, key)
    flip: str = MISSING  # none | random (keyed)


@dataclass
class ArraysSource(SourceConfig):
    kind: str = "arrays"
    shape: list[int] | None = MISSING
    scale: float = MISSING
    shift: float = MISSING


@dataclass
class ScheduleConfig:
    name: str = MISSING
    num_timesteps: int = MISSING
    zero_terminal_snr: bool = MISSING
    params: dict[str, float] = MISSING


@dataclass
class FlowScheduleConfig(ScheduleConfig):
    """``schedule=flow``: rectified flow on diffusers' training grid
    (pipeline/noising/process.py)."""

    shift: float = MISSING  # static shift
    dynamic_shift: bool = MISSING  # Flux: shift exp(mu), mu linear in the latent sequence length
    base_shift: float = MISSING
    max_shift: float = MISSING
    base_seq_len: int = MISSING
    max_seq_len: int = MISSING
    patch_size: int = MISSING  # sequence length = (H / patch_size) (W / patch_size)


@dataclass
class SamplingConfig:
    draws_per_sample: int = MISSING
    timesteps: str = MISSING
    logit_mean: float = MISSING  # logit_normal (SD3): u = sigmoid(logit_mean + logit_std z)
    logit_std: float = MISSING
    mode_scale: float = MISSING  # mode (SD3)


@dataclass
class OutputConfig:
    dir: str = MISSING
    dtype: str = MISSING
    store_x0: bool = MISSING
    targets: list[str] = MISSING  # extra targets: v | x_0 | velocity
    rows_per_group: int = MISSING
    compression: str = MISSING
    tensor_compression: str = MISSING
    overwrite: bool = MISSING
    lease_timeout_s: float = MISSING


@dataclass
class RayConfig:
    address: str | None = MISSING
    num_actors: int | None = MISSING
    cpus_per_actor: float = MISSING
    gpus_per_actor: float = MISSING
    device: str = MISSING
    max_shard_retries: int = MISSING
    actor_start_timeout_s: float = MISSING


@dataclass
class EncoderConfig:
    kind: str = MISSING


@dataclass
class NoEncoder(EncoderConfig):
    kind: str = "none"


@dataclass
class VaeEncoder(EncoderConfig):
    """``encoder=vae``: a frozen diffusers AutoencoderKL encodes samples
    (pipeline/encode/encoder.py)."""

    kind: str = "vae"
    model: str = MISSING  # Hub id, local folder or URL in diffusers layout
    revision: str | None = MISSING
    subfolder: str | None = MISSING
    latent: str = MISSING  # sample | mean
    store_dist: bool = MISSING
    dtype: str = MISSING  # float32 | float16 | bfloat16
    scaling_factor: float | None = MISSING  # null: from the model's config.json
    shift_factor: float | None = MISSING
    batch_size: int = MISSING


@dataclass
class TextEncoderConfig:
    """One text encoder of the ``text`` group (pipeline/encode/text.py)."""

    name: str = MISSING  # column prefix: <name>_hidden, <name>_pooled, <name>_mask
    model: str | None = None  # null: text.model
    subfolder: str | None = None  # e.g. text_encoder_2 in a pipeline repo
    revision: str | None = None  # null: text.revision
    tokenizer_subfolder: str | None = None  # e.g. tokenizer_2
    max_length: int = 77
    output: list[str] = field(default_factory=lambda: ["last"])  # last | penultimate | pooled
    attention_mask: bool = False  # pass the tokenizer's mask to the model
    length_bucket: int = 0  # > 0 (needs attention_mask): pad to a multiple of it, not max_length


@dataclass
class TextConfig:
    """``text=clip|t5|sdxl|sd3|flux``: captions -> embeddings stored per sample; ``none``: off."""

    kind: str = MISSING
    model: str | None = MISSING  # folder or Hub id (a pipeline root for the presets)
    revision: str | None = MISSING
    caption_key: str = MISSING  # the kept member (source.keep) holding the caption
    dtype: str | None = MISSING  # stored values: float16 | float32; null: output.dtype
    compute_dtype: str = MISSING  # the encoders' dtype: float32 | float16 | bfloat16
    batch_size: int = MISSING  # captions per forward pass (fixed: embeddings do not depend on it)
    encoders: list[TextEncoderConfig] = MISSING


@dataclass
class PrecomputeConfig:
    source: SourceConfig = MISSING
    schedule: ScheduleConfig = MISSING
    ray: RayConfig = MISSING
    encoder: EncoderConfig = MISSING
    text: TextConfig = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = MISSING
    batch_size: int = MISSING
    read_ahead: int | None = MISSING
    on_error: str = MISSING
    progress: bool = MISSING


def actor_config(cfg: DictConfig) -> PrecomputeConfig:
    """The config as the actors receive it (:class:`pipeline.run.worker.ShardWorker`): the
    dataclass instances of this module, interpolations resolved (``OmegaConf.to_object``). Each
    group is its schema's subclass (``source``: :class:`ImagesSource` or :class:`ArraysSource`,
    ``schedule``: :class:`ScheduleConfig` or :class:`FlowScheduleConfig`, ``encoder``:
    :class:`NoEncoder` or :class:`VaeEncoder`, ``text.encoders``: :class:`TextEncoderConfig`
    each); the fields typed ``Any`` or ``dict`` (``source.urls``, ``source.buckets``,
    ``source.class_names``, ``schedule.params``) hold plain lists, dicts and scalars. A value
    still unset (``???``) raises ``MissingMandatoryValue`` naming its key."""
    return OmegaConf.to_object(cfg)


def register_configs() -> None:
    """Register the schemas the YAML files extend (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=PrecomputeConfig)
    cs.store(group="source", name="base_images", node=ImagesSource)
    cs.store(group="source", name="base_arrays", node=ArraysSource)
    cs.store(group="schedule", name="base_schedule", node=ScheduleConfig)
    cs.store(group="schedule", name="base_flow", node=FlowScheduleConfig)
    cs.store(group="ray", name="base_ray", node=RayConfig)
    cs.store(group="encoder", name="base_none", node=NoEncoder)
    cs.store(group="encoder", name="base_vae", node=VaeEncoder)
    cs.store(group="text", name="base_text", node=TextConfig)


def targets(cfg: DictConfig) -> tuple[list[str], bool]:
    """(the extra target columns beyond what the family always writes, store_x0): ``x_0`` in
    ``output.targets`` is ``output.store_x0``; flow's ``velocity`` is always written."""
    extra = sorted(set(cfg.output.targets) - {"x_0", "velocity"})
    return extra, bool(cfg.output.store_x0 or "x_0" in cfg.output.targets)


# The keys that change the records. Everything else (ray.*, batch_size, read_ahead, progress,
# output.dir, output.overwrite, output.rows_per_group, compression) leaves every record value
# unchanged.
PROCESS_CONFIG_KEYS = ("source", "schedule", "sampling", "seed")


def process_config(cfg: DictConfig) -> dict:
    """The part of the config that determines record values (source URLs excluded)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out = {k: out[k] for k in PROCESS_CONFIG_KEYS}
    out["source"].pop("urls", None)
    # safety limits decide which samples are rejected, never a record's value (like on_error)
    for key in ("max_member_bytes", "shard_timeout_s"):
        out["source"].pop(key, None)
    if out["source"].get("class_names") is None:  # no names: the hash of the configs before them
        out["source"].pop("class_names", None)
    else:  # the names, not the path of their file
        from pipeline.read.conditioning import class_names

        out["source"]["class_names"] = class_names(cfg.source)
    if out["source"].get("buckets") is None:  # buckets off: the hash of the square-crop configs
        for key in BUCKET_KEYS:
            out["source"].pop(key, None)
    from pipeline.noising.noise import DENSITIES

    if out["sampling"]["timesteps"] not in DENSITIES:  # a density's parameters, only with it
        for key in ("logit_mean", "logit_std", "mode_scale"):
            out["sampling"].pop(key, None)
    extra, store_x0 = targets(cfg)
    out["output"] = {"dtype": cfg.output.dtype, "store_x0": store_x0}
    if extra:  # DDPM without targets: the hash of the configs before output.targets
        out["output"]["targets"] = extra
    from pipeline.encode.encoder import describe_encoder, enabled

    if enabled(cfg):  # the model's identity (file hashes), not just its name
        out["encoder"] = describe_encoder(cfg).describe()
    from pipeline.encode import text

    if text.enabled(cfg):  # the text encoders' and tokenizers' identity (file hashes)
        out["text"] = text.describe_text(cfg)
    return out


def config_hash(cfg: DictConfig) -> str:
    """A short hash of :func:`process_config`: equal hashes mean interchangeable records."""
    pc = process_config(cfg)
    if "encoder" in pc:  # what the model is, not where it was read from
        from pipeline.encode.encoder import hashed_identity

        pc["encoder"] = hashed_identity(pc["encoder"])
    if "text" in pc:
        from pipeline.encode.text import hashed_identity as text_identity

        pc["text"] = text_identity(pc["text"])
    blob = json.dumps(pc, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The Hydra configs: the one place both CLIs, compose() and the validator read them from. They
# live inside the package, so an installed wheel has them; the top-level conf/ is a symlink here.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str] = (), config_name: str = "config") -> DictConfig:
    """Compose a config from ``conf/`` with command-line style overrides (tests, demo, bench).

    A key its schema lacks fails here even when added with ``+``/``++`` (:func:`check_keys`);
    required values (``???``) may stay unset."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=quote_url_overrides(overrides))
    check_keys(cfg, required=False)
    return cfg
