"""Decoders: one sample's members (``{extension: bytes}``) -> a float32 array, or a
:class:`DecodeError` saying why the sample is bad.

* :class:`ImageDecoder`: JPEG, PNG or WebP -> ``[channels, resolution, resolution]``. Its
  allowed ``channels`` and ``alpha`` are :data:`CHANNELS` and :data:`ALPHA_MODES`, the one
  definition of what ``source.channels`` and ``source.alpha`` may be (:mod:`pipeline.run.config`).
* :class:`ArrayDecoder`: ``.npy`` -> ``[C, ...]`` (``(raw - shift) * scale``, e.g. VAE latents).
* :func:`make_decoder`: the decoder a ``source`` config group describes.

Members come from untrusted shards: nothing is unpickled, ``.npy`` headers are checked before
``np.load(..., allow_pickle=False)`` (object dtypes are refused from the header), images go
through Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) and only its JPEG,
PNG and WebP parsers (:data:`IMAGE_FORMATS`), and a JPEG whose scan ends before its last block
is rejected (libjpeg only warns and fills it with gray). :func:`pipeline.read.source.iter_shard`
calls a decoder per sample and checks its output again (:func:`check_finite`).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from pipeline.run.config import SourceConfig

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # the only parsers Pillow may use (JPEG covers MPO)
CHANNELS = (1, 3, 4)  # ImageDecoder's output channels: L, RGB, RGBA
ALPHA_MODES = ("composite", "drop")  # what ImageDecoder does with transparency (channels < 4)


class DecodeError(ValueError):
    """Raised by decoders for a bad sample: ``what`` failed in ``member`` (an extension) because of
    ``detail``. :meth:`describe` names the member with its sample key, e.g. ``'x.jpg'``."""

    def __init__(self, what: str, member: str | None = None, detail: str = ""):
        self.what, self.member, self.detail = what, member, detail
        super().__init__(self.describe())

    def describe(self, key: str | None = None) -> str:
        text = self.what
        if self.member is not None:
            name = f"{'*' if key is None else key}.{self.member}"
            text += f" in member {name!r}"
        return f"{text}: {self.detail}" if self.detail else text


def _payload(members: dict[str, bytes], exts: tuple[str, ...]) -> tuple[str, bytes]:
    present = [e for e in exts if e in members]
    if not present:
        raise DecodeError(f"no payload: members {sorted(members)}, expected one of {list(exts)}")
    if len(present) > 1:
        raise DecodeError(f"ambiguous payload: members {present} are all payloads")
    return present[0], members[present[0]]


def check_finite(array: np.ndarray) -> None:
    """DecodeError counting NaN and Inf unless every value of ``array`` is finite."""
    if not np.isfinite(array).all():
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise DecodeError(f"non-finite values ({nan} NaN, {inf} Inf)")


# A JPEG scan cut short but followed by a marker (a file whose middle is lost, the end marker
# kept) decodes without error: libjpeg warns "premature end of data segment" (Pillow ignores
# warnings, https://github.com/python-pillow/Pillow/issues/9106) and fills the rest with gray.
# ImageDecoder puts filler bytes where a scan's data ends: a complete scan never uses them (it
# prefetches at most 8 bytes, and libjpeg skips what follows a scan as extraneous data), a cut
# one decodes them. Single scan (baseline): the end marker is replaced by 64 one-bits (0xFF
# stuffed as FF 00), which decode as bad Huffman codes of 17 bits whatever the tables, so a cut
# scan completes at most one more block, then runs out of data and Pillow raises "image file is
# truncated" (a complete scan needs no end marker: Pillow accepts its absence once every row is
# decoded); no extra cost. Several scans (progressive): libjpeg needs the end marker, so the
# image is decoded a second time with varied filler bits before each scan's end marker, and must
# come out identical; a cut that does not change the pixels at the decoded scale (e.g. in the AC
# scans under a 1/8 draft, which decodes DC only) passes. Not detected either: a cut of about
# one block or less at the end of a scan, a corrupt restart interval inside a scan.
_JPEG_FILLER = b"\xff\x00" * 8
_JPEG_PROBE = bytes(range(0x41, 0x41 + 16))
_JPEG_CUT = (
    "the scan data ends before the last block of the image (libjpeg: premature end of data "
    "segment, the rest would be gray): the file was cut or corrupted"
)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not stuffing, RSTn or fill


def _jpeg_scan_ends(data: bytes) -> list[int] | None:
    """Offsets of the markers that end each scan's entropy-coded data, through the first end of
    image (EOI) marker; None unless ``data`` is a JPEG whose markers parse up to an EOI after a
    scan (anything else is left to Pillow to judge). Linear time."""
    if not data.startswith(b"\xff\xd8"):
        return None
    ends, pos, n = [], 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return ends or None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
        else:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            if length < 2:
                return None
            pos += 2 + length
            if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
                found = _SCAN_END.search(data, pos)
                if found is None:
                    return None
                pos = found.start()
                ends.append(pos)
    return None


class ImageDecoder:
    """JPEG/PNG/WebP member -> float32 ``[channels, resolution, resolution]``.

    Steps: EXIF orientation is applied (``ImageOps.exif_transpose``); the mode is converted to
    L (channels=1), RGB (3) or RGBA (4). Alpha (RGBA, LA, PA, P/L/RGB with a transparency key)
    is composited over white (``alpha="composite"``) or dropped (``alpha="drop"``); channels=4
    keeps it. 16-bit modes (I;16*, I) are scaled by 1/257 and F is read on the 0-255 scale
    (Pillow's convention), both without 8-bit quantisation. The centre square (side = the shorter
    side) is resized to ``resolution`` with bicubic filtering in one pass (``resize(box=...)``:
    shorter side to ``resolution`` then centre crop); JPEGs at least twice as large are first
    decoded at reduced scale (``draft``). Values: ``x / 127.5 - 1`` in [-1, 1] when ``normalize``,
    else ``x / 255`` in [0, 1]. Images above ``PIL.Image.MAX_IMAGE_PIXELS`` are rejected.
    """

    payload_exts = ("jpg", "jpeg", "png", "webp")

    def __init__(
        self,
        resolution: int,
        channels: int = 3,
        normalize: bool = True,
        alpha="composite",
        bucketing=None,
    ):
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if channels not in CHANNELS:
            raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
        if alpha not in ALPHA_MODES:
            raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
        self.resolution, self.channels = int(resolution), channels
        self.normalize, self.alpha = normalize, alpha
        self.bucketing = bucketing  # pipeline.read.buckets.Bucketing, or None: the square crop
        self.keyed = bucketing is not None  # called as (members, key) -> (array, conditioning)
        self._fit = None

    def __call__(self, members: dict[str, bytes], key: str | None = None):
        """The decoded array; with bucketing (``keyed``), ``(array, micro-conditioning)`` of the
        sample ``key`` (see :mod:`pipeline.read.buckets`)."""
        self._fit = None
        array = self._read(members, key)
        return (array, self._fit.conditioning()) if self.keyed else array

    def _read(self, members: dict[str, bytes], key: str | None) -> np.ndarray:
        ext, data = _payload(members, self.payload_exts)
        scans = _jpeg_scan_ends(data)
        if scans is not None and len(scans) == 1:
            data = data[: scans[0]] + _JPEG_FILLER  # see _jpeg_scan_ends
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and im.width * im.height > limit:
                    detail = f"{im.width}x{im.height} > MAX_IMAGE_PIXELS={limit}"
                    raise DecodeError("image too large (decompression bomb guard)", ext, detail)
                if self.bucketing is not None:
                    self._fit = self.bucketing.fit(*_oriented_size(im), key)
                draft = self._draft_size(im)
                if draft is not None:  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
                    im.draft(None, draft)
                im.load()
                if scans is not None and len(scans) > 1 and self._scan_cut(im, data, scans, draft):
                    raise DecodeError("truncated JPEG", ext, _JPEG_CUT)
                return self._decode(im)
        except DecodeError:
            raise
        except UnidentifiedImageError as exc:
            detail = f"cannot identify image file (allowed formats {list(IMAGE_FORMATS)})"
            raise DecodeError("undecodable image", ext, detail) from exc
        except OSError as exc:
            if scans is not None and "truncated" in str(exc):  # suspended in the filler
                raise DecodeError("truncated JPEG", ext, _JPEG_CUT) from exc
            raise DecodeError("undecodable image", ext, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # Pillow raises many types on corrupt input
            raise DecodeError("undecodable image", ext, f"{type(exc).__name__}: {exc}") from exc

    def _draft_size(self, im: Image.Image) -> tuple[int, int] | None:
        """The size to ask ``draft`` for: never below ``resolution`` on the shorter side."""
        if self._fit is not None:  # the resized size before the crop, in stored orientation
            rh, rw = self._fit.resized
            need = (rw, rh) if _oriented_size(im) != (im.height, im.width) else (rh, rw)
            if im.height < 2 * need[0] or im.width < 2 * need[1]:
                return None
            return need[1], need[0]
        r, side = self.resolution, min(im.size)
        if side < 2 * r:
            return None
        return math.ceil(im.width * r / side), math.ceil(im.height * r / side)

    @staticmethod
    def _scan_cut(im: Image.Image, data: bytes, scans: list[int], draft) -> bool:
        """A multi-scan (progressive) JPEG: decode it again with filler bytes before the marker
        that ends each scan. A complete scan never reads them (libjpeg skips them as extraneous
        data); a cut one decodes them instead of zeros, so the pixels differ."""
        parts, last = [], 0
        for end in scans:
            parts += [data[last:end], _JPEG_PROBE]
            last = end
        parts.append(data[last:])
        with Image.open(io.BytesIO(b"".join(parts)), formats=IMAGE_FORMATS) as probe:
            if draft is not None:
                probe.draft(None, draft)
            probe.load()
            return probe.tobytes() != im.tobytes()

    def _decode(self, im: Image.Image) -> np.ndarray:
        r = self.resolution
        ImageOps.exif_transpose(im, in_place=True)
        high = im.mode in ("I", "F") or im.mode.startswith("I;16")
        if high:  # one float band on the 0-255 scale
            gray = np.asarray(im, dtype=np.float32)
            im = Image.fromarray(np.clip(gray if im.mode == "F" else gray / 257, 0, 255))
        else:
            im = self._convert(im)
        if self._fit is not None:
            return self._finish(self._bucket(im), high)
        side = min(im.size)
        if im.size != (r, r):
            left, top = (im.width - side) / 2, (im.height - side) / 2
            box = (left, top, left + side, top + side)
            gap = 3.0 if side >= 3 * r else None
            im = im.resize((r, r), Image.Resampling.BICUBIC, box=box, reducing_gap=gap)
        return self._finish(im, high)

    def _bucket(self, im: Image.Image) -> Image.Image:
        """Resize to cover the bucket and crop to it in one pass (``box`` in the decoded image's
        pixels), then the keyed flip."""
        fit = self._fit
        bh, bw = fit.bucket
        box = fit.box(im.height, im.width)
        gap = 3.0 if min(box[2] - box[0], box[3] - box[1]) >= 3 * min(bh, bw) else None
        im = im.resize((bw, bh), Image.Resampling.BICUBIC, box=box, reducing_gap=gap)
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if fit.flipped else im

    def _finish(self, im: Image.Image, high: bool) -> np.ndarray:
        pixels = np.asarray(im, dtype=np.float32).reshape(im.height, im.width, -1)
        if high:
            pixels = np.clip(pixels, 0, 255)  # bicubic overshoot; 8-bit modes are clipped by Pillow
            pixels = np.repeat(pixels, min(self.channels, 3), axis=2)
            if self.channels == 4:
                pixels = np.concatenate([pixels, np.full_like(pixels[..., :1], 255)], axis=2)
        out = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        if self.normalize:
            out /= np.float32(127.5)
            out -= np.float32(1)
        else:
            out /= np.float32(255)
        return out

    def _convert(self, im: Image.Image) -> Image.Image:
        target = {1: "L", 3: "RGB", 4: "RGBA"}[self.channels]
        if "A" in im.getbands() or "transparency" in im.info:
            im = im.convert("RGBA")  # also turns a palette/colour transparency key into alpha
            if self.channels != 4 and self.alpha == "composite":
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255,) * 4), im)
        if im.mode not in ("1", "L", "RGB", "RGBA", target):  # CMYK, P, YCbCr, ...
            im = im.convert("RGBA" if self.channels == 4 else "RGB")
        return im if im.mode == target else im.convert(target)  # RGBA -> RGB/L drops alpha


class ArrayDecoder:
    """``.npy`` member (numeric dtype, ndim >= 1, no zero-size dimension) -> float32 array.

    Values follow the diffusers VAE latent convention: ``(raw - shift) * scale``, computed in
    float32 (SD 1.x/2.x: ``scale=0.18215, shift=0``; SD3/Flux: their scaling and shift factors).
    ``shape``: the expected shape; when None the first valid sample fixes it. The fixed shape is
    per decoder instance and :func:`pipeline.read.source.iter_shard` calls :meth:`reset` at the
    start of each shard, so pass ``shape`` to enforce one shape across shards. Not thread-safe (one
    decoder per thread). Object-dtype (pickled) arrays are refused from the header, before
    ``np.load``.
    """

    payload_exts = ("npy",)

    def __init__(
        self, shape: tuple[int, ...] | None = None, scale: float = 1.0, shift: float = 0.0
    ):
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.scale, self.shift = float(scale), float(shift)
        self.reset()

    def reset(self) -> None:
        """Forget the shape fixed by the first sample (when ``shape`` is None)."""
        self._fixed = self.shape

    def __call__(self, members: dict[str, bytes]) -> np.ndarray:
        ext, data = _payload(members, self.payload_exts)
        fp = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(fp)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = read_header(fp)
        except Exception as exc:
            raise DecodeError("undecodable .npy", ext, f"{type(exc).__name__}: {exc}") from exc
        if dtype.hasobject:
            raise DecodeError("pickled .npy refused", ext, f"dtype {dtype}")
        if dtype.kind not in "biuf" or not shape:
            raise DecodeError("unsupported .npy", ext, f"dtype {dtype}, shape {shape}")
        if 0 in shape:
            raise DecodeError("empty .npy", ext, f"shape {tuple(shape)} has a zero-size dimension")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) - fp.tell() != expected:
            detail = f"{len(data) - fp.tell()} data bytes, header says {expected}"
            raise DecodeError("truncated or padded .npy", ext, detail)
        if self._fixed is not None and tuple(shape) != self._fixed:
            raise DecodeError(f"shape {tuple(shape)} != expected {self._fixed}", ext)
        raw = np.load(io.BytesIO(data), allow_pickle=False)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, rejected below
            array = raw.astype(np.float32, order="C")
            if self.shift != 0.0:
                array -= np.float32(self.shift)
            if self.scale != 1.0:
                array *= np.float32(self.scale)
        check_finite(array)
        if self._fixed is None:
            self._fixed = array.shape
        return array


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) of the image once its EXIF orientation is applied."""
    transposed = im.getexif().get(0x0112) in (5, 6, 7, 8)  # rotated by 90 or 270 degrees
    return (im.width, im.height) if transposed else (im.height, im.width)


def make_decoder(source: SourceConfig, shape: Sequence[int] | None = None, bucketing=None):
    """A fresh decoder for one shard, from the typed ``source`` group (or the composed
    DictConfig; ``shape``: the arrays' expected shape when it is fixed elsewhere than
    ``source.shape``; ``bucketing``: the shard's :class:`pipeline.read.buckets.Bucketing`,
    images only)."""
    if source.kind == "images":
        return ImageDecoder(
            resolution=source.resolution,
            channels=source.channels,
            normalize=source.normalize,
            alpha=source.alpha,
            bucketing=bucketing,
        )
    shape = shape if shape is not None else source.shape
    return ArrayDecoder(
        shape=tuple(shape) if shape is not None else None,
        scale=source.scale,
        shift=source.shift,
    )
