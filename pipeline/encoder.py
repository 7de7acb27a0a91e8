"""Latent records: a frozen VAE (diffusers ``AutoencoderKL``) encodes the samples before noising.

``encoder=vae encoder.model=<hub id | folder | URL>`` turns every decoded image (or ``[C, H, W]``
array with pixel values in [-1, 1]) into a latent, and the records are the forward process on
that latent. Three parts:

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
* **The stage** (:class:`EncodeStage`), one per actor: loads the VAE once from exactly the bytes
  the driver hashed (read into memory, verified, deserialized from them: :mod:`pipeline.weights`;
  a file replaced while the job runs cannot reach the model), on the GPU Ray assigned the actor or
  the CPU, in ``eval`` mode without gradients; then per batch returns :class:`Latent` samples --
  the latent distribution's mean and standard deviation, scaled: ``mean' = (mean - shift) *
  scale``, ``std' = std * scale`` -- and a reject row for every sample whose latent is not finite
  (a float16 overflow). The noise stage then makes ``x_0 = mean' + std' * n`` (``latent=sample``;
  ``n`` keyed on ``(seed, shard, key, draw)`` in its own domain, drawn on the CPU, see
  :meth:`pipeline.noise.KeyedNoise.latent_noise`) or ``x_0 = mean'`` (``latent=mean``).

Samples are encoded in fixed-size device batches (``encoder.batch_size``, the last one padded with
zeros), so a sample's latent does not depend on ``batch_size``, on which other samples share its
batch or on the number of actors: bitwise on one device and build (convolution kernels round
differently for other batch shapes). A GPU too small for ``encoder.batch_size`` lowers it, with a
warning: the records then agree with other runs to float rounding only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .source import Sample
from .weights import WeightsError, check_safetensors, load_state_dict, read_verified

log = logging.getLogger(__name__)

ENCODER_CLASS = "diffusers.AutoencoderKL"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EncoderError(ValueError):
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


# -- the model folder and its hashes -------------------------------------------------------------


@dataclass(frozen=True)
class ModelFolder:
    """Where the model's files are: ``folder`` (a local path or an fsspec URL) and how it was
    found (``location``: local | remote | hub; for the Hub the snapshot's commit)."""

    location: str
    folder: str
    resolved_revision: str | None = None

    def fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.folder)

    def display(self, name: str | None = None) -> str:
        return self.folder if name is None else posixpath.join(self.folder, name)


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
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        try:
            root, commit = _hub_snapshot(model, revision, sub)
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


@lru_cache(maxsize=16)
def _hub_snapshot(model: str, revision: str | None, sub: str) -> tuple[str, str]:
    """(local snapshot folder, commit) of a Hub repo: config.json and safetensors weights only.

    Cached per process: the driver hashes once per job, not at every manifest write."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise EncoderError(f"encoder.model={model} is a Hub id: {INSTALL_HINT}") from exc
    prefix = f"{sub}/" if sub else ""
    patterns = [prefix + n for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME)]
    patterns.append(prefix + "diffusion_pytorch_model-*.safetensors")  # shards of an index
    try:
        root = snapshot_download(repo_id=model, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        raise EncoderError(
            f"encoder.model={model} (revision {revision or 'main'}): cannot fetch it from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc}); without network, download it "
            f"beforehand (hf download {model}) or give a local folder"
        ) from exc
    return root, posixpath.basename(str(root).rstrip("/"))


_FILE_HASHES: dict = {}  # (protocol, path, size, mtime or etag) -> sha256, per process


def file_sha256(fs, path: str) -> str:
    """sha256 of a file of an fsspec filesystem, cached per process by (path, size, mtime)."""
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("etag")
    key = (str(fs.protocol), path, info.get("size"), str(stamp)) if stamp is not None else None
    if key is not None and key in _FILE_HASHES:
        return _FILE_HASHES[key]
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if key is not None:
        _FILE_HASHES[key] = digest
    return digest


def weight_files(names: Sequence[str], read_index, where: str) -> list[str]:
    """The safetensors files diffusers loads from a folder with these file ``names``:
    ``diffusion_pytorch_model.safetensors``, or the index and its shards. ``read_index()``
    returns the index JSON. Pickled weights alone are refused, naming the file and the fix."""
    names = set(names)
    if WEIGHTS_NAME in names:
        return [WEIGHTS_NAME]
    if INDEX_NAME in names:
        shards = sorted(set(json.loads(read_index())["weight_map"].values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise EncoderError(f"{where}: {INDEX_NAME} lists {missing[0]}, which is missing")
        return [INDEX_NAME, *shards]
    pickled = sorted(n for n in names if n.endswith(PICKLED_SUFFIXES))
    if pickled:
        raise EncoderError(
            f"{posixpath.join(where, pickled[0])}: pickled weights are refused (unpickling can run "
            "arbitrary code); only safetensors are loaded. Convert them once, in an environment "
            "you trust: AutoencoderKL.from_pretrained(folder, use_safetensors=False)"
            ".save_pretrained(folder) writes diffusion_pytorch_model.safetensors"
        )
    other = sorted(n for n in names if n.endswith(".safetensors"))
    found = f" (found {', '.join(other)}: variants such as .fp16 are not loaded)" if other else ""
    raise EncoderError(f"{where}: no {WEIGHTS_NAME}{found}")


def read_folder(mf: ModelFolder) -> tuple[dict, str, dict[str, str]]:
    """(config.json as a dict, its sha256, {weights file: sha256}) of a model folder."""
    fs, root = mf.fs()
    try:
        listing = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise EncoderError(f"encoder model folder {mf.display()} does not exist") from None
    names = [posixpath.basename(str(p).rstrip("/")) for p in listing]
    if CONFIG_NAME not in names:
        hint = (
            " (a pipeline repo: set encoder.subfolder=vae)" if "model_index.json" in names else ""
        )
        raise EncoderError(
            f"{mf.display()}: no {CONFIG_NAME}, not a diffusers model folder{hint}; expected "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    with fs.open(posixpath.join(root, CONFIG_NAME), "rb") as f:
        raw = f.read()
    config = json.loads(raw)
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise EncoderError(
            f"{mf.display(CONFIG_NAME)} describes a {cls}, not an AutoencoderKL"
            + (" (a pipeline repo: set encoder.subfolder=vae)" if cls.endswith("Pipeline") else "")
        )

    def read_index() -> bytes:
        with fs.open(posixpath.join(root, INDEX_NAME), "rb") as f:
            return f.read()

    files = weight_files(names, read_index, mf.display())
    weights = {n: file_sha256(fs, posixpath.join(root, n)) for n in files}
    for n in files:  # a damaged file is refused here, on the driver, before any actor starts
        if n.endswith(".safetensors"):
            try:
                check_safetensors(fs, posixpath.join(root, n), mf.display(n))
            except WeightsError as exc:
                raise EncoderError(str(exc)) from None
    return config, hashlib.sha256(raw).hexdigest(), weights


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


# -- on the actor: fetch, verify, load, encode ----------------------------------------------------


def fetch_model(meta: Mapping) -> str:
    """A local folder holding exactly the files the driver hashed (``meta``: the metadata's
    ``encoder`` entry). A Hub model is fetched at the driver's commit; a remote folder is copied
    to a local cache; a local folder must be visible at the same path on this node. The hashes
    are verified when the files are loaded (:func:`load_vae`)."""
    import os
    import socket
    import tempfile

    loc = meta["location"]
    if loc == "hub":
        root, _ = _hub_snapshot(meta["model"], meta["resolved_revision"], meta["subfolder"] or "")
        folder = os.path.join(root, meta["subfolder"]) if meta["subfolder"] else root
    elif loc == "remote":
        tag = hashlib.sha256(json.dumps(meta["weights_sha256"], sort_keys=True).encode())
        folder = os.path.join(
            tempfile.gettempdir(), "diffusion-precompute-vae", f"{meta['config_sha256'][:16]}-"
            f"{tag.hexdigest()[:16]}",
        )  # fmt: skip
        _copy_verified(meta, folder)
    else:
        folder = meta["folder"]
        if not os.path.isdir(folder):
            raise EncoderError(
                f"encoder folder {folder} does not exist on node {socket.gethostname()}: put the "
                "model where every node sees it (a shared filesystem, s3://..., or a Hub id)"
            )
    for name in (CONFIG_NAME, *meta["weights_sha256"]):
        if not os.path.exists(os.path.join(folder, name)):
            raise EncoderError(
                f"{os.path.join(folder, name)} is missing on node {socket.gethostname()}: every "
                "node must see the same model files"
            )
    return folder


def _copy_verified(meta: Mapping, folder: str) -> None:
    """Copy a remote model folder's hashed files into ``folder`` (atomic renames)."""
    import os
    import uuid

    import fsspec

    os.makedirs(folder, exist_ok=True)
    fs, root = fsspec.core.url_to_fs(meta["folder"])
    for name in (CONFIG_NAME, *meta["weights_sha256"]):
        dest = os.path.join(folder, name)
        if os.path.exists(dest):
            continue
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        fs.get_file(posixpath.join(root, name), tmp)
        os.replace(tmp, dest)


TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def load_vae(folder: str, meta: Mapping, dtype: str, device):
    """The VAE of ``folder`` on ``device``, built from exactly the files the driver hashed
    (``meta``: the metadata's ``encoder`` entry, its ``config_sha256`` and ``weights_sha256``):
    config and safetensors read into memory once, verified, and loaded from those bytes
    (:mod:`pipeline.weights`; no memory map, so a file replaced while the job runs cannot reach
    the model). Eval mode, no gradients, the decoder dropped (only the encoder half runs)."""
    import socket

    import torch

    require_diffusers()
    from diffusers import AutoencoderKL
    from diffusers.models.modeling_utils import no_init_weights

    try:
        config = json.loads(read_verified(f"{folder}/{CONFIG_NAME}", meta["config_sha256"]))
        state = load_state_dict(folder, meta["weights_sha256"])
    except WeightsError as exc:
        raise EncoderError(f"on node {socket.gethostname()}: {exc}") from None
    with no_init_weights():
        vae = AutoencoderKL.from_config(config)
    vae._fix_state_dict_keys_on_load(state)  # diffusers' renames of deprecated attention keys
    vae.load_state_dict(state, strict=True)
    del state
    vae.decoder = None  # half the parameters; encode() does not use them
    vae.post_quant_conv = None
    vae.eval().requires_grad_(False)
    return vae.to(device=device, dtype=getattr(torch, TORCH_DTYPES[dtype]))


@dataclass(frozen=True, eq=False)
class Latent(Sample):
    """A sample's latent distribution, scaled: ``array`` = (mean - shift) * scale, ``std`` =
    std * scale (the noise stage draws ``x_0`` from them)."""

    std: np.ndarray | None = None


# Device bytes per input pixel and first-block channel while a sample is encoded (activations of
# a resnet block and GroupNorm temporaries, in the encoder dtype): an overestimate, like the noise
# stage's DEVICE_BYTES_PER_ELEMENT (pipeline.memory).
ENCODE_ACTIVATIONS = 8


def encode_bytes_per_sample(config: Mapping, shape: Sequence[int], itemsize: int) -> int:
    """Device memory one sample of input ``shape`` [C, H, W] needs while encoded: the first
    block's activations, and the mid-block attention matrix over the latent's positions."""
    c0 = int(config.get("block_out_channels", (64,))[0])
    pixels = int(shape[1]) * int(shape[2])
    tokens = pixels // downsampling_factor(config) ** 2
    return itemsize * (pixels * c0 * ENCODE_ACTIVATIONS + tokens * tokens)


class EncodeStage:
    """One actor's VAE: built once (setup), then :meth:`process` per batch of samples.

    ``meta`` is the metadata's ``encoder`` entry (the identity the driver hashed, with the
    ``input_shape``); ``on_error`` is the job's: ``fail`` raises SampleError at a non-finite
    latent, ``skip`` rejects the sample. ``gpu_share``: ``ray.gpus_per_actor``; actors sharing a
    GPU (0.25: four) each plan their batch in that share of half its free memory."""

    def __init__(self, meta: Mapping, *, device, on_error: str = "skip", gpu_share: float = 1.0):
        import torch

        self.meta, self.device, self.on_error = meta, device, on_error
        self.dtype = meta["dtype"]
        self.scale = float(meta["scaling_factor"])
        self.shift = float(meta["shift_factor"])
        self.vae = load_vae(fetch_model(meta), meta, self.dtype, device)
        self.batch_size = int(meta["batch_size"])
        if device.type == "cuda":
            from .memory import fit_batch_size

            itemsize = torch.finfo(getattr(torch, self.dtype)).bits // 8
            per = encode_bytes_per_sample(self.vae.config, meta["input_shape"], itemsize)
            free, _ = torch.cuda.mem_get_info(device)
            share = min(1.0, gpu_share) if gpu_share > 0 else 1.0
            self.batch_size = fit_batch_size(self.batch_size, per, free, fraction=0.5 * share)
            if self.batch_size < meta["batch_size"]:
                log.warning(
                    "encoder.batch_size %d does not fit in the GPU's free memory: using %d (the "
                    "latents then differ from other runs at float rounding)",
                    meta["batch_size"], self.batch_size,
                )  # fmt: skip

    def process(self, shard: str, batch: Sequence[Sample]) -> tuple[list[Latent], list[dict]]:
        """The batch's latents, in order, and reject rows for samples whose latent is not finite."""
        from .stages import reject_row

        x = np.stack([s.array for s in batch])
        out, rejects = [], []
        for lo in range(0, len(batch), self.batch_size):
            chunk = batch[lo : lo + self.batch_size]
            mean, std, finite = self._encode(x[lo : lo + len(chunk)])
            bad = int((~finite).sum())
            for i, s in enumerate(chunk):
                if finite[i]:
                    keep = {"cond": s.cond} if hasattr(s, "cond") else {}  # conditioning
                    out.append(Latent(s.key, s.index, mean[i], std[i], **keep))
                    continue
                reason = self._reason(x[lo + i], bad, len(chunk))
                if self.on_error == "fail":
                    from .source import SampleError

                    raise SampleError(
                        f"shard {shard} key {s.key!r}: {reason}",
                        key=s.key,
                        index=s.index,
                        reason=reason,
                    )
                rejects.append(reject_row(shard, s.key, s.index, reason))
            if bad:
                log.warning("shard %s: %d of %d latents not finite", shard, bad, len(chunk))
        return out, rejects

    def _reason(self, x: np.ndarray, bad: int, n: int) -> str:
        reason = f"latent not finite (NaN/inf from the VAE at encoder.dtype={self.dtype})"
        if self.dtype != "float32" and 2 * bad > n:
            return (
                f"{reason}; {bad} of {n} samples of its batch overflowed in {self.dtype}: use "
                "encoder.dtype=float32, or a VAE fixed for half precision (e.g. "
                "madebyollin/sdxl-vae-fp16-fix)"
            )
        amax = float(np.max(np.abs(x))) if np.isfinite(x).all() else float("inf")
        return f"{reason}; input max |x| = {amax:.3g} (pixel values belong in [-1, 1])"

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scaled mean, scaled std, finite mask) of ``x`` [k, C, H, W], k <= batch_size, in one
        forward pass of exactly ``batch_size`` samples (zero padding)."""
        import torch

        from .stages import _to_device, _to_host

        k = len(x)
        if k < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - k, *x.shape[1:]), x.dtype)])
        with torch.inference_mode():
            xd = _to_device(torch.from_numpy(np.ascontiguousarray(x)), self.device)
            dist = self.vae.encode(xd.to(self.vae.dtype)).latent_dist
            mean, std = dist.mean[:k].float(), dist.std[:k].float()
            finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
            mean = (mean - self.shift) * self.scale
            std = std * self.scale
            mean_h, std_h, finite_h = _to_host(mean), _to_host(std), _to_host(finite)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        return mean_h.numpy(), std_h.numpy(), finite_h.numpy()
