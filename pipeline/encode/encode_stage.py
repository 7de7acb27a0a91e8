"""The VAE encode stage on the actor: the frozen VAE the driver identified
(:mod:`pipeline.encode.encoder`) turns each batch's decoded samples into latents.

:class:`EncodeStage` loads the VAE once (``setup``) from exactly the bytes the driver hashed (read
into memory, verified, deserialized from them: :mod:`pipeline.encode.weights`; a file replaced while
the job runs cannot reach the model), on the device Ray assigned the actor
(:mod:`pipeline.encode.device`), in ``eval`` mode without gradients; then per batch replaces the
samples by :class:`Latent` samples -- the latent distribution's mean and standard deviation, scaled:
``mean' = (mean - shift) * scale``, ``std' = std * scale`` -- and rejects every sample whose latent
is not finite (a float16 overflow). The noise stage then makes ``x_0 = mean' + std' * n``
(``latent=sample``; ``n`` keyed on ``(seed, shard, key, draw)`` in its own domain, drawn on the CPU,
see :meth:`pipeline.noising.noise.KeyedNoise.latent_noise`) or ``x_0 = mean'`` (``latent=mean``).

Samples are encoded in fixed-size device batches (``encoder.batch_size``, the last one padded with
zeros), so a sample's latent does not depend on ``batch_size``, on which other samples share its
batch or on the number of actors: bitwise on one device and build (convolution kernels round
differently for other batch shapes). A GPU too small for ``encoder.batch_size`` lowers it, with a
warning: the records then agree with other runs to float rounding only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.encode.device import synchronize, to_device, to_host
from pipeline.encode.encoder import (
    CONFIG_NAME,
    EncoderError,
    downsampling_factor,
    hub_folder,
    require_diffusers,
)
from pipeline.encode.weights import WeightsError, load_state_dict, read_verified
from pipeline.read.source import Sample
from pipeline.run.stage import Batch, Stage

log = logging.getLogger(__name__)


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
        root, _ = hub_folder(meta["model"], meta["resolved_revision"], meta["subfolder"] or "")
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
    (:mod:`pipeline.encode.weights`; no memory map, so a file replaced while the job runs cannot
    reach the model). Eval mode, no gradients, the decoder dropped (only the encoder half runs)."""
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
# stage's DEVICE_BYTES_PER_ELEMENT (pipeline.encode.memory).
ENCODE_ACTIVATIONS = 8


def encode_bytes_per_sample(config: Mapping, shape: Sequence[int], itemsize: int) -> int:
    """Device memory one sample of input ``shape`` [C, H, W] needs while encoded: the first
    block's activations, and the mid-block attention matrix over the latent's positions."""
    c0 = int(config.get("block_out_channels", (64,))[0])
    pixels = int(shape[1]) * int(shape[2])
    tokens = pixels // downsampling_factor(config) ** 2
    return itemsize * (pixels * c0 * ENCODE_ACTIVATIONS + tokens * tokens)


class EncodeStage(Stage):
    """One actor's VAE: loaded once (:meth:`setup`), then :meth:`process` per batch.

    ``meta`` is the metadata's ``encoder`` entry (the identity the driver hashed, with the
    ``input_shape``); ``on_error`` is the job's: ``fail`` raises SampleError at a non-finite
    latent, ``skip`` rejects the sample. ``gpu_share``: ``ray.gpus_per_actor``; actors sharing a
    GPU (0.25: four) each plan their batch in that share of half its free memory."""

    def __init__(self, meta: Mapping, *, on_error: str = "skip", gpu_share: float = 1.0):
        self.meta, self.on_error, self.gpu_share = meta, on_error, gpu_share
        self.dtype = meta["dtype"]
        self.scale = float(meta["scaling_factor"])
        self.shift = float(meta["shift_factor"])
        self.batch_size = int(meta["batch_size"])
        self.vae, self.device = None, None

    def setup(self, device) -> None:
        import torch

        meta = self.meta
        self.device = device
        self.vae = load_vae(fetch_model(meta), meta, self.dtype, device)
        if device.type == "cuda":
            from pipeline.encode.memory import fit_batch_size

            itemsize = torch.finfo(getattr(torch, self.dtype)).bits // 8
            per = encode_bytes_per_sample(self.vae.config, meta["input_shape"], itemsize)
            free, _ = torch.cuda.mem_get_info(device)
            share = min(1.0, self.gpu_share) if self.gpu_share > 0 else 1.0
            self.batch_size = fit_batch_size(self.batch_size, per, free, fraction=0.5 * share)
            if self.batch_size < meta["batch_size"]:
                log.warning(
                    "encoder.batch_size %d does not fit in the GPU's free memory: using %d (the "
                    "latents then differ from other runs at float rounding)",
                    meta["batch_size"], self.batch_size,
                )  # fmt: skip

    def process(self, batch: Batch) -> Batch:
        """The batch's samples as :class:`Latent` (conditioning kept), in order; samples whose
        latent is not finite are rejected."""
        samples = batch.samples
        x = np.stack([s.array for s in samples])
        out, bad, reasons = [], [], []
        for lo in range(0, len(samples), self.batch_size):
            chunk = samples[lo : lo + self.batch_size]
            mean, std, finite = self._encode(x[lo : lo + len(chunk)])
            n_bad = int((~finite).sum())
            for i, s in enumerate(chunk):
                out.append(Latent(s.key, s.index, mean[i], std[i], cond=s.cond))
                if not finite[i]:
                    bad.append(lo + i)
                    reasons.append(self._reason(x[lo + i], n_bad, len(chunk)))
            if n_bad:
                log.warning("shard %s: %d of %d latents not finite", batch.shard, n_bad, len(chunk))
        return replace(batch, samples=out).reject(bad, reasons, self.on_error)

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

        k = len(x)
        if k < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - k, *x.shape[1:]), x.dtype)])
        with torch.inference_mode():
            xd = to_device(torch.from_numpy(np.ascontiguousarray(x)), self.device)
            dist = self.vae.encode(xd.to(self.vae.dtype)).latent_dist
            mean, std = dist.mean[:k].float(), dist.std[:k].float()
            finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
            mean = (mean - self.shift) * self.scale
            std = std * self.scale
            mean_h, std_h, finite_h = to_host(mean), to_host(std), to_host(finite)
            synchronize(self.device)
        return mean_h.numpy(), std_h.numpy(), finite_h.numpy()
