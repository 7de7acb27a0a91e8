"""Model folders and their identity, for every frozen model a job loads (the VAE, the text
encoders).

A model is a folder of files: a local path, an fsspec URL (``s3://...``) or a Hugging Face Hub
snapshot (:func:`hub_snapshot`: only the files asked for are fetched). Its identity is the sha256
of its ``config.json`` and of every safetensors file its library loads (:func:`weight_files`,
:func:`hash_weights`): that goes into the metadata and the config hash, so other weights cannot be
written into an existing output dir, and the actors load exactly the bytes hashed here
(:mod:`pipeline.encode.weights`). Pickled weights are refused, and so is a damaged safetensors file.

Driver side: nothing here imports torch or loads a model. Errors are :class:`ModelFilesError`; a
caller turns them into its own (``EncoderError``, ``TextError``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pipeline.encode.weights import WeightsError, check_safetensors
from pipeline.errors import UsageError

CONFIG_NAME = "config.json"
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelFilesError(UsageError):
    """A model folder cannot be used; the message names the file and the fix."""


def is_hub_id(model: str) -> bool:
    """True for a Hugging Face Hub id (``owner/name``), not a relative path (``./a/b``)."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "~"))


@dataclass(frozen=True)
class ModelFolder:
    """Where a model's files are: ``folder`` (a local path or an fsspec URL) and how it was
    found (``location``: local | remote | hub; for the Hub the snapshot's commit)."""

    location: str
    folder: str
    resolved_revision: str | None = None

    def fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.folder)

    def display(self, name: str | None = None) -> str:
        return self.folder if name is None else posixpath.join(self.folder, name)

    def listing(self, what: str) -> tuple:
        """(filesystem, root, {file name}) of the folder; ``what`` names it in the error."""
        fs, root = self.fs()
        try:
            listing = fs.ls(root, detail=False)
        except FileNotFoundError:
            raise ModelFilesError(f"{what} folder {self.display()} does not exist") from None
        return fs, root, {posixpath.basename(str(p).rstrip("/")) for p in listing}

    def read_config(self, fs, root) -> tuple[dict, str]:
        """(``config.json`` parsed, its sha256)."""
        with fs.open(posixpath.join(root, CONFIG_NAME), "rb") as f:
            raw = f.read()
        return json.loads(raw), hashlib.sha256(raw).hexdigest()


@lru_cache(maxsize=32)
def hub_snapshot(model: str, revision: str | None, patterns: tuple[str, ...]) -> tuple[str, str]:
    """(local snapshot folder, commit) of a Hub repo, only the files matching ``patterns``.

    Cached per process: the driver hashes once per job, not at every manifest write. The errors
    of ``huggingface_hub`` pass through: the caller names the config key."""
    from huggingface_hub import snapshot_download

    root = snapshot_download(repo_id=model, revision=revision, allow_patterns=list(patterns))
    return root, posixpath.basename(str(root).rstrip("/"))


def subfolder_patterns(sub: str, names: Iterable[str]) -> tuple[str, ...]:
    """Hub ``allow_patterns`` for ``names`` inside the subfolder ``sub`` ('' for the root)."""
    prefix = f"{sub}/" if sub else ""
    return tuple(prefix + n for n in names)


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


def weight_files(
    names: Iterable[str],
    weights_name: str,
    read_index: Callable[[], bytes],
    where: str,
    convert: str,
) -> list[str]:
    """The safetensors files a library loads from a folder with these file ``names``:
    ``weights_name``, or its ``.index.json`` and the shards it lists (``read_index()`` returns
    the index). Pickled weights alone are refused, naming the file and ``convert`` (how to write
    ``weights_name`` from them)."""
    names = set(names)
    index_name = weights_name + ".index.json"
    if weights_name in names:
        return [weights_name]
    if index_name in names:
        shards = sorted(set(json.loads(read_index())["weight_map"].values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise ModelFilesError(f"{where}: {index_name} lists {missing[0]}, which is missing")
        return [index_name, *shards]
    pickled = sorted(n for n in names if n.endswith(PICKLED_SUFFIXES))
    if pickled:
        raise ModelFilesError(
            f"{posixpath.join(where, pickled[0])}: pickled weights are refused (unpickling can run "
            f"arbitrary code); only safetensors are loaded. Convert them once, in an environment "
            f"you trust: {convert} writes {weights_name}"
        )
    other = sorted(n for n in names if n.endswith(".safetensors"))
    found = f" (found {', '.join(other)}: variants such as .fp16 are not loaded)" if other else ""
    raise ModelFilesError(f"{where}: no {weights_name}{found}")


def hash_weights(mf: ModelFolder, fs, root: str, files: Sequence[str]) -> dict[str, str]:
    """{file: sha256} of a model's weight ``files``; a damaged safetensors file is refused here,
    on the driver, before any actor starts."""
    for n in files:
        if n.endswith(".safetensors"):
            try:
                check_safetensors(fs, posixpath.join(root, n), mf.display(n))
            except WeightsError as exc:
                raise ModelFilesError(str(exc)) from None
    return {n: file_sha256(fs, posixpath.join(root, n)) for n in files}
