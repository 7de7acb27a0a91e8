"""Reading WebDataset shards: untrusted tar streams in, validated float32 arrays out.

:func:`iter_shard` opens one shard with ``webdataset.gopen`` (local paths, ``file://``,
``pipe:cmd`` and the schemes of ``webdataset.gopen_schemes``, e.g. ``gs://`` via gsutil; other
schemes such as ``s3://`` go to ``fsspec``), reads it in one pass with ``tarfile`` and groups
consecutive members by key as WebDataset does (``webdataset.tariterators.base_plus_ext``: the key
is the path up to the first dot of the basename, the extension the rest, lowercased). It yields a
:class:`Sample` or :class:`Reject` per group, in tar order; ``index`` counts both, and every item
has a key, so a shard's samples = records / draws + rejects. A member that belongs to no sample
(no extension, or a name too long to split) is a Reject of its own, keyed by its name.

Shards are untrusted: nothing is unpickled (WebDataset's decoders are not used), a sample with a
pickle-type member (:data:`PICKLE_EXTS`) is rejected, ``.npy`` headers are checked before
``np.load(..., allow_pickle=False)``, images go through Pillow's decompression-bomb limit and
only its JPEG, PNG and WebP parsers, and a JPEG whose scan ends before its last block is
rejected (libjpeg only warns and fills it with gray). What one shard may cost is bounded
(:class:`ReadLimits`): a member above ``max_member_bytes`` (as its header declares it, so a
sparse or gzip-bombed member is never read into memory) or with a name above ``max_name_bytes``
is a Reject; compressed shards are inflated in bounded steps; tar headers are parsed in linear
time and bounded memory; reading and decoding a shard may take at most ``shard_timeout_s``.
Hard links, symbolic links, devices and FIFOs are rejected (never followed); directories and
``__*__`` names are skipped. A key that is not valid UTF-8 rejects its sample (keys are hashed
and stored as UTF-8), named with its bytes escaped.

A bad sample is a :class:`Reject` (``on_error="skip"``) or a :class:`SampleError`
(``on_error="fail"``). A broken stream (cannot open; truncated or corrupt tar, gzip, bz2 or xz;
I/O error; ``pipe:`` command exiting non-zero; ``shard_timeout_s`` exceeded, then the subclass
:class:`ShardTimeoutError`) raises :class:`ShardReadError` after the samples read before the
fault. The group being read at the fault is yielded too, unless the fault struck inside one of
its members. Tar iteration is strict where ``tarfile`` (and so WebDataset's
``tar_file_iterator``) silently stops: a stream cut at a member boundary or in a header, or a
corrupt header, is an error; only the end-of-archive zero block ends a shard. So a 0-byte file
raises ShardReadError, while a tar without members yields nothing.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import math
import os
import re
import shlex
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import webdataset
from PIL import Image, ImageOps, UnidentifiedImageError
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import base_plus_ext

ON_ERROR = ("skip", "fail")
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # the only parsers Pillow may use (JPEG covers MPO)

# Defaults of ReadLimits and of the config keys source.max_member_bytes, source.shard_timeout_s.
# 256 MiB: far above any realistic sample member (a 100-megapixel camera JPEG is ~50 MB, a float32
# latent 16x128x128 is 1 MiB, a 4x1024x1024 one 16 MiB), low enough that a worker holding one
# member plus its decoded copies stays within a few GiB.
MAX_MEMBER_BYTES = 256 * 2**20
# 1024 bytes: 4x a path component's limit on Linux (NAME_MAX 255); WebDataset keys are sample ids,
# far shorter. base_plus_ext's regex is quadratic in the slashes of a name: ~10 ms at 1024 bytes,
# seconds at 40k, ~40 min at 10^6.
MAX_NAME_BYTES = 1024
# 1 hour: a shard of ~10k samples reads and decodes in minutes on one core.
SHARD_TIMEOUT_S = 3600.0
# Not configurable: tar metadata that no real sample tar comes near.
MAX_HEADER_BYTES = 2**20  # a pax extended header or GNU long name/link (real ones: a path, xattrs)
MAX_SPARSE_SEGMENTS = 2**16  # data segments in one sparse member's map
_CHUNK = 2**20  # members are read, skipped and inflated in steps of this many bytes


@dataclass(frozen=True)
class ReadLimits:
    """What reading one shard may cost (see the module docstring).

    ``max_member_bytes``: a larger tar member (by its header's size; for a sparse member its full
    size with the holes) is not read: its sample is rejected. ``max_name_bytes``: a longer member
    name (UTF-8 bytes) is not split into key and extension: the member is a Reject of its own.
    ``shard_timeout_s``: seconds the source may spend reading and decoding one shard (time spent
    by the consumer between items is not counted), checked between members, between read steps
    of a member and before each sample is decoded; then :class:`ShardReadError`. ``None``: no
    bound. Not bounded by it: one blocking read of the underlying stream (a stalled pipe or
    network read) and one decode call (each is bounded in work by the other limits and by
    ``PIL.Image.MAX_IMAGE_PIXELS``).
    """

    max_member_bytes: int = MAX_MEMBER_BYTES
    max_name_bytes: int = MAX_NAME_BYTES
    shard_timeout_s: float | None = SHARD_TIMEOUT_S

    def __post_init__(self):
        for name in ("max_member_bytes", "max_name_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        timeout = self.shard_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(f"shard_timeout_s must be > 0 or None, got {timeout!r}")

    @classmethod
    def from_source(cls, source: Mapping) -> ReadLimits:
        """The limits of a ``source`` config group (keys absent from it keep their defaults)."""
        return cls(**{f.name: source[f.name] for f in fields(cls) if f.name in source})


@dataclass(frozen=True, eq=False)  # eq=False: identity comparison, arrays have no truth value
class Sample:
    key: str  # the WebDataset __key__
    index: int  # 0-based ordinal among all groups (samples and rejects) of the shard, tar order
    array: np.ndarray  # float32, C-contiguous, [C, H, W] for images, [C, ...] for arrays
    # kept members, {column: value or None} (pipeline.conditioning); keyword-only, so that
    # subclasses may add positional fields
    cond: dict = field(default_factory=dict, kw_only=True)


@dataclass(frozen=True)
class Reject:
    key: str  # the sample key; for a member of no sample, its name (see _groups)
    index: int  # as Sample.index
    reason: str


class SampleError(ValueError):
    """A bad sample under ``on_error="fail"``; attributes ``url``, ``key``, ``index``, ``reason``."""

    def __init__(self, message: str, *, url=None, key=None, index=None, reason=None):
        super().__init__(message)  # args == (message,): picklable, so it crosses Ray actors
        self.url, self.key, self.index, self.reason = url, key, index, reason


class ShardReadError(IOError):
    """The shard could not be opened or its stream broke; attributes ``url`` and ``member`` (the
    tar member being read at the fault, if any)."""

    def __init__(self, message: str, *, url=None, member=None):
        super().__init__(message)
        self.url, self.member = url, member


class ShardTimeoutError(ShardReadError):
    """Reading and decoding the shard took more than ``ReadLimits.shard_timeout_s`` (a
    ShardReadError like any stream fault; retrying it is likely to time out again)."""


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


def _check_finite(array: np.ndarray) -> None:
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
        self, resolution: int, channels: int = 3, normalize: bool = True, alpha="composite"
    ):
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if channels not in (1, 3, 4):
            raise ValueError(f"channels must be one of (1, 3, 4), got {channels!r}")
        if alpha not in ("composite", "drop"):
            raise ValueError(f"alpha must be one of ('composite', 'drop'), got {alpha!r}")
        self.resolution, self.channels = int(resolution), channels
        self.normalize, self.alpha = normalize, alpha

    def __call__(self, members: dict[str, bytes]) -> np.ndarray:
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
        side = min(im.size)
        if im.size != (r, r):
            left, top = (im.width - side) / 2, (im.height - side) / 2
            box = (left, top, left + side, top + side)
            gap = 3.0 if side >= 3 * r else None
            im = im.resize((r, r), Image.Resampling.BICUBIC, box=box, reducing_gap=gap)
        pixels = np.asarray(im, dtype=np.float32).reshape(r, r, -1)
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
    per decoder instance and :func:`iter_shard` calls :meth:`reset` at the start of each shard, so
    pass ``shape`` to enforce one shape across shards. Not thread-safe (one decoder per thread).
    Object-dtype (pickled) arrays are refused from the header, before ``np.load``.
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
        _check_finite(array)
        if self._fixed is None:
            self._fixed = array.shape
        return array


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, made strict and bounded for untrusted streams.

    Strict: tarfile ends an archive silently at an empty, truncated or invalid header after the
    first member (a shard cut at a member boundary, a corrupt header): raise instead. Only a zero
    block (the end-of-archive marker) ends it. Bounded: a GNU long name/link or pax extended
    header above :data:`MAX_HEADER_BYTES` is skipped unread, and a malformed pax header ignored
    (its member gets a ``problem``); pax records are parsed in linear time (CPython < 3.11.10
    backtracks quadratically and keeps a copy per bogus record, CVE-2024-6232); a sparse map
    above :data:`MAX_SPARSE_SEGMENTS` entries is a corrupt header (ShardReadError).
    ``problem``: why the member must be rejected, found while parsing its headers.
    """

    problem: str | None = None

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:  # tarfile turns this one into ReadError
            raise tarfile.SubsequentHeaderError(f"bad tar header: {exc}") from None

    def _next_header(self, tar) -> _StrictTarInfo:
        try:
            following = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        following.offset = self.offset
        return following

    def _skip_oversized(self, tar, what: str) -> tuple[_StrictTarInfo, bytes]:
        """Skip this header's data but its first MAX_HEADER_BYTES; the next member, flagged."""
        head = _read_exact(tar.fileobj, MAX_HEADER_BYTES)
        _discard(tar.fileobj, self._block(self.size) - MAX_HEADER_BYTES)
        following = self._next_header(tar)
        following.problem = (
            f"{what} of {self.size} bytes (more than {MAX_HEADER_BYTES}) precedes the member"
        )
        return following, head

    def _proc_gnulong(self, tar):
        if self.size <= MAX_HEADER_BYTES:
            return super()._proc_gnulong(tar)
        link = self.type == tarfile.GNUTYPE_LONGLINK
        following, head = self._skip_oversized(tar, f"GNU long {'link ' if link else ''}name")
        value = tarfile.nts(head, tar.encoding, tar.errors)  # cut: the member is rejected
        if link:
            following.linkname = value
        else:
            following.name = value
        return following

    def _proc_pax(self, tar):
        if self.size > MAX_HEADER_BYTES:
            return self._skip_oversized(tar, "pax extended header")[0]
        buf = _read_exact(tar.fileobj, self._block(self.size))[: self.size]
        try:
            records = _pax_records(buf)
        except tarfile.HeaderError as exc:  # its extent is known: the stream is still in step
            following = self._next_header(tar)
            following.problem = f"a bad pax extended header ({exc}) precedes the member"
            return following
        global_ = self.type == tarfile.XGLTYPE
        pax_headers = tar.pax_headers if global_ else tar.pax_headers.copy()
        for keyword, value in records:
            if keyword == b"hdrcharset":
                pax_headers["hdrcharset"] = value.decode("utf-8", "replace")
        encoding = tar.encoding if pax_headers.get("hdrcharset") == "BINARY" else "utf-8"
        offsets, sizes = [], []  # GNU sparse 0.0 repeats these two keywords
        for raw_keyword, raw_value in records:
            keyword = self._decode_pax_field(raw_keyword, "utf-8", "utf-8", tar.errors)
            if keyword in tarfile.PAX_NAME_FIELDS:
                value = self._decode_pax_field(raw_value, encoding, tar.encoding, tar.errors)
            else:
                value = self._decode_pax_field(raw_value, "utf-8", "utf-8", tar.errors)
            pax_headers[keyword] = value
            if keyword in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                (offsets if keyword == "GNU.sparse.offset" else sizes).append(_pax_int(value))
        following = self._next_header(tar)
        sparse_version = (pax_headers.get("GNU.sparse.major"), pax_headers.get("GNU.sparse.minor"))
        if "GNU.sparse.map" in pax_headers:  # GNU sparse 0.1
            numbers = [_pax_int(x) for x in pax_headers["GNU.sparse.map"].split(",")]
            following.sparse = list(zip(numbers[::2], numbers[1::2]))
        elif "GNU.sparse.size" in pax_headers:  # GNU sparse 0.0
            following.sparse = list(zip(offsets, sizes))
        elif sparse_version == ("1", "0"):
            self._proc_gnusparse_10(following, pax_headers, tar)
        if not global_:
            following._apply_pax_info(pax_headers, tar.encoding, tar.errors)
            if "size" in pax_headers:  # the next header is after the size the pax header says
                offset = following.offset_data
                if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                    offset += following._block(following.size)
                tar.offset = offset
        return following

    def _proc_gnusparse_10(self, following, pax_headers, tar):
        """GNU sparse 1.0: the map is text at the start of the member's data."""
        numbers, buf, count = [], b"", None
        while count is None or len(numbers) < 2 * count:
            while b"\n" not in buf:
                if len(buf) > 64:
                    raise tarfile.SubsequentHeaderError("bad GNU sparse map: a number too long")
                block = tar.fileobj.read(tarfile.BLOCKSIZE)
                if not block:
                    raise tarfile.ReadError("unexpected end of data in a GNU sparse map")
                buf += block
            line, buf = buf.split(b"\n", 1)
            if count is None:
                count = _pax_int(line)
                _check_sparse_count(count)
            else:
                numbers.append(_pax_int(line))
        following.offset_data = tar.fileobj.tell()
        following.sparse = list(zip(numbers[::2], numbers[1::2]))

    def _proc_sparse(self, tar):
        """Old GNU sparse: the map is in the header and in extension blocks of 21 entries."""
        structs, extended, size = self._sparse_structs
        del self._sparse_structs
        while extended:
            _check_sparse_count(len(structs) + 21)
            buf = _read_exact(tar.fileobj, tarfile.BLOCKSIZE)
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            extended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + self._block(self.size)
        self.size = size
        return self


def _check_sparse_count(count: int) -> None:
    if not 0 <= count <= MAX_SPARSE_SEGMENTS:
        msg = f"GNU sparse map of {count} entries (at most {MAX_SPARSE_SEGMENTS} are read)"
        raise tarfile.SubsequentHeaderError(msg)


def _pax_int(text) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise tarfile.SubsequentHeaderError(f"bad number in a pax or sparse header: {text!r:.40}")
    return value


def _pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """(keyword, value) of the ``"<length> <keyword>=<value>\\n"`` records of a pax header, in
    order, in linear time; parsing stops where no length prefix follows (the NUL padding)."""
    records, pos = [], 0
    while True:
        match = _PAX_LENGTH.match(buf, pos)
        if match is None:
            return records
        end = pos + int(match.group(1))
        keyword, equals, value = buf[match.end() : end - 1].partition(b"=")
        if end > len(buf) or end - pos < 5 or not keyword or not equals or buf[end - 1] != 0x0A:
            raise tarfile.InvalidHeaderError(f"bad record at byte {pos}")
        records.append((keyword, value))
        pos = end


_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


def _read_exact(fileobj, size: int, budget: _Budget | None = None) -> bytes:
    """``size`` bytes of ``fileobj``, read in steps of at most :data:`_CHUNK` (the deadline is
    checked between steps); ReadError if the stream ends first."""
    if size <= _CHUNK:
        data = fileobj.read(size) if size > 0 else b""
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        return data
    parts, left = [], size
    while left > 0:
        part = fileobj.read(min(left, _CHUNK))
        if not part:
            raise tarfile.ReadError("unexpected end of data")
        parts.append(part)
        left -= len(part)
        if budget is not None:
            budget.check()
    return b"".join(parts)


def _discard(fileobj, size: int, budget: _Budget | None = None) -> None:
    """Read and drop ``size`` bytes in bounded steps; stop quietly where the stream ends (tarfile
    reports it when it looks for the next header)."""
    while size > 0:
        part = fileobj.read(min(size, _CHUNK))
        if not part:
            return
        size -= len(part)
        if budget is not None:
            budget.check()


class _ShardTimeout(Exception):
    pass


class _Budget:
    """Time the source spends on one shard: running, not suspended at a ``yield``."""

    def __init__(self, limit: float | None):
        self.limit, self.spent, self.since = limit, 0.0, time.monotonic()

    def pause(self) -> None:
        self.spent += time.monotonic() - self.since

    def resume(self) -> None:
        self.since = time.monotonic()

    def check(self) -> None:
        if self.limit is not None and self.spent + time.monotonic() - self.since > self.limit:
            raise _ShardTimeout(
                f"reading and decoding took more than source.shard_timeout_s={self.limit:g} s; "
                "raise it (or null: no limit) if the shard is legitimately slow, e.g. a slow pipe"
            )


def _open(url: str):
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in webdataset.gopen_schemes or len(scheme) == 1:
        return webdataset.gopen(url, "rb")  # len 1: a Windows drive letter
    import fsspec  # s3://, gcs://, az://, ... (needs the matching fsspec backend installed)

    return fsspec.open(url, "rb").open()


class _Sniffed:
    """A read-only stream whose first bytes were read ahead to detect its compression."""

    mode = "rb"

    def __init__(self, raw):
        self.raw, self.head = raw, b""
        while len(self.head) < 10:
            part = raw.read(10 - len(self.head))
            if not part:
                break
            self.head += part

    def read(self, size=-1):
        if not self.head:
            return self.raw.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data


def _inflated(raw):
    """``raw`` decompressed as tarfile's ``"r|*"`` would (gzip, bzip2, xz/lzma by their magic
    bytes), but in bounded steps: tarfile's stream inflates each 10 KiB read whole and copies the
    rest at every read, so a bzip2 bomb of a few hundred bytes takes minutes and GiBs."""
    stream = _Sniffed(raw)
    head = stream.head
    if head.startswith(b"\x1f\x8b\x08"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return bz2.BZ2File(stream)
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return lzma.LZMAFile(stream)
    return stream


class _Member(NamedTuple):
    name: str
    data: bytes | None  # None when the member is refused
    problem: str | None  # why the member is refused (its sample is rejected)
    stray: bool  # the name cannot be split into key and extension: a Reject of its own


_SPECIAL = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


def _refusal(info: tarfile.TarInfo, limits: ReadLimits, stored: int) -> str | None:
    """Why the (named, non-directory) member ``info`` is not read, or None. ``stored``: the bytes
    it occupies in the stream (for a sparse member, its data segments)."""
    name = _show(info.name)
    if info.problem is not None:
        return f"member {name}: {info.problem}; the tar is corrupt or hostile"
    if info.islnk():
        return (
            f"hard link member {name} (to {_show(info.linkname)}) is not supported: "
            "re-create the tar with --hard-dereference so that every member holds its data"
        )
    if info.issym():
        return (
            f"symbolic link member {name} (to {_show(info.linkname)}) is not followed: "
            "re-create the tar with --dereference (-h) so that every member holds its data"
        )
    if not info.isreg():
        kind = _SPECIAL.get(info.type, f"type {info.type!r}")
        return f"{kind} member {name} is not a regular file: only regular files hold sample data"
    if info.size < 0:
        return f"member {name} has a negative size: the tar is corrupt"
    if info.size > limits.max_member_bytes:
        return (
            f"member {name} is {info.size} bytes, more than source.max_member_bytes="
            f"{limits.max_member_bytes}: not read (raise source.max_member_bytes if such "
            "members are expected)"
        )
    if info.issparse():
        return _sparse_refusal(info, name, stored)
    return None


def _sparse_segments(info: tarfile.TarInfo) -> list[tuple[int, int]]:
    return [(offset, size) for offset, size in info.sparse if size > 0]


def _sparse_refusal(info: tarfile.TarInfo, name: str, stored: int) -> str | None:
    segments, end = _sparse_segments(info), 0
    if len(segments) > MAX_SPARSE_SEGMENTS:
        n, most = len(segments), MAX_SPARSE_SEGMENTS
        return f"sparse member {name} has {n} data segments (at most {most}): not read"
    for offset, size in segments:
        if offset < end or offset + size > info.size:
            return f"sparse member {name} has an inconsistent sparse map: the tar is corrupt"
        end = offset + size
    if sum(size for _, size in segments) > stored:
        return f"sparse member {name} maps more data than it stores: the tar is corrupt"
    return None


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, budget: _Budget) -> bytes:
    """The data of a regular or sparse member (at most ``info.size`` bytes are ever held)."""
    fileobj = tar.fileobj
    if fileobj.tell() != info.offset_data:
        fileobj.seek(info.offset_data)  # forward only: tarfile raises StreamError otherwise
    if not info.issparse():
        return _read_exact(fileobj, info.size, budget)
    out = bytearray(info.size)  # the holes are zeros; the data segments follow one another
    for offset, size in _sparse_segments(info):
        out[offset : offset + size] = _read_exact(fileobj, size, budget)
    return bytes(out)


def _files(url: str, limits: ReadLimits, budget: _Budget) -> Iterator[_Member]:
    """The shard's members that may hold sample data, in tar order: directories and ``__*__``
    names (WebDataset's metadata) are skipped. A refused member's data is skipped in bounded
    steps, never held. Any stream failure raises ShardReadError, whose ``member`` is the member
    being read (if any); so does exceeding ``limits.shard_timeout_s``."""
    try:
        raw = _open(url)
    except Exception as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc!r}", url=url) from exc
    reading = None
    try:
        stream = _inflated(raw)
        # "r|": one pass over a non-seekable stream; names as bytes escaped into surrogates
        with tarfile.open(
            fileobj=stream,
            mode="r|",
            tarinfo=_StrictTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            for info in tar:
                tar.members = []  # do not keep every header in memory
                budget.check()
                name = info.name
                if info.isdir():
                    continue
                name_bytes = len(name.encode("utf-8", "surrogateescape"))
                if name_bytes > limits.max_name_bytes:
                    reason = (
                        f"tar member name of {name_bytes} bytes is longer than "
                        f"{limits.max_name_bytes} bytes (max_name_bytes): {_show(name)}; "
                        "not split into key and extension"
                    )
                    if info.problem is not None:
                        reason += f" ({info.problem})"
                    reading = name
                    _discard(tar.fileobj, tar.offset - 1 - tar.fileobj.tell(), budget)
                    reading = None
                    yield _Member(name, None, reason, True)
                    continue
                if re.match(r"__[^/]*__($|/)", name):
                    continue
                problem = _refusal(info, limits, tar.offset - info.offset_data)
                reading = name
                if problem is None:
                    data = _read_member(tar, info, budget)
                else:
                    data = None
                    _discard(tar.fileobj, tar.offset - 1 - tar.fileobj.tell(), budget)
                reading = None
                yield _Member(name, data, problem, False)
        raw, closing = None, raw
        closing.close()  # a pipe: reports its command's exit status here
    except _ShardTimeout as exc:
        where = f"in member {_show(reading)}" if reading else "between members"
        msg = f"shard {url} timed out {where}: {exc}"
        raise ShardTimeoutError(msg, url=url, member=reading) from None
    except Exception as exc:
        where = f"in member {_show(reading)}" if reading else "between members"
        msg = f"shard {url} broke {where}: {type(exc).__name__}: {exc}"
        raise ShardReadError(msg, url=url, member=reading) from exc
    finally:
        if raw is not None:  # stopped early or failed: close quietly
            try:
                raw.close()
            except Exception:
                pass


def _show(name: str, limit: int = 200) -> str:
    """A member name to print: repr, bytes that are not UTF-8 as ``\\xNN``, cut at ``limit``."""
    text = _printable(name)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(name.encode('utf-8', 'surrogateescape'))} bytes)"


def _printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that were not UTF-8 (surrogate escapes) as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _split(name: str, limits: ReadLimits) -> tuple[str | None, str | None]:
    """base_plus_ext of a name within ``limits.max_name_bytes`` (else (None, None))."""
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
        return None, None
    return base_plus_ext(name)


def _groups(
    url: str, limits: ReadLimits, budget: _Budget
) -> Iterator[tuple[str, dict[str, bytes | None], str | None]]:
    """(key, {ext: bytes}, problem) per group of consecutive members with one key, in tar order.

    A member that belongs to no sample (no extension, name too long) is a group of its own with
    a problem, keyed by its printable name (cut to 200 characters), yielded after the group it
    interrupts. Keys that are not valid UTF-8 are yielded printable (``\\xNN``) with a problem.
    At a stream fault the pending group is yielded unless the fault struck one of its members
    (then it is dropped and named in the ShardReadError)."""
    seen: set[str] = set()
    key, members, problem, strays = None, {}, None, []

    def stray(name: str, reason: str):
        text = _printable(name)
        return (text if len(text) <= 200 else text[:200] + "..."), {}, reason

    try:
        for m in _files(url, limits, budget):
            prefix, ext = (None, None) if m.stray else base_plus_ext(m.name)
            if prefix is None:
                reason = m.problem or (
                    f"tar member {_show(m.name)} has no extension: not part of any sample "
                    "(WebDataset names members <key>.<extension>)"
                )
                strays.append(stray(m.name, reason))
                continue
            if prefix != key:
                if key is not None:
                    yield _printable(key), members, problem
                yield from strays
                key, members, problem, strays = prefix, {}, None, []
                if prefix in seen:
                    problem = "duplicate key within shard (members not contiguous in the tar?)"
                elif _printable(prefix) != prefix:
                    raw = m.name.encode("utf-8", "surrogateescape")
                    problem = (
                        f"member name {raw!r} is not valid UTF-8: keys are stored as UTF-8 text; "
                        "re-create the tar with UTF-8 member names"
                    )
                seen.add(prefix)
            ext = _printable(ext.lower())
            if problem is None and m.problem is not None:
                problem = m.problem
            if ext in members and problem is None:
                problem = f"duplicate member {_show(f'{prefix}.{ext}')} within the sample"
            members[ext] = m.data
    except ShardReadError as exc:
        if key is not None and exc.member and _split(exc.member, limits)[0] == key:
            exc.args = (f"{exc.args[0]} (sample {_show(key)} incomplete, dropped)",)
        elif key is not None:
            yield _printable(key), members, problem
        raise
    if key is not None:
        yield _printable(key), members, problem
    yield from strays


def iter_shard(
    url: str,
    decoder,
    on_error: str = "skip",
    limits: ReadLimits | None = None,
    conditioning=None,
) -> Iterator[Sample | Reject]:
    """Yield a :class:`Sample` or :class:`Reject` per sample of the shard at ``url``, in tar order.

    ``decoder(members: dict[ext, bytes]) -> np.ndarray`` decodes one sample (``ext`` lowercased,
    e.g. ``"jpg"``, ``"seg.png"``) and raises :class:`DecodeError` for a bad one; its ``reset()``,
    if any, is called first. Every array is made float32 C-contiguous and checked: at least 1-d,
    not empty, no NaN/Inf. ``on_error``: ``"skip"`` yields Reject items, ``"fail"`` raises
    :class:`SampleError` at the first bad sample (other values: ValueError, raised here).
    ``limits``: what the shard may cost (:class:`ReadLimits`, default: the config defaults; from
    a config: ``ReadLimits.from_source(cfg["source"])``). Stream failures and exceeding
    ``limits.shard_timeout_s`` raise :class:`ShardReadError` (see the module docstring).
    ``conditioning``: a :class:`pipeline.conditioning.Conditioning` whose ``extract(members)``
    fills :attr:`Sample.cond`; its DecodeError is a bad sample like the decoder's.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if limits is None:
        limits = ReadLimits()
    elif not isinstance(limits, ReadLimits):
        raise TypeError(f"limits must be a ReadLimits, got {type(limits).__name__}")
    return _iter_shard(url, decoder, on_error == "fail", limits, conditioning)


def _iter_shard(
    url: str, decoder, fail: bool, limits: ReadLimits, conditioning=None
) -> Iterator[Sample | Reject]:
    budget = _Budget(limits.shard_timeout_s)
    if callable(getattr(decoder, "reset", None)):
        decoder.reset()
    groups = _groups(url, limits, budget)
    try:
        for index, (key, members, problem) in enumerate(groups):
            try:
                budget.check()
            except _ShardTimeout as exc:
                msg = f"shard {url} timed out before sample {_show(key)} (index {index}): {exc}"
                raise ShardTimeoutError(msg, url=url) from None
            item = _decode(url, decoder, fail, key, index, members, problem, conditioning)
            budget.pause()
            yield item
            budget.resume()
    finally:
        groups.close()


def _decode(url, decoder, fail, key, index, members, problem, conditioning=None):
    try:
        if problem is not None:
            raise DecodeError(problem)
        pickled = sorted(f"{key}.{e}" for e in members if e.rsplit(".", 1)[-1] in PICKLE_EXTS)
        if pickled:
            names = ", ".join(repr(n) for n in pickled)
            what = "member" if len(pickled) == 1 else "members"
            raise DecodeError(f"refused to decode pickled {what} {names}: shards are untrusted")
        cond = conditioning.extract(members) if conditioning else {}
        array = np.ascontiguousarray(decoder(members), dtype=np.float32)
        if array.ndim < 1:
            raise DecodeError("decoder returned a 0-d array")
        if array.size == 0:
            raise DecodeError(f"decoder returned an empty array of shape {array.shape}")
        _check_finite(array)
    except DecodeError as exc:
        reason = exc.describe(key)
        if fail:
            msg = f"bad sample in shard {url}: key {key!r} (index {index}): {reason}"
            raise SampleError(msg, url=url, key=key, index=index, reason=reason) from exc
        return Reject(key, index, reason)
    return Sample(key, index, array, cond=cond)


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs of ``spec`` as WebDataset expands them: split on ``::``, substitute ``${VAR}``
    from ``WDS_VAR`` environment variables, brace-expand (``a-{000..009}.tar``, ``{a,b}``). A
    list is expanded element by element. Other text (``pipe:`` commands, ``s3://``) is untouched.
    Raises ValueError if nothing remains."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        try:
            urls.extend(u for u in _wds_expand_urls(s) if u.strip())
        except AssertionError as exc:  # webdataset asserts on a missing WDS_ variable
            raise ValueError(f"cannot expand {s!r}: {exc}") from exc
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    return urls


_TAR_SUFFIX = re.compile(r"\.(tar(\.[a-z0-9]+)?|tgz|tbz2?|txz)$", re.IGNORECASE)


def shard_id(url: str) -> str:
    """Stable short, filename-safe name of a shard: its basename without the tar suffix.

    ``"s3://b/train-000003.tar"`` -> ``"train-000003"``; ``"pipe:curl -s http://x/a-01.tar"`` ->
    ``"a-01"`` (the last word of the command that names a tar, else the last non-option word);
    query strings are ignored; characters outside ``[A-Za-z0-9._-]`` become ``_``. When nothing
    usable remains the id is ``shard-<sha1 of url>``. Ids of distinct shards may clash
    (``train/0.tar``, ``val/0.tar``): check a list with :func:`check_unique_ids`.
    """
    target = url
    if url.startswith("pipe:"):
        try:
            words = shlex.split(url[5:])
        except ValueError:  # unbalanced quotes
            words = url[5:].split()
        words = [w for w in words if not w.startswith("-")]
        tars = [w for w in words if _TAR_SUFFIX.search(urlparse(w).path)]
        target = (tars or words or [""])[-1]
    path = urlparse(target).path if "://" in target else target
    name = _TAR_SUFFIX.sub("", os.path.basename(path.rstrip("/")))
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return name or "shard-" + hashlib.sha1(url.encode()).hexdigest()[:12]


def check_unique_ids(urls: list[str]) -> dict[str, str]:
    """``{shard_id: url}`` for ``urls`` (in order); ValueError naming every clash."""
    ids: dict[str, str] = {}
    clashes = []
    for url in urls:
        sid = shard_id(url)
        if sid in ids:
            clashes.append(f"{sid!r}: {ids[sid]!r} and {url!r}")
        else:
            ids[sid] = url
    if clashes:
        raise ValueError("shard ids are not unique: " + "; ".join(clashes))
    return ids
