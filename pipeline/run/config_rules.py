"""What values a precompute config may hold, beyond the types its schemas
(:mod:`pipeline.run.config`) fix: ranges, choices and combinations, each refusal a UsageError (a
ValueError, exit 2) naming the config key and what is allowed. Runs on the driver before Ray starts.

The allowed values live with the code that uses them (decoders, source, encoder, text, process):
they are imported where checked, since some load Pillow or webdataset, which composing a config
does not need.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from pipeline.encode.device import DEVICES
from pipeline.errors import need as _need
from pipeline.noising.noise import SAMPLERS
from pipeline.noising.schedule import SCHEDULES
from pipeline.output.records import DTYPES

_CODECS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")


def _check_finite(node, prefix: str = "") -> None:
    """NaN and infinity are never a valid config value: ValueError naming the key."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node)
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix[:-1]}[{key}]"
        if isinstance(value, float):
            _need(math.isfinite(value), name, f"must be a finite number, got {value}")
        elif OmegaConf.is_config(value):
            _check_finite(value, f"{name}.")


def _or(values) -> str:
    """``(1, 3, 4)`` -> ``"1, 3 or 4"``."""
    *most, last = [str(v) for v in values]
    return f"{', '.join(most)} or {last}" if most else last


def validate(cfg: DictConfig) -> None:
    """Check values beyond their types; UsageError (a ValueError) names the key and what is
    allowed."""
    # the allowed values live with the code that uses them (imported here: they load Pillow
    # and webdataset, which composing a config does not need)
    from pipeline.read.decoders import ALPHA_MODES, CHANNELS
    from pipeline.read.source import ON_ERROR

    _check_finite(cfg)
    _need(
        cfg.output.lease_timeout_s > 0,
        "output.lease_timeout_s",
        f"must be > 0, got {cfg.output.lease_timeout_s}",
    )
    _need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _need(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    _need(
        cfg.read_ahead is None or cfg.read_ahead >= 0,
        "read_ahead",
        f"must be null (auto) or >= 0 (0: decode inline), got {cfg.read_ahead}",
    )
    _need(cfg.on_error in ON_ERROR, "on_error", f"must be one of {ON_ERROR}, got {cfg.on_error!r}")
    s = cfg.sampling
    _need(
        s.draws_per_sample >= 1,
        "sampling.draws_per_sample",
        f"must be >= 1, got {s.draws_per_sample}",
    )
    _need(
        s.timesteps in SAMPLERS,
        "sampling.timesteps",
        f"must be one of {SAMPLERS}, got {s.timesteps!r}",
    )
    o = cfg.output
    _need(o.dtype in DTYPES, "output.dtype", f"must be one of {tuple(DTYPES)}, got {o.dtype!r}")
    _need(o.rows_per_group >= 1, "output.rows_per_group", f"must be >= 1, got {o.rows_per_group}")
    for key in ("compression", "tensor_compression"):
        _need(o[key] in _CODECS, f"output.{key}", f"must be one of {_CODECS}, got {o[key]!r}")
    sch = cfg.schedule
    names = (*SCHEDULES, "flow")
    _need(sch.name in names, "schedule.name", f"must be one of {names}, got {sch.name!r}")
    _need(
        sch.num_timesteps >= 1, "schedule.num_timesteps", f"must be >= 1, got {sch.num_timesteps}"
    )
    for key, message in process_problems(cfg):
        _need(False, key, message)
    src = cfg.source
    _need(
        src.kind in ("images", "arrays"),
        "source.kind",
        f"must be images or arrays, got {src.kind!r}",
    )
    urls = src.urls
    _need(
        bool(urls) and (isinstance(urls, str) or all(isinstance(u, str) for u in urls)),
        "source.urls",
        "must be a non-empty shard URL pattern or list of URLs",
    )
    parts = [p.strip() for u in ([urls] if isinstance(urls, str) else urls) for p in u.split("::")]
    _need(
        "-" not in parts,
        "source.urls",
        "'-' (standard input) cannot be a shard: Ray actors read the shards and have no stdin; "
        "give shard paths or URLs",
    )
    _need(
        src.max_member_bytes > 0,
        "source.max_member_bytes",
        f"must be > 0, got {src.max_member_bytes}",
    )
    _need(
        src.shard_timeout_s is None or src.shard_timeout_s > 0,
        "source.shard_timeout_s",
        f"must be null (no bound) or > 0, got {src.shard_timeout_s}",
    )
    from pipeline.read.conditioning import config_problems

    for key, message in config_problems(src):
        _need(False, key, message)
    if src.kind == "images":
        _need(src.resolution > 0, "source.resolution", f"must be > 0, got {src.resolution}")
        _need(
            src.channels in CHANNELS,
            "source.channels",
            f"must be {_or(CHANNELS)}, got {src.channels}",
        )
        _need(
            src.alpha in ALPHA_MODES,
            "source.alpha",
            f"must be {_or(ALPHA_MODES)}, got {src.alpha!r}",
        )
        from pipeline.read.buckets import config_problems as bucket_problems

        for key, message in bucket_problems(src):
            _need(False, key, message)
    else:
        _need(
            src.shape is None or (len(src.shape) >= 1 and all(d > 0 for d in src.shape)),
            "source.shape",
            f"must be null or a list of positive sizes [C, ...], got {src.shape}",
        )
        _need(src.scale != 0, "source.scale", "must not be 0")
    r = cfg.ray
    _need(
        r.num_actors is None or r.num_actors >= 1,
        "ray.num_actors",
        f"must be null or >= 1, got {r.num_actors}",
    )
    _need(r.cpus_per_actor > 0, "ray.cpus_per_actor", f"must be > 0, got {r.cpus_per_actor}")
    _need(r.gpus_per_actor >= 0, "ray.gpus_per_actor", f"must be >= 0, got {r.gpus_per_actor}")
    _need(r.device in DEVICES, "ray.device", f"must be one of {DEVICES}, got {r.device!r}")
    _need(
        not (r.device == "cuda" and r.gpus_per_actor == 0),
        "ray.device",
        "cuda needs ray.gpus_per_actor > 0 (Ray pins GPUs to actors); set ray.gpus_per_actor=1",
    )
    _need(
        r.actor_start_timeout_s > 0,
        "ray.actor_start_timeout_s",
        f"must be > 0, got {r.actor_start_timeout_s}",
    )
    _need(
        r.max_shard_retries >= 0,
        "ray.max_shard_retries",
        f"must be >= 0, got {r.max_shard_retries}",
    )
    _validate_encoder(cfg)
    from pipeline.encode.text import problems

    for key, message in problems(cfg):
        _need(False, key, message)


def family(cfg: DictConfig) -> str:
    """The process family of a config: ``flow`` for ``schedule=flow``, else ``ddpm``."""
    return "flow" if cfg.schedule.name == "flow" else "ddpm"


def process_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, message) for the values of the forward process (schedule, densities, targets)
    that do not fit its family (:mod:`pipeline.noising.process`, :mod:`pipeline.noising.noise`)."""
    from pipeline.noising.noise import DENSITIES
    from pipeline.noising.process import FLOW_DEFAULTS, TARGETS, check_flow_config

    fam, sch, s, bad = family(cfg), cfg.schedule, cfg.sampling, []
    if fam == "flow":
        if "shift" not in sch:
            bad.append(("schedule", "name=flow needs the flow schema: use schedule=flow"))
            return bad
        bad += check_flow_config({k: sch[k] for k in FLOW_DEFAULTS})
        if sch.zero_terminal_snr:
            why = "must be false with schedule=flow: sigma reaches 1 (zero SNR) already"
            bad.append(("schedule.zero_terminal_snr", why))
        if sch.params:
            why = f"must be empty with schedule=flow, got {dict(sch.params)}"
            bad.append(("schedule.params", why))
    elif s.timesteps in DENSITIES:
        bad.append(("sampling.timesteps",
                    f"{s.timesteps} is a rectified-flow density (SD3): use it with schedule=flow, "
                    "or uniform|stratified with a DDPM schedule"))  # fmt: skip
    if not s.logit_std > 0:
        bad.append(("sampling.logit_std", f"must be > 0, got {s.logit_std}"))
    for target in cfg.output.targets:
        if target not in TARGETS:
            bad.append(("output.targets", f"unknown target {target!r}; allowed: {list(TARGETS)}"))
        elif fam not in TARGETS[target]:
            allowed = [k for k, fams in TARGETS.items() if fam in fams]
            bad.append(("output.targets",
                        f"{target!r} is not defined for schedule={sch.name} ({fam}); "
                        f"allowed: {allowed}"))  # fmt: skip
    if len(set(cfg.output.targets)) != len(cfg.output.targets):
        bad.append(("output.targets", f"lists a target twice: {list(cfg.output.targets)}"))
    return bad


def _validate_encoder(cfg: DictConfig) -> None:
    """The ``encoder`` group's values; what needs the model's config.json (channels, sizes)
    is checked when the driver resolves the model (pipeline/encode/encoder.py)."""
    from pipeline.encode.encoder import ENCODER_DTYPES, KINDS, LATENT_MODES

    enc = cfg.get("encoder")
    if enc is None or enc.kind == "none":
        return
    _need(enc.kind in KINDS, "encoder.kind", f"must be one of {KINDS}, got {enc.kind!r}")
    _need(bool(enc.model), "encoder.model", "must be a Hub id, a local folder or a URL")
    _need(
        enc.latent in LATENT_MODES,
        "encoder.latent",
        f"must be one of {LATENT_MODES}, got {enc.latent!r}",
    )
    _need(
        enc.dtype in ENCODER_DTYPES,
        "encoder.dtype",
        f"must be one of {ENCODER_DTYPES}, got {enc.dtype!r}",
    )
    _need(
        enc.scaling_factor is None or enc.scaling_factor > 0,
        "encoder.scaling_factor",
        f"must be null (from the model's config) or > 0, got {enc.scaling_factor}",
    )
    _need(enc.batch_size >= 1, "encoder.batch_size", f"must be >= 1, got {enc.batch_size}")
    if cfg.source.kind == "images":
        _need(
            cfg.source.normalize,
            "source.normalize",
            "must be true with encoder=vae: the VAE takes pixel values in [-1, 1]",
        )
