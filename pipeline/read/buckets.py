"""Aspect-ratio buckets: every image at its own shape, with SDXL's size and crop conditioning.

``source.buckets`` (images only):

* ``null`` (the default): the square crop of :class:`pipeline.read.decoders.ImageDecoder`, records
  unchanged;
* ``auto``: the grid SDXL and kohya's sd-scripts use (:func:`auto_grid`): height and width
  multiples of ``source.bucket_step``, area at most ``source.resolution ** 2``, aspect ratio within
  ``source.max_aspect`` each way;
* an explicit list of ``[H, W]`` pairs.

An image of ``h x w`` goes to the bucket whose aspect ratio is closest in log ratio
(:meth:`Grid.assign`), is resized to cover it (:func:`cover`: the smallest size at the image's
aspect that holds the bucket) and cropped to it: ``source.crop=center`` or ``random``;
``source.flip=none`` or ``random`` mirrors it horizontally. Random crops and flips are keyed on
``(seed, shard, key)`` like eps (BLAKE2b with its own personalisation, :func:`keyed_choice`), so
reruns, actor counts and batch sizes give the same records.

Each record carries the micro-conditioning of diffusers' SDXL pipeline (:data:`COLUMNS`):
``original_size`` [H, W] of the decoded image, ``crop_top_left`` [y, x] in the resized image's
pixels (``crops_coords_top_left``), ``target_size`` [H, W] (the bucket) and ``flipped``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.output.contracts import CommitMarker
    from pipeline.run.config import SourceConfig

CROPS = ("center", "random")
FLIPS = ("none", "random")
# The micro-conditioning columns (declared in pipeline.output.records' registry): name -> Arrow type
# name
COLUMNS = {
    "original_size": "int32[2]",
    "crop_top_left": "int32[2]",
    "target_size": "int32[2]",
    "flipped": "bool",
}
_PERSON = b"ddpm-bucket-crop"  # BLAKE2b personalisation: independent of eps and latent draws


def auto_grid(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """SDXL/kohya buckets: for every width ``W`` (a multiple of ``step``) the tallest ``H`` (a
    multiple of ``step``) with ``H * W <= resolution ** 2``, kept when ``max(H/W, W/H) <=
    max_aspect``; sorted by aspect ratio H/W. Always holds the square (``resolution`` rounded
    down to ``step``) when ``resolution >= step``."""
    area = resolution * resolution
    out = set()
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        if max(h / w, w / h) <= max_aspect:
            out.add((h, w))
    return sorted(out, key=lambda hw: (hw[0] / hw[1], hw[0]))


@dataclass(frozen=True)
class Grid:
    """The configured buckets, ``[(H, W), ...]`` sorted by aspect ratio H/W."""

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def from_source(cls, source: SourceConfig) -> Grid | None:
        """The grid the typed ``source`` group (or the composed DictConfig) describes; None when
        buckets are off (or the group has none: arrays)."""
        spec = _buckets(source)
        if spec is None:
            return None
        if spec == "auto":
            sizes = auto_grid(source.resolution, source.bucket_step, source.max_aspect)
        else:
            sizes = [(int(h), int(w)) for h, w in spec]
        return cls(tuple(sorted(set(sizes), key=lambda hw: (hw[0] / hw[1], hw[0]))))

    @property
    def log_ratios(self) -> np.ndarray:
        return np.array([math.log(h / w) for h, w in self.sizes])

    def assign(self, height: int, width: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is closest to ``height / width`` in log ratio (ties: the
        first, the grid being sorted by ratio)."""
        gap = np.abs(self.log_ratios - math.log(height / width))
        return self.sizes[int(np.argmin(gap))]

    def half_step(self) -> float:
        """Half the largest gap between neighbouring log ratios: an image's assignment error
        |log(h/w) - log(H/W)| never exceeds it inside the grid's range."""
        r = np.sort(self.log_ratios)
        return float(np.max(np.diff(r)) / 2) if len(r) > 1 else math.inf

    def describe(self) -> list[list[int]]:
        return [[h, w] for h, w in self.sizes]


def cover(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size ``(rh, rw)`` an ``height x width`` image is resized to before its crop: the
    image's aspect scaled so both sides cover the bucket (``rh >= H``, ``rw >= W``, one of them
    equal)."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bh, round(height * scale)), max(bw, round(width * scale))


def keyed_choice(seed: int, shard: str, key: str) -> tuple[float, float, bool]:
    """Two uniform numbers in [0, 1) (the crop's y and x) and a coin (the flip), a pure function
    of the sample's identity (BLAKE2b, 53-bit fractions)."""
    msg = "\x1f".join(str(p) for p in (seed, shard, key)).encode("utf-8")
    d = hashlib.blake2b(msg, digest_size=24, person=_PERSON).digest()
    u = [(int.from_bytes(d[i : i + 8], "little") >> 11) * 2.0**-53 for i in (0, 8)]
    return u[0], u[1], bool(d[16] & 1)


@dataclass(frozen=True)
class Fit:
    """Where one image lands: ``bucket`` (H, W), the ``resized`` size (rh, rw), the crop's
    ``top_left`` (y, x) in resized pixels and whether it is ``flipped``."""

    original: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]
    top_left: tuple[int, int]
    flipped: bool

    def conditioning(self) -> dict:
        """The micro-conditioning columns of this image (see :data:`COLUMNS`)."""
        return {
            "original_size": list(self.original),
            "crop_top_left": list(self.top_left),
            "target_size": list(self.bucket),
            "flipped": self.flipped,
        }

    def box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The crop as a (left, top, right, bottom) box in the pixels of an ``height x width``
        image of the same content (the decoded one, or a JPEG draft of it)."""
        (rh, rw), (y, x), (bh, bw) = self.resized, self.top_left, self.bucket
        sy, sx = height / rh, width / rw
        return x * sx, y * sy, (x + bw) * sx, (y + bh) * sy


@dataclass(frozen=True)
class Bucketing:
    """One shard's bucketing: the ``grid``, ``crop`` and ``flip`` modes, keyed on ``seed`` and
    ``shard``."""

    grid: Grid
    crop: str = "center"
    flip: str = "none"
    seed: int = 0
    shard: str = ""

    @classmethod
    def from_source(cls, source: SourceConfig, seed: int = 0, shard: str = "") -> Bucketing | None:
        """The bucketing of the typed ``source`` group (or the composed DictConfig) for one
        shard; None when buckets are off."""
        grid = Grid.from_source(source)
        if grid is None:
            return None
        return cls(grid, source.crop, source.flip, seed, shard)

    def fit(self, height: int, width: int, key: str) -> Fit:
        """Where the image ``key`` of size ``height x width`` lands (pure: same inputs, same
        fit)."""
        bucket = self.grid.assign(height, width)
        rh, rw = cover(height, width, bucket)
        uy, ux, coin = keyed_choice(self.seed, self.shard, key)
        if self.crop == "random":
            y, x = int(uy * (rh - bucket[0] + 1)), int(ux * (rw - bucket[1] + 1))
        else:
            y, x = (rh - bucket[0]) // 2, (rw - bucket[1]) // 2
        flipped = self.flip == "random" and coin
        return Fit((height, width), bucket, (rh, rw), (y, x), flipped)


def config_problems(source: SourceConfig, patch: int | None = None) -> list[tuple[str, str]]:
    """(config key, message) for each bad bucket setting of the typed ``source`` group (or the
    composed DictConfig); ``patch``: the pixel size of one latent cell of the encoder (its
    downsampling factor), when there is one."""
    spec = _buckets(source)
    if spec is None:
        return []
    if source.kind != "images":
        return [("source.buckets", "buckets apply to source=images only; set it to null")]
    out = []
    step, aspect = source.bucket_step, source.max_aspect
    if step < 1:
        out.append(("source.bucket_step", f"must be >= 1, got {step}"))
    if aspect < 1:
        out.append(("source.max_aspect", f"must be >= 1 (each way), got {aspect}"))
    if source.crop not in CROPS:
        out.append(("source.crop", f"must be one of {CROPS}, got {source.crop!r}"))
    if source.flip not in FLIPS:
        out.append(("source.flip", f"must be one of {FLIPS}, got {source.flip!r}"))
    if out:
        return out
    if isinstance(spec, str):
        if spec != "auto":
            return [("source.buckets", f"must be null, auto or a list of [H, W], got {spec!r}")]
        if not auto_grid(source.resolution, step, aspect):
            return [("source.buckets", f"auto makes no bucket: source.resolution="
                     f"{source.resolution} is below source.bucket_step={step}")]  # fmt: skip
        sizes = auto_grid(source.resolution, step, aspect)
    else:
        pairs = list(spec) if isinstance(spec, Sequence) else []
        if not pairs or not all(_is_pair(p) for p in pairs):
            return [("source.buckets", f"must be null, auto or a non-empty list of [H, W] with "
                     f"positive integers, got {spec!r}")]  # fmt: skip
        sizes = [(int(h), int(w)) for h, w in pairs]
    if patch is not None:
        bad = [list(s) for s in sizes if s[0] % patch or s[1] % patch]
        if bad:
            key = "source.bucket_step" if spec == "auto" else "source.buckets"
            out.append((key, f"buckets {bad[:4]} are not multiples of the encoder's {patch}-pixel "
                        "latent cell: the latent would not be a whole number of cells; use a step "
                        f"that is a multiple of {patch}"))  # fmt: skip
    return out


def _buckets(source: SourceConfig):
    """``source.buckets``; None for a group without the key (:class:`ArraysSource`)."""
    return getattr(source, "buckets", None)


def _is_pair(p) -> bool:
    try:
        h, w = p
    except (TypeError, ValueError):
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))


def file_suffix(bucket: Sequence[int]) -> str:
    """``[H, W]`` -> ``"HxW"``: the bucket part of a data file's name,
    ``<shard>.<H>x<W>.parquet``."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


# -- storage: one file per (shard, bucket) --------------------------------------------------------

BUCKET_FILE = re.compile(r"^(?P<shard>.+)\.(?P<h>\d+)x(?P<w>\d+)\.parquet$")


def describe_buckets(source: SourceConfig, sample_shape=None) -> list[dict] | None:
    """The metadata's ``buckets`` entry: ``[{"size": [H, W], "shape": [C, ...]}, ...]`` in grid
    order, the record shape of each bucket (``sample_shape([C, H, W]) -> shape``: the encoder's
    latent shape; default the pixels themselves); None when buckets are off."""
    grid = Grid.from_source(source)
    if grid is None:
        return None
    out = []
    for h, w in grid.sizes:
        pixels = [int(source.channels), h, w]
        shape = pixels if sample_shape is None else sample_shape(pixels)
        out.append({"size": [h, w], "shape": [int(s) for s in shape]})
    return out


def largest_shape(buckets: Sequence[Mapping]) -> list[int]:
    """The sample shape of most elements among ``buckets`` (:func:`describe_buckets`): what a
    worker plans its memory for."""
    return list(max((b["shape"] for b in buckets), key=lambda s: (math.prod(s), list(s))))


def data_names_by_shard(names, shards) -> dict[str, list[str]]:
    """Of the file ``names`` of an output directory, the data files of each of ``shards``: its
    ``<shard>.parquet`` and its bucket files ``<shard>.<H>x<W>.parquet`` (one pass over
    ``names``). A name that is the plain data file of one shard (``a.64x64`` beside ``a``) is
    that shard's."""
    shards = set(shards)
    out: dict[str, list[str]] = {}
    for n in sorted(names):
        if n.endswith(".parquet") and n[: -len(".parquet")] in shards:
            out.setdefault(n[: -len(".parquet")], []).append(n)
            continue
        m = BUCKET_FILE.match(n)
        if m is not None and m["shard"] in shards:
            out.setdefault(m["shard"], []).append(n)
    return out


def bucket_table(markers: Mapping[str, CommitMarker], buckets: Sequence[Mapping]) -> list[dict]:
    """The manifest's bucket table: per configured bucket (``buckets``: the metadata's entry) its
    ``size`` [H, W], record ``shape``, ``records`` and ``files`` over the committed shards'
    markers (``markers``: shard id -> :class:`~pipeline.output.contracts.CommitMarker`, each listing
    its ``files``)."""
    rows = {tuple(b["size"]): {**b, "records": 0, "files": 0} for b in buckets}
    for marker in markers.values():
        for f in marker.files or ():
            row = rows.setdefault(
                tuple(f.bucket),
                {"size": list(f.bucket), "shape": f.shape, "records": 0, "files": 0},
            )
            row["records"] += int(f.records or 0)
            row["files"] += 1
    return [rows[k] for k in sorted(rows, key=lambda hw: (hw[0] / hw[1], hw[0]))]
