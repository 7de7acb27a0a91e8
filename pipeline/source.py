"""Reading WebDataset shards: untrusted tar streams in, validated float32 arrays out.

:func:`iter_shard` opens one shard with ``webdataset.gopen`` (local paths, ``file://``,
``pipe:cmd`` and the schemes of ``webdataset.gopen_schemes``, e.g. ``gs://`` via gsutil; other
schemes such as ``s3://`` go to ``fsspec``), reads it in one pass with ``tarfile`` and groups
consecutive members by key as WebDataset does (``webdataset.tariterators.base_plus_ext``: the key
is the path up to the first dot of the basename, the extension the rest, lowercased). It yields a
:class:`Sample` or :class:`Reject` per group, in tar order; ``index`` counts both.

Shards are untrusted: nothing is unpickled (WebDataset's decoders are not used), a sample with a
pickle-type member (:data:`PICKLE_EXTS`) is rejected, ``.npy`` headers are checked before
``np.load(..., allow_pickle=False)``, images go through Pillow's decompression-bomb limit and
only its JPEG, PNG and WebP parsers.

A bad sample is a :class:`Reject` (``on_error="skip"``) or a :class:`SampleError`
(``on_error="fail"``). A broken stream (cannot open; truncated or corrupt tar, gzip, bz2 or xz;
I/O error; ``pipe:`` command exiting non-zero) raises :class:`ShardReadError` after the samples
read before the fault. The group being read at the fault is yielded too, unless the fault struck
inside one of its members. Tar iteration is strict where ``tarfile`` (and so WebDataset's
``tar_file_iterator``) silently stops: a stream cut at a member boundary or in a header, or a
corrupt header, is an error; only the end-of-archive zero block ends a shard. So a 0-byte file
raises ShardReadError, while a tar without members yields nothing.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import shlex
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import webdataset
from PIL import Image, ImageOps, UnidentifiedImageError
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import base_plus_ext

ON_ERROR = ("skip", "fail")
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # the only parsers Pillow may use (JPEG covers MPO)


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
    key: str | None  # None when the failure is not tied to one sample
    index: int | None
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
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and im.width * im.height > limit:
                    detail = f"{im.width}x{im.height} > MAX_IMAGE_PIXELS={limit}"
                    raise DecodeError("image too large (decompression bomb guard)", ext, detail)
                return self._decode(im)
        except DecodeError:
            raise
        except UnidentifiedImageError as exc:
            detail = f"cannot identify image file (allowed formats {list(IMAGE_FORMATS)})"
            raise DecodeError("undecodable image", ext, detail) from exc
        except Exception as exc:  # Pillow raises many types on corrupt input
            raise DecodeError("undecodable image", ext, f"{type(exc).__name__}: {exc}") from exc

    def _decode(self, im: Image.Image) -> np.ndarray:
        r, side = self.resolution, min(im.size)
        if side >= 2 * r:  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, never below r
            im.draft(None, (math.ceil(im.width * r / side), math.ceil(im.height * r / side)))
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
    """``.npy`` member (numeric dtype, ndim >= 1, shape [C, ...]) -> float32 array.

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
    """tarfile ends an archive silently at an empty, truncated or invalid header after the first
    member (a shard cut at a member boundary, a corrupt header): raise instead. Only a zero block
    (the end-of-archive marker) ends it."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:  # tarfile turns this one into ReadError
            raise tarfile.SubsequentHeaderError(f"bad tar header: {exc}") from None


def _open(url: str):
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in webdataset.gopen_schemes or len(scheme) == 1:
        return webdataset.gopen(url, "rb")  # len 1: a Windows drive letter
    import fsspec  # s3://, gcs://, az://, ... (needs the matching fsspec backend installed)

    return fsspec.open(url, "rb").open()


def _files(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the shard's regular files, skipping ``__meta__`` names as WebDataset does.
    Any stream failure raises ShardReadError, whose ``member`` is the file being read (if any)."""
    try:
        raw = _open(url)
    except Exception as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc!r}", url=url) from exc
    reading = None
    try:
        with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for info in tar:  # "r|*": one pass over a non-seekable stream, gz/bz2/xz detected
                if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name):
                    reading = info.name
                    data = tar.extractfile(info).read()
                    reading = None
                    yield info.name, data
                tar.members = []  # do not keep every header in memory
        raw, closing = None, raw
        closing.close()  # a pipe: reports its command's exit status here
    except Exception as exc:
        where = f"in member {reading!r}" if reading else "between members"
        msg = f"shard {url} broke {where}: {type(exc).__name__}: {exc}"
        raise ShardReadError(msg, url=url, member=reading) from exc
    finally:
        if raw is not None:  # stopped early or failed: close quietly
            try:
                raw.close()
            except Exception:
                pass


def _groups(url: str) -> Iterator[tuple[str | None, dict[str, bytes], str | None]]:
    """(key, {ext: bytes}, problem) per group of consecutive members with one key, in tar order.

    Members without extension give ``(None, {}, problem)`` after the group they interrupt; they
    are no sample. At a stream fault the pending group is yielded unless the fault struck one of
    its members (then it is dropped and named in the ShardReadError)."""
    seen: set[str] = set()
    key, members, problem, strays = None, {}, None, []
    try:
        for name, data in _files(url):
            prefix, ext = base_plus_ext(name)
            if prefix is None:
                strays.append(f"tar member {name!r} has no extension: not part of any sample")
                continue
            if prefix != key:
                if key is not None:
                    yield key, members, problem
                yield from ((None, {}, stray) for stray in strays)
                key, members, problem, strays = prefix, {}, None, []
                if prefix in seen:
                    problem = "duplicate key within shard (members not contiguous in the tar?)"
                seen.add(prefix)
            ext = ext.lower()
            if ext in members and problem is None:
                problem = f"duplicate member {f'{prefix}.{ext}'!r} within the sample"
            members[ext] = data
    except ShardReadError as exc:
        if key is not None and exc.member and base_plus_ext(exc.member)[0] == key:
            exc.args = (f"{exc.args[0]} (sample {key!r} incomplete, dropped)",)
        elif key is not None:
            yield key, members, problem
        raise
    if key is not None:
        yield key, members, problem
    yield from ((None, {}, stray) for stray in strays)


def iter_shard(
    url: str, decoder, on_error: str = "skip", conditioning=None
) -> Iterator[Sample | Reject]:
    """Yield a :class:`Sample` or :class:`Reject` per sample of the shard at ``url``, in tar order.

    ``decoder(members: dict[ext, bytes]) -> np.ndarray`` decodes one sample (``ext`` lowercased,
    e.g. ``"jpg"``, ``"seg.png"``) and raises :class:`DecodeError` for a bad one; its ``reset()``,
    if any, is called first. Every array is made float32 C-contiguous and checked for NaN/Inf.
    ``on_error``: ``"skip"`` yields Reject items, ``"fail"`` raises :class:`SampleError` at the
    first bad sample (other values: ValueError, raised here). Stream failures raise
    :class:`ShardReadError` (see the module docstring). ``conditioning``: a
    :class:`pipeline.conditioning.Conditioning` whose ``extract(members)`` fills
    :attr:`Sample.cond`; its DecodeError is a bad sample like the decoder's.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return _iter_shard(url, decoder, on_error == "fail", conditioning)


def _iter_shard(url: str, decoder, fail: bool, conditioning=None) -> Iterator[Sample | Reject]:
    if callable(getattr(decoder, "reset", None)):
        decoder.reset()
    index = 0
    for key, members, problem in _groups(url):
        position = None if key is None else index
        index += key is not None
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
            _check_finite(array)
        except DecodeError as exc:
            reason = exc.describe(key)
            if fail:
                msg = f"bad sample in shard {url}: key {key!r} (index {position}): {reason}"
                raise SampleError(msg, url=url, key=key, index=position, reason=reason) from exc
            yield Reject(key, position, reason)
        else:
            yield Sample(key, position, array, cond=cond)


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
