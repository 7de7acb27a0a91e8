"""Model weights loaded from exactly the bytes that were hashed: never a memory map of a file that
can change under a running job.

A model's identity is the sha256 of its files (the driver hashes them, the metadata names them).
Memory-mapping a safetensors file after hashing it would let a file replaced later (``cp`` over
it while the job runs) feed the model other weights than the ones the metadata names. So every
model the project loads -- the VAE, text encoders -- goes through :func:`load_state_dict`: each
file is read into memory once, those bytes are hashed and compared with the expected sha256, and
the tensors are deserialized from the same bytes (``safetensors.torch.load``). Pickled formats
are never read.

:func:`check_safetensors` is the cheap start-up check of a file on the driver (any fsspec
filesystem, only the header is read): a file cut short, or one that is not safetensors, is
refused in one line naming it before any actor starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

from pipeline.errors import UsageError

SAFETENSORS = ".safetensors"
HEADER_LIMIT = 100 << 20  # safetensors' own cap on the JSON header


class WeightsError(UsageError):
    """A model file is not the one expected or is damaged; the message names the file and fix."""


def read_verified(path: str, sha256: str) -> bytes:
    """The bytes of the local file ``path``, read once, whose sha256 is ``sha256``; WeightsError
    naming the file when they differ (the file changed since it was hashed)."""
    with open(path, "rb") as f:
        data = f.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise WeightsError(
            f"{path}: sha256 {got[:12]} != {sha256[:12]}, the hash this job's metadata names: the "
            "file changed since the job started (replaced or rewritten); rerun the job with the "
            "model files left unchanged while it runs"
        )
    return data


def load_state_dict(folder: str, expected: Mapping[str, str]) -> dict:
    """The tensors of the safetensors files of ``folder`` named in ``expected`` (file name ->
    sha256; other entries such as a shard index are verified too, not loaded), in memory and
    from exactly the hashed bytes. WeightsError names a file that differs or is damaged."""
    import safetensors.torch

    state: dict = {}
    for name, sha in expected.items():
        path = os.path.join(folder, name)
        data = read_verified(path, sha)
        if not name.endswith(SAFETENSORS):
            continue
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # SafetensorError derives from Exception only
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from exc
        state.update(tensors)
        del data
    return state


def check_safetensors(fs, path: str, display: str | None = None) -> None:
    """WeightsError naming ``path`` when its safetensors header does not describe the file: cut
    short, padded, or not safetensors at all. Reads only the header (8-byte length + JSON)
    through the fsspec filesystem ``fs``."""
    where = display or path
    size = fs.info(path)["size"]
    with fs.open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > HEADER_LIMIT or 8 + n > size:
            raise WeightsError(
                f"{where}: not a valid safetensors file ({size} bytes, header length {n}): "
                "damaged or cut short; download or copy it again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise WeightsError(f"{where}: not a valid safetensors file (header: {exc})") from exc
    data = size - 8 - n
    if max(ends, default=0) != data:
        raise WeightsError(
            f"{where}: damaged safetensors file: its header describes {max(ends, default=0)} "
            f"bytes of tensors, the file holds {data} (cut short or padded); download or copy "
            "it again"
        )
