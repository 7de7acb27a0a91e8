"""Structured configs (schemas) for the Hydra configs in ``conf/``.

The YAML files under ``conf/`` extend these dataclasses through their defaults lists, so an unknown
key or a value of the wrong type fails when Hydra composes the config, before Ray starts.
:func:`validate` then checks values (ranges, choices) with messages that name the config key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .noise import SAMPLERS
from .records import DTYPES
from .schedule import SCHEDULES

DEVICES = ("auto", "cuda", "cpu")
BUCKET_KEYS = ("buckets", "bucket_step", "max_aspect", "crop", "flip")  # source.*, images only


@dataclass
class SourceConfig:
    kind: str = MISSING
    urls: Any = MISSING  # a brace-expandable string or a list of URLs
    max_member_bytes: int = 256 * 2**20  # a larger tar member is rejected unread (source.py)
    shard_timeout_s: float | None = 3600.0  # reading + decoding one shard; null: no bound
    # member extensions carried into the records, one column each (pipeline/conditioning.py)
    keep: list[str] = field(default_factory=lambda: ["cls", "txt", "json"])
    require: list[str] = field(default_factory=list)  # a sample lacking one is rejected
    class_names: Any = None  # null | [names] | a names file: the cls labels (conditioning.py)


@dataclass
class ImagesSource(SourceConfig):
    kind: str = "images"
    resolution: int = 256
    channels: int = 3
    normalize: bool = True
    alpha: str = "composite"
    # aspect-ratio buckets (pipeline/buckets.py): null (square crop) | auto | [[H, W], ...]
    buckets: Any = None
    bucket_step: int = 64
    max_aspect: float = 4.0
    crop: str = "center"  # center | random (keyed on seed, shard, key)
    flip: str = "none"  # none | random (keyed)


@dataclass
class ArraysSource(SourceConfig):
    kind: str = "arrays"
    shape: list[int] | None = None
    scale: float = 1.0
    shift: float = 0.0


@dataclass
class ScheduleConfig:
    name: str = MISSING
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class FlowScheduleConfig(ScheduleConfig):
    """``schedule=flow``: rectified flow on diffusers' training grid (pipeline/process.py)."""

    name: str = "flow"
    shift: float = 1.0  # static shift (SD3: 3.0)
    dynamic_shift: bool = False  # Flux: shift exp(mu), mu linear in the latent sequence length
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch_size: int = 2  # sequence length = (H / patch_size) (W / patch_size)


@dataclass
class SamplingConfig:
    draws_per_sample: int = 1
    timesteps: str = "uniform"
    logit_mean: float = 0.0  # logit_normal (SD3): u = sigmoid(logit_mean + logit_std z)
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode (SD3)


@dataclass
class OutputConfig:
    dir: str = MISSING
    dtype: str = "float16"
    store_x0: bool = False
    targets: list[str] = field(default_factory=list)  # extra targets: v | x_0 | velocity
    rows_per_group: int = 256
    compression: str = "zstd"
    tensor_compression: str = "none"
    overwrite: bool = False
    lease_timeout_s: float = 120.0


@dataclass
class RayConfig:
    address: str | None = None
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    device: str = "auto"
    max_shard_retries: int = 2
    actor_start_timeout_s: float = 120.0


@dataclass
class EncoderConfig:
    kind: str = MISSING


@dataclass
class NoEncoder(EncoderConfig):
    kind: str = "none"


@dataclass
class VaeEncoder(EncoderConfig):
    """``encoder=vae``: a frozen diffusers AutoencoderKL encodes samples (pipeline/encoder.py)."""

    kind: str = "vae"
    model: str = MISSING  # Hub id, local folder or URL in diffusers layout
    revision: str | None = None
    subfolder: str | None = None
    latent: str = "sample"  # sample | mean
    store_dist: bool = False
    dtype: str = "float32"  # float32 | float16 | bfloat16
    scaling_factor: float | None = None  # null: from the model's config.json
    shift_factor: float | None = None
    batch_size: int = 16


@dataclass
class TextEncoderConfig:
    """One text encoder of the ``text`` group (pipeline/text.py)."""

    name: str = MISSING  # column prefix: <name>_hidden, <name>_pooled, <name>_mask
    model: str | None = None  # null: text.model
    subfolder: str | None = None  # e.g. text_encoder_2 in a pipeline repo
    revision: str | None = None  # null: text.revision
    tokenizer_subfolder: str | None = None  # e.g. tokenizer_2
    max_length: int = 77
    output: list[str] = field(default_factory=lambda: ["last"])  # last | penultimate | pooled
    attention_mask: bool = False  # pass the tokenizer's mask to the model


@dataclass
class TextConfig:
    """``text=clip|t5|sdxl|sd3|flux``: captions -> embeddings stored per sample; ``none``: off."""

    kind: str = "none"
    model: str | None = None  # folder or Hub id (a pipeline root for the presets)
    revision: str | None = None
    caption_key: str = "txt"  # the kept member (source.keep) holding the caption
    dtype: str | None = None  # stored values: float16 | float32; null: output.dtype
    compute_dtype: str = "float32"  # the encoders' dtype: float32 | float16 | bfloat16
    batch_size: int = 32  # captions per forward pass (fixed: embeddings do not depend on it)
    encoders: list[TextEncoderConfig] = field(default_factory=list)


@dataclass
class PrecomputeConfig:
    source: SourceConfig = MISSING
    schedule: ScheduleConfig = MISSING
    ray: RayConfig = MISSING
    encoder: EncoderConfig = MISSING
    text: TextConfig = field(default_factory=TextConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    batch_size: int = 64
    read_ahead: int | None = None
    on_error: str = "skip"
    progress: bool = True


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


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config key {key}: {message}")


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
    """Check values beyond their types; ValueError names the key and what is allowed."""
    # the allowed values live with the code that uses them (imported here: they load Pillow
    # and webdataset, which composing a config does not need)
    from .decoders import ALPHA_MODES, CHANNELS
    from .source import ON_ERROR

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
    from .conditioning import config_problems

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
        from .buckets import config_problems as bucket_problems

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
    from .text import problems

    for key, message in problems(cfg):
        _need(False, key, message)


def family(cfg: DictConfig) -> str:
    """The process family of a config: ``flow`` for ``schedule=flow``, else ``ddpm``."""
    return "flow" if cfg.schedule.name == "flow" else "ddpm"


def process_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, message) for the values of the forward process (schedule, densities, targets)
    that do not fit its family (:mod:`pipeline.process`, :mod:`pipeline.noise`)."""
    from .noise import DENSITIES
    from .process import FLOW_DEFAULTS, TARGETS, check_flow_config

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


def targets(cfg: DictConfig) -> tuple[list[str], bool]:
    """(the extra target columns beyond what the family always writes, store_x0): ``x_0`` in
    ``output.targets`` is ``output.store_x0``; flow's ``velocity`` is always written."""
    extra = sorted(set(cfg.output.targets) - {"x_0", "velocity"})
    return extra, bool(cfg.output.store_x0 or "x_0" in cfg.output.targets)


def _validate_encoder(cfg: DictConfig) -> None:
    """The ``encoder`` group's values; what needs the model's config.json (channels, sizes)
    is checked when the driver resolves the model (pipeline/encoder.py)."""
    from .encoder import ENCODER_DTYPES, KINDS, LATENT_MODES

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
        from .conditioning import class_names

        out["source"]["class_names"] = class_names(out["source"])
    if out["source"].get("buckets") is None:  # buckets off: the hash of the square-crop configs
        for key in BUCKET_KEYS:
            out["source"].pop(key, None)
    from .noise import DENSITIES

    if out["sampling"]["timesteps"] not in DENSITIES:  # a density's parameters, only with it
        for key in ("logit_mean", "logit_std", "mode_scale"):
            out["sampling"].pop(key, None)
    extra, store_x0 = targets(cfg)
    out["output"] = {"dtype": cfg.output.dtype, "store_x0": store_x0}
    if extra:  # DDPM without targets: the hash of the configs before output.targets
        out["output"]["targets"] = extra
    from .encoder import describe_encoder, enabled

    if enabled(cfg):  # the model's identity (file hashes), not just its name
        out["encoder"] = describe_encoder(cfg).describe()
    from . import text

    if text.enabled(cfg):  # the text encoders' and tokenizers' identity (file hashes)
        out["text"] = text.describe_text(cfg)
    return out


def config_hash(cfg: DictConfig) -> str:
    """A short hash of :func:`process_config`: equal hashes mean interchangeable records."""
    pc = process_config(cfg)
    if "encoder" in pc:  # what the model is, not where it was read from
        from .encoder import hashed_identity

        pc["encoder"] = hashed_identity(pc["encoder"])
    if "text" in pc:
        from .text import hashed_identity as text_identity

        pc["text"] = text_identity(pc["text"])
    blob = json.dumps(pc, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The Hydra configs: the one place both CLIs, compose() and the validator read them from. They
# live inside the package, so an installed wheel has them; the top-level conf/ is a symlink here.
CONF_DIR = Path(__file__).resolve().parent / "conf"


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


_REQUIRED_EXAMPLE = {
    "output.dir": "output.dir=/path/to/output",
    "source.urls": "source.urls=/data/train-{000000..000099}.tar",
}


def _required_message(key: str) -> str:
    return f"config key {key} is required: add {_REQUIRED_EXAMPLE.get(key, key + '=<value>')}"


def check_keys(cfg: DictConfig, required: bool = True) -> None:
    """Refuse what Hydra's composition lets through: a key that a node's schema (dataclass) lacks,
    which ``+key=value`` and ``++key=value`` add past struct mode, so a typo such as
    ``+sampling.draw_per_sample=2`` would otherwise be kept silently; with ``required``, a
    required value (``???``) left unset. Raises ConfigCompositionException naming the key."""
    import dataclasses
    import difflib

    from hydra.errors import ConfigCompositionException

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        fields = (
            [f.name for f in dataclasses.fields(schema)]
            if dataclasses.is_dataclass(schema)
            else None
        )
        for key in node.keys():
            name = f"{prefix}{key}"
            if fields is not None and key not in fields:
                near = difflib.get_close_matches(str(key), fields, n=1)
                hint = f"; did you mean {prefix}{near[0]}?" if near else ""
                raise ConfigCompositionException(
                    f"config key {name}: not a key of {schema.__name__} (a typo?){hint}"
                )
            if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
                continue
            if isinstance(node[key], DictConfig):
                walk(node[key], f"{name}.")

    walk(cfg, "")
    missing = sorted(OmegaConf.missing_keys(cfg)) if required else []
    if missing:
        raise ConfigCompositionException("; ".join(_required_message(k) for k in missing))


def config_error_message(exc: BaseException) -> str:
    """One line for a config error that Hydra or OmegaConf raised: what both CLIs print before
    exiting 2 (a missing required value, an unknown key, an override grammar error, ...)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    def first_line(e: BaseException) -> str:
        return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)

    key = getattr(exc, "full_key", None)
    if isinstance(exc, MissingMandatoryValue) and key:
        return _required_message(key)
    if isinstance(exc, OverrideParseException):
        return (
            f"cannot parse the override {exc.override!r}: {first_line(exc)} (grammar: "
            "https://hydra.cc/docs/advanced/override_grammar/basic/; quote values with spaces)"
        )
    if isinstance(exc, MissingConfigException):
        options = [o for o in exc.options or () if not o.startswith("base_")]
        return first_line(exc) + (f"; options: {', '.join(options)}" if options else "")
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"config key {cause.full_key}: {first_line(cause)}"
    if key:
        return f"config key {key}: {first_line(exc)}"
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())


def quote_url_overrides(argv: list[str]) -> list[str]:
    """Quote ``source.urls=`` values for Hydra's override grammar, so WebDataset brace patterns
    work as users write them: ``source.urls=/data/train-{000000..000099}.tar``."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "source.urls" and value[:1] not in ("'", '"', "["):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


def multirun_refusal(argv: list[str]) -> str | None:
    """Why a command line that asks Hydra for a multirun (``-m``/``--multirun``, also
    abbreviated, or ``hydra.mode=MULTIRUN``) is refused, None for a single run.

    One command makes one dataset: Hydra's sweeper would write ``multirun.yaml`` into a local
    sweep directory (the working directory, or a local path named after an ``s3://`` output)
    and run the jobs one after another in this process, every job into the same output.dir,
    and a job that stops its process stops the sweep. A loop of commands gives each dataset its
    own output.dir, exit code and resume."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args, _ = get_args_parser().parse_known_args(argv)
    mode = [a.partition("=")[2] for a in args.overrides if a.lstrip("+~").startswith("hydra.mode=")]
    if not args.multirun and not any(m.strip("'\"").upper() == "MULTIRUN" for m in mode):
        return None
    sweeps = [
        a
        for a in args.overrides
        if "," in a.partition("=")[2] and a.partition("=")[0].lstrip("+~") != "source.urls"
    ]
    key, _, values = (sweeps[0] if sweeps else "seed=0,1").partition("=")
    return (
        "multirun (-m) is not supported: one command makes one dataset in its own output.dir; "
        f"run one command per value, e.g. for v in {values.replace(',', ' ')}; do "
        f"diffusion-precompute ... {key.lstrip('+~')}=$v output.dir=out/{key.lstrip('+~')}-$v; "
        "done"
    )
