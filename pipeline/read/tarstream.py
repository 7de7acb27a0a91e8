"""Reading one shard's tar stream, which is untrusted: its members in tar order, each with its
data or the reason it is refused, at a bounded cost.

:func:`iter_members` opens the shard with ``webdataset.gopen`` (local paths, ``file://``,
``pipe:cmd`` and the schemes of ``webdataset.gopen_schemes``, e.g. ``gs://`` via gsutil; other
schemes such as ``s3://`` through :func:`pipeline.fs.open_input`), inflates gzip, bzip2 and
xz/lzma shards by their magic bytes, and reads the tar in one pass with ``tarfile``.
:func:`pipeline.read.source.iter_shard` groups the members into samples.

What one shard may cost is bounded (:class:`ReadLimits`): a member above ``max_member_bytes``
(as its header declares it, so a sparse or gzip-bombed member is never read into memory) or with
a name above ``max_name_bytes`` is refused; compressed shards are inflated in bounded steps; tar
headers are parsed in linear time and bounded memory (:mod:`pipeline.read.tarheader`); reading and
decoding a shard may take at most ``shard_timeout_s`` (:class:`~pipeline.read.tarheader.Budget`).
Hard links, symbolic links, devices and FIFOs are refused (never followed); directories and
``__*__`` names are skipped. Member names are decoded as UTF-8, bytes that are not UTF-8 escaped
into surrogates (:func:`printable` and :func:`show_name` write them as ``\\xNN``).

A broken stream (cannot open; truncated or corrupt tar, gzip, bz2 or xz; I/O error; ``pipe:``
command exiting non-zero; ``shard_timeout_s`` exceeded, then the subclass
:class:`ShardTimeoutError`) raises :class:`ShardReadError`. Tar iteration is strict where
``tarfile`` (and so WebDataset's ``tar_file_iterator``) silently stops: a stream cut at a member
boundary or in a header, or a corrupt header, is an error; only the end-of-archive zero block
ends a shard. So a 0-byte file raises ShardReadError, while a tar without members yields nothing.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlparse

from pipeline.fs import open_input
from pipeline.read.tarheader import (
    MAX_SPARSE_SEGMENTS,
    Budget,
    BudgetExceeded,
    StrictTarInfo,
    discard,
    read_exact,
)

if TYPE_CHECKING:
    from pipeline.run.config import SourceConfig

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
    def from_source(cls, source: SourceConfig) -> ReadLimits:
        """The limits of the typed ``source`` group (or the composed DictConfig):
        ``max_member_bytes`` and ``shard_timeout_s``; ``max_name_bytes`` is not a config key."""
        return cls(max_member_bytes=source.max_member_bytes, shard_timeout_s=source.shard_timeout_s)


class ShardReadError(IOError):
    """The shard could not be opened or its stream broke; attributes ``url`` and ``member`` (the
    tar member being read at the fault, if any)."""

    def __init__(self, message: str, *, url=None, member=None):
        super().__init__(message)
        self.url, self.member = url, member


class ShardTimeoutError(ShardReadError):
    """Reading and decoding the shard took more than ``ReadLimits.shard_timeout_s`` (a
    ShardReadError like any stream fault; retrying it is likely to time out again)."""


def _open(url: str):
    import webdataset  # here, not with the module: its __init__ imports torch (the driver's cost)

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in webdataset.gopen_schemes or len(scheme) == 1:
        return webdataset.gopen(url, "rb")  # len 1: a Windows drive letter
    return open_input(url)  # s3://, az://, memory://, ... (pipeline.fs resolves the scheme)


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


class Member(NamedTuple):
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
    name = show_name(info.name)
    if info.problem is not None:
        return f"member {name}: {info.problem}; the tar is corrupt or hostile"
    if info.islnk():
        return (
            f"hard link member {name} (to {show_name(info.linkname)}) is not supported: "
            "re-create the tar with --hard-dereference so that every member holds its data"
        )
    if info.issym():
        return (
            f"symbolic link member {name} (to {show_name(info.linkname)}) is not followed: "
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


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, budget: Budget) -> bytes:
    """The data of a regular or sparse member (at most ``info.size`` bytes are ever held)."""
    fileobj = tar.fileobj
    if fileobj.tell() != info.offset_data:
        fileobj.seek(info.offset_data)  # forward only: tarfile raises StreamError otherwise
    if not info.issparse():
        return read_exact(fileobj, info.size, budget)
    out = bytearray(info.size)  # the holes are zeros; the data segments follow one another
    for offset, size in _sparse_segments(info):
        out[offset : offset + size] = read_exact(fileobj, size, budget)
    return bytes(out)


def iter_members(url: str, limits: ReadLimits, budget: Budget) -> Iterator[Member]:
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
            tarinfo=StrictTarInfo,
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
                        f"{limits.max_name_bytes} bytes (max_name_bytes): {show_name(name)}; "
                        "not split into key and extension"
                    )
                    if info.problem is not None:
                        reason += f" ({info.problem})"
                    reading = name
                    discard(tar.fileobj, tar.offset - 1 - tar.fileobj.tell(), budget)
                    reading = None
                    yield Member(name, None, reason, True)
                    continue
                if re.match(r"__[^/]*__($|/)", name):
                    continue
                problem = _refusal(info, limits, tar.offset - info.offset_data)
                reading = name
                if problem is None:
                    data = _read_member(tar, info, budget)
                else:
                    data = None
                    discard(tar.fileobj, tar.offset - 1 - tar.fileobj.tell(), budget)
                reading = None
                yield Member(name, data, problem, False)
        raw, closing = None, raw
        closing.close()  # a pipe: reports its command's exit status here
    except BudgetExceeded as exc:
        where = f"in member {show_name(reading)}" if reading else "between members"
        msg = f"shard {url} timed out {where}: {exc}"
        raise ShardTimeoutError(msg, url=url, member=reading) from None
    except Exception as exc:
        where = f"in member {show_name(reading)}" if reading else "between members"
        msg = f"shard {url} broke {where}: {type(exc).__name__}: {exc}"
        raise ShardReadError(msg, url=url, member=reading) from exc
    finally:
        if raw is not None:  # stopped early or failed: close quietly
            try:
                raw.close()
            except Exception:
                pass


def show_name(name: str, limit: int = 200) -> str:
    """A member name to print: repr, bytes that are not UTF-8 as ``\\xNN``, cut at ``limit``."""
    text = printable(name)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(name.encode('utf-8', 'surrogateescape'))} bytes)"


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that were not UTF-8 (surrogate escapes) as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
