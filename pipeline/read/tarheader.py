"""Strict, bounded parsing of an untrusted tar stream's headers, and bounded reads.

:class:`StrictTarInfo` is ``tarfile``'s header parsing made strict (a stream cut at a member
boundary or in a header, or a corrupt header, is an error where ``tarfile`` silently stops) and
bounded (oversized GNU long names and pax headers skipped unread, pax records parsed in linear
time, sparse maps capped). :func:`read_exact` and :func:`discard` read in steps of :data:`CHUNK`
bytes and check the shard's time :class:`Budget` between steps. Used by
:func:`pipeline.read.tarstream.iter_members`.
"""

from __future__ import annotations

import re
import tarfile
import time

# Not configurable: tar metadata that no real sample tar comes near.
MAX_HEADER_BYTES = 2**20  # a pax extended header or GNU long name/link (real ones: a path, xattrs)
MAX_SPARSE_SEGMENTS = 2**16  # data segments in one sparse member's map
CHUNK = 2**20  # members are read, skipped and inflated in steps of this many bytes


class StrictTarInfo(tarfile.TarInfo):
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

    def _next_header(self, tar) -> StrictTarInfo:
        try:
            following = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        following.offset = self.offset
        return following

    def _skip_oversized(self, tar, what: str) -> tuple[StrictTarInfo, bytes]:
        """Skip this header's data but its first MAX_HEADER_BYTES; the next member, flagged."""
        head = read_exact(tar.fileobj, MAX_HEADER_BYTES)
        discard(tar.fileobj, self._block(self.size) - MAX_HEADER_BYTES)
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
        buf = read_exact(tar.fileobj, self._block(self.size))[: self.size]
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
            buf = read_exact(tar.fileobj, tarfile.BLOCKSIZE)
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


def read_exact(fileobj, size: int, budget: Budget | None = None) -> bytes:
    """``size`` bytes of ``fileobj``, read in steps of at most :data:`CHUNK` (the deadline is
    checked between steps); ReadError if the stream ends first."""
    if size <= CHUNK:
        data = fileobj.read(size) if size > 0 else b""
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        return data
    parts, left = [], size
    while left > 0:
        part = fileobj.read(min(left, CHUNK))
        if not part:
            raise tarfile.ReadError("unexpected end of data")
        parts.append(part)
        left -= len(part)
        if budget is not None:
            budget.check()
    return b"".join(parts)


def discard(fileobj, size: int, budget: Budget | None = None) -> None:
    """Read and drop ``size`` bytes in bounded steps; stop quietly where the stream ends (tarfile
    reports it when it looks for the next header)."""
    while size > 0:
        part = fileobj.read(min(size, CHUNK))
        if not part:
            return
        size -= len(part)
        if budget is not None:
            budget.check()


class BudgetExceeded(Exception):
    """Raised by :meth:`Budget.check`; the reader turns it into a :class:`ShardTimeoutError`."""


class Budget:
    """Time the source spends on one shard (``limit`` seconds, None: no bound): running, not
    suspended at a ``yield`` (the caller calls :meth:`pause` before it yields, :meth:`resume`
    after)."""

    def __init__(self, limit: float | None):
        self.limit, self.spent, self.since = limit, 0.0, time.monotonic()

    def pause(self) -> None:
        self.spent += time.monotonic() - self.since

    def resume(self) -> None:
        self.since = time.monotonic()

    def check(self) -> None:
        if self.limit is not None and self.spent + time.monotonic() - self.since > self.limit:
            raise BudgetExceeded(
                f"reading and decoding took more than source.shard_timeout_s={self.limit:g} s; "
                "raise it (or null: no limit) if the shard is legitimately slow, e.g. a slow pipe"
            )
