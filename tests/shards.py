"""Builders of tiny WebDataset shards for tests (import as ``from shards import ...`` or
``from tests.shards import ...``, depending on how the test modules are imported).

Keys are ``f"{key_prefix}{i:06d}"``; tars are written with the standard ``tarfile`` module,
mtime 0 and members in the given order, so a shard's bytes depend only on the arguments.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]], compress: str = "") -> Path:
    """Write ``(name, bytes)`` members in order, duplicates and odd layouts included.

    ``compress``: ``""``, ``"gz"``, ``"bz2"`` or ``"xz"``. Returns the path."""
    path = Path(path)
    with tarfile.open(path, f"w:{compress}") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def encode_image(image: Image.Image, fmt: str = "png", **save_kw) -> bytes:
    """``image`` encoded as ``fmt`` (png, jpeg, webp, gif, ...)."""
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower())
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **save_kw)
    return buf.getvalue()


def npy_bytes(array, allow_pickle: bool = False) -> bytes:
    """``array`` in ``.npy`` format (``allow_pickle=True`` to build object arrays)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def random_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Uniform noise image of ``size = (width, height)``, converted to ``mode``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_image_shard(
    path: str | Path,
    n: int,
    size: tuple[int, int] = (40, 30),
    mode: str = "RGB",
    fmt: str = "png",
    seed: int = 0,
    key_prefix: str = "s",
    extras: Mapping[str, bytes] | None = None,
) -> list[str]:
    """``n`` noise images (sample ``i`` uses seed ``seed + i``) as ``<key>.<fmt>`` members, each
    followed by the ``extras`` members (``{"cls": b"3"}`` -> ``<key>.cls``). Returns the keys."""
    keys = [f"{key_prefix}{i:06d}" for i in range(n)]
    members = []
    for i, key in enumerate(keys):
        members.append((f"{key}.{fmt}", encode_image(random_image(size, mode, seed + i), fmt)))
        members += [(f"{key}.{ext}", data) for ext, data in (extras or {}).items()]
    write_tar(path, members)
    return keys


def array_samples(
    n: int,
    shape: tuple[int, ...] = (4, 8, 8),
    dtype: str = "float32",
    seed: int = 0,
    key_prefix: str = "s",
) -> dict[str, np.ndarray]:
    """``{key: standard normal array}``: the content :func:`write_array_shard` writes."""
    rng = np.random.default_rng(seed)
    return {f"{key_prefix}{i:06d}": rng.standard_normal(shape).astype(dtype) for i in range(n)}


def write_array_shard(
    path: str | Path,
    n: int,
    shape: tuple[int, ...] = (4, 8, 8),
    dtype: str = "float32",
    seed: int = 0,
    key_prefix: str = "s",
    extras: Mapping[str, bytes] | None = None,
) -> list[str]:
    """``n`` ``.npy`` samples with the arrays of :func:`array_samples`. Returns the keys."""
    members = []
    for key, array in array_samples(n, shape, dtype, seed, key_prefix).items():
        members.append((f"{key}.npy", npy_bytes(array)))
        members += [(f"{key}.{ext}", data) for ext, data in (extras or {}).items()]
    write_tar(path, members)
    return [name[:-4] for name, _ in members if name.endswith(".npy")]


def flip_an_x_t_sign(path) -> None:
    """Flip the sign bit of one x_t value of a committed Parquet file in place (tensor columns
    are stored uncompressed): the file keeps its size and stays readable, one value differs."""
    import pyarrow.parquet as pq

    values = pq.read_table(path, columns=["x_t"]).column(0).combine_chunks().storage.flatten()
    raw = values.to_numpy(zero_copy_only=False)[:16].tobytes()
    data = bytearray(Path(path).read_bytes())
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "x_t's first values not found once in the file"
    data[at + len(raw) // 16 - 1] ^= 0x80  # the first value's high byte (little-endian): its sign
    Path(path).write_bytes(bytes(data))
