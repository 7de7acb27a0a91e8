"""Latent records: a frozen VAE (diffusers ``AutoencoderKL``) encodes the samples before noising.

``encoder=vae encoder.model=<hub id | folder | URL>`` turns every decoded image (or ``[C, H, W]``
array with pixel values in [-1, 1]) into a latent, and the records are the forward process on
that latent. Two parts here, the third on the actors:

* **Identity, on the driver, without loading the model** (:func:`describe_encoder`): the model
  folder (diffusers layout: ``config.json`` and ``diffusion_pytorch_model.safetensors``, or a
  sharded ``.safetensors.index.json``) is resolved -- a local folder, an fsspec URL (``s3://...``)
  or a Hub id through ``huggingface_hub.snapshot_download`` (only these files are fetched) -- and
  ``config.json`` and every weights file are hashed (sha256). The identity goes into every file's
  metadata (``encoder``), the manifest and the config hash: another VAE, or other weights, cannot
  be written into an existing output dir (the config-hash refusal of
  :mod:`pipeline.precompute`). The hash covers the contents (config and weight hashes, scaling,
  dtype, latent mode), not where the files were read from: the same files moved to another folder
  make the same records. Pickled weights (``.bin``, ``.ckpt``, ...) are refused, and so is a
  damaged safetensors file (its header must describe the file: one line naming it, exit 2).
* **Shape** (:func:`latent_shape`): ``[latent_channels, H / f, W / f]`` with the downsampling
  factor ``f = 2 ** (len(block_out_channels) - 1)`` read from ``config.json`` (8 for the Stable
  Diffusion family; never assumed).
* **The stage** runs on the actors (:mod:`pipeline.encode.encode_stage`): it loads the VAE from
  exactly the bytes hashed here and turns each batch into latents.

Everything here runs on the driver without torch or the model.
"""

from __future__ import annotations

import importlib.util
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.encode.modelfiles import (
    CONFIG_NAME,
    ModelFilesError,
    ModelFolder,
    hash_weights,
    hub_snapshot,
    is_hub_id,
    subfolder_patterns,
    weight_files,
)

log = logging.getLogger(__name__)

ENCODER_CLASS = "diffusers.AutoencoderKL"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
KINDS = ("none", "vae")
LATENT_MODES = ("sample", "mean")
ENCODER_DTYPES = ("float32", "float16", "bfloat16")
INSTALL_HINT = "pip install diffusion-precompute[vae]"
LATENT_GENERATOR = (
    "blake2b(seed,shard,key,draw; person=ddpm-latent) -> numpy Philox4x64 standard_normal float32"
)
# Fields of the identity that say where the files were read, not what they are: left out of the
# config hash (the weight and config hashes identify the model). batch_size changes the latents
# at float rounding only, like ``batch_size`` of the job.
LOCATION_FIELDS = ("model", "location", "folder", "revision", "resolved_revision", "subfolder")
UNHASHED_FIELDS = (*LOCATION_FIELDS, "batch_size")


class EncoderError(ModelFilesError):
    """The encoder cannot be used as configured; the message names the model, path and fix."""


def enabled(cfg) -> bool:
    """True when the config selects an encoder (``encoder=vae``)."""
    enc = cfg.get("encoder") if hasattr(cfg, "get") else None
    return enc is not None and enc.get("kind", "none") != "none"


def require_diffusers() -> None:
    """EncoderError naming the extra to install when diffusers or safetensors is missing."""
    missing = [m for m in ("diffusers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise EncoderError(
            f"encoder=vae needs {' and '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )


# -- the model folder and its hashes (pipeline.encode.modelfiles) ----------------------------------

HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, "diffusion_pytorch_model-*.safetensors")
CONVERT = "AutoencoderKL.from_pretrained(folder, use_safetensors=False).save_pretrained(folder)"


def locate(model: str, revision: str | None = None, subfolder: str | None = None) -> ModelFolder:
    """Resolve ``encoder.model``: an existing local folder, an fsspec URL (``s3://...``), or a
    Hugging Face Hub id (``owner/name``, fetched or found in the Hub cache). ``subfolder`` is
    appended (``vae`` for a pipeline repo)."""
    from pathlib import Path

    if not model:
        raise EncoderError("config key encoder.model: required with encoder=vae")
    sub = (subfolder or "").strip("/")
    if model.startswith("file://"):
        model = model[len("file://") :]
    if "://" in model:
        folder = model.rstrip("/") + (f"/{sub}" if sub else "")
        return ModelFolder("remote", folder)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelFolder("local", str((path / sub).resolve() if sub else path.resolve()))
    if is_hub_id(model):
        try:
            root, commit = hub_folder(model, revision, sub)
        except EncoderError as exc:  # owner/name may also have been meant as a relative folder
            raise EncoderError(
                f"encoder.model={model}: no such local folder ({path.resolve()}), and as a "
                f"Hugging Face Hub id: {str(exc).split(': ', 1)[-1]}"
            ) from exc
        return ModelFolder("hub", str(Path(root) / sub) if sub else str(root), commit)
    raise EncoderError(
        f"encoder.model={model}: no such folder, and not a Hugging Face Hub id (owner/name); "
        "give a folder in diffusers layout (config.json + diffusion_pytorch_model.safetensors)"
    )


def hub_folder(model: str, revision: str | None, sub: str) -> tuple[str, str]:
    """(local snapshot folder, commit) of a Hub repo: config.json and safetensors weights only
    (:func:`pipeline.encode.modelfiles.hub_snapshot`, cached per process)."""
    try:
        return hub_snapshot(model, revision, subfolder_patterns(sub, HUB_FILES))
    except ImportError as exc:
        raise EncoderError(f"encoder.model={model} is a Hub id: {INSTALL_HINT}") from exc
    except Exception as exc:
        raise EncoderError(
            f"encoder.model={model} (revision {revision or 'main'}): cannot fetch it from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc}); without network, download it "
            f"beforehand (hf download {model}) or give a local folder"
        ) from exc


def read_folder(mf: ModelFolder) -> tuple[dict, str, dict[str, str]]:
    """(config.json as a dict, its sha256, {weights file: sha256}) of a model folder."""
    try:
        fs, root, names = mf.listing("encoder model")
        if CONFIG_NAME not in names:
            hint = (
                " (a pipeline repo: set encoder.subfolder=vae)"
                if "model_index.json" in names
                else ""
            )
            raise EncoderError(
                f"{mf.display()}: no {CONFIG_NAME}, not a diffusers model folder{hint}; expected "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        config, config_sha = mf.read_config(fs, root)
        cls = config.get("_class_name", "AutoencoderKL")
        if cls != "AutoencoderKL":
            raise EncoderError(
                f"{mf.display(CONFIG_NAME)} describes a {cls}, not an AutoencoderKL"
                + (
                    " (a pipeline repo: set encoder.subfolder=vae)"
                    if cls.endswith("Pipeline")
                    else ""
                )
            )

        def read_index() -> bytes:
            with fs.open(posixpath.join(root, INDEX_NAME), "rb") as f:
                return f.read()

        files = weight_files(names, WEIGHTS_NAME, read_index, mf.display(), CONVERT)
        return config, config_sha, hash_weights(mf, fs, root, files)
    except ModelFilesError as exc:
        raise EncoderError(str(exc)) from None


# -- identity and shape --------------------------------------------------------------------------


def downsampling_factor(config: Mapping) -> int:
    """Spatial downsampling of an AutoencoderKL: one halving per block after the first."""
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


def latent_shape(config: Mapping, input_shape: Sequence[int]) -> list[int]:
    """The latent shape ``[latent_channels, H / f, W / f]`` of an input ``[C, H, W]``, from the
    model's ``config.json``; EncoderError when the input does not fit the model."""
    c_in, c_lat = int(config.get("in_channels", 3)), int(config.get("latent_channels", 4))
    f = downsampling_factor(config)
    shape = [int(s) for s in input_shape]
    if len(shape) != 3:
        raise EncoderError(
            f"the VAE encodes [C, H, W] pixel arrays; the source gives samples of shape {shape}"
        )
    if shape[0] != c_in:
        raise EncoderError(
            f"the VAE takes {c_in}-channel input (in_channels={c_in} in its config.json), the "
            f"source gives {shape[0]} channels: use source.channels={c_in} for images, or arrays "
            f"[{c_in}, H, W] with pixel values in [-1, 1]"
        )
    if shape[1] % f or shape[2] % f:
        raise EncoderError(
            f"input {shape[1]}x{shape[2]} is not a multiple of the VAE's downsampling factor {f} "
            f"(2 ** (len(block_out_channels) - 1)): set source.resolution to a multiple of {f}"
        )
    return [c_lat, shape[1] // f, shape[2] // f]


def input_shape(identity: Mapping, shape: Sequence[int]) -> list[int]:
    """The input ``[C, H, W]`` whose latent has ``shape`` (the inverse of :func:`latent_shape`)."""
    f = int(identity["downsampling_factor"])
    return [int(identity["in_channels"]), *(int(s) * f for s in shape[1:])]


@dataclass(frozen=True)
class EncoderIdentity:
    """What the records of ``encoder=vae`` were made with (see :meth:`describe`)."""

    model: str
    folder: ModelFolder
    revision: str | None
    subfolder: str | None
    config: dict = field(repr=False)
    config_sha256: str = ""
    weights_sha256: dict = field(default_factory=dict)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    dtype: str = "float32"
    latent: str = "sample"
    store_dist: bool = False
    batch_size: int = 16
    input: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The ``encoder`` entry of every file's metadata and of the manifest."""
        return {
            "class": ENCODER_CLASS,
            "model": self.model,
            "location": self.folder.location,
            "folder": self.folder.folder,
            "revision": self.revision,
            "resolved_revision": self.folder.resolved_revision,
            "subfolder": self.subfolder,
            "config_sha256": self.config_sha256,
            "weights_sha256": dict(self.weights_sha256),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "dtype": self.dtype,
            "latent": self.latent,
            "store_dist": self.store_dist,
            "batch_size": self.batch_size,
            "in_channels": int(self.config.get("in_channels", 3)),
            "latent_channels": int(self.config.get("latent_channels", 4)),
            "downsampling_factor": downsampling_factor(self.config),
            "input": dict(self.input),
            "latent_generator": LATENT_GENERATOR,
        }


def hashed_identity(described: Mapping) -> dict:
    """The part of :meth:`EncoderIdentity.describe` that enters the config hash: what the model
    is (class, config and weight hashes) and how it is used, not where it was read from."""
    return {k: v for k, v in described.items() if k not in UNHASHED_FIELDS}


def summary(described: Mapping | None) -> str:
    """One line naming an encoder (for the refusal of another encoder in an output dir)."""
    if not described:
        return "no encoder"
    rev = described.get("resolved_revision") or described.get("revision")
    name = str(described.get("model")) + (f"@{rev}" if rev else "")
    if described.get("subfolder"):
        name += f" subfolder {described['subfolder']}"
    weights = ",".join(v[:12] for v in described.get("weights_sha256", {}).values())
    return (
        f"{name} (weights sha256 {weights}, config sha256 "
        f"{str(described.get('config_sha256'))[:12]}, {described.get('dtype')}, "
        f"latent={described.get('latent')}, scale {described.get('scaling_factor')}, "
        f"shift {described.get('shift_factor')})"
    )


def describe_encoder(cfg) -> EncoderIdentity:
    """Resolve and hash the configured VAE (driver side: no model load, no torch)."""
    enc, src = cfg.encoder, cfg.source
    require_diffusers()
    mf = locate(enc.model, enc.revision, enc.subfolder)
    config, config_sha, weights = read_folder(mf)
    scale = enc.scaling_factor
    if scale is None:
        scale = config.get("scaling_factor") or 0.18215  # diffusers' default when unset
    shift = enc.shift_factor
    if shift is None:
        shift = config.get("shift_factor") or 0.0
    if enc.dtype != "float32" and config.get("force_upcast"):
        log.warning(
            "encoder.dtype=%s: %s's config sets force_upcast (it overflows in half precision); "
            "expect rejected samples, or use encoder.dtype=float32",
            enc.dtype, enc.model,
        )  # fmt: skip
    if src.kind == "images":
        source = {"kind": "images", "resolution": int(src.resolution), "crop": "center"}
    else:
        source = {"kind": "arrays", "crop": None}
    return EncoderIdentity(
        model=str(enc.model),
        folder=mf,
        revision=enc.revision,
        subfolder=enc.subfolder,
        config=config,
        config_sha256=config_sha,
        weights_sha256=weights,
        scaling_factor=float(scale),
        shift_factor=float(shift),
        dtype=enc.dtype,
        latent=enc.latent,
        store_dist=bool(enc.store_dist),
        batch_size=int(enc.batch_size),
        input=source,
    )


ACTOR_NAMES = ("EncodeStage", "Latent", "fetch_model", "load_vae")


def __getattr__(name: str):
    """The actor's names, still importable from here (they live in
    :mod:`pipeline.encode.encode_stage`, which is loaded only when one is asked for)."""
    if name in ACTOR_NAMES:
        from pipeline.encode import encode_stage

        return getattr(encode_stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
