"""Reading WebDataset shards: untrusted tar streams in, validated float32 arrays out.

:func:`iter_shard` reads one shard's members (:mod:`pipeline.read.tarstream`: opening, strict tar
parsing, the bounds of :class:`~pipeline.read.tarstream.ReadLimits`) and groups consecutive members
by key as WebDataset does (``webdataset.tariterators.base_plus_ext``: the key is the path up to
the first dot of the basename, the extension the rest, lowercased). It decodes each group with a
decoder (:mod:`pipeline.read.decoders`) and yields a :class:`Sample` or :class:`Reject` per group,
in tar order; ``index`` counts both, and every item has a key, so a shard's samples = records /
draws + rejects. A member that belongs to no sample (no extension, or a name too long to split)
is a Reject of its own, keyed by its name.

Shards are untrusted: nothing is unpickled (WebDataset's decoders are not used), a sample with a
pickle-type member (:data:`PICKLE_EXTS`) is rejected, a member the tar reader refuses (too
large, a link, a device, a corrupt header) rejects its sample, and a key that is not valid
UTF-8 rejects its sample (keys are hashed and stored as UTF-8), named with its bytes escaped.

A bad sample is a :class:`Reject` (``on_error="skip"``) or a :class:`SampleError`
(``on_error="fail"``); :data:`ON_ERROR` lists the policies (the config key ``on_error``). A
broken stream raises :class:`~pipeline.read.tarstream.ShardReadError` (or its subclass
:class:`~pipeline.read.tarstream.ShardTimeoutError`) after the samples read before the fault. The
group being read at the fault is yielded too, unless the fault struck inside one of its members.

Also here: the shard list and names: :func:`expand_urls` (braces), :func:`expand_globs`
(glob patterns), :func:`missing_local_shards`, :func:`shard_id`, :func:`check_unique_ids`.
The driver uses only these, and ``webdataset`` (whose ``__init__`` imports torch) is imported
by the functions that read a shard, so the driver loads neither.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import braceexpand
import numpy as np

from pipeline.errors import ExitCode, PipelineError, UsageError
from pipeline.output.manifest import ID_CHARS
from pipeline.read.decoders import DecodeError, check_finite
from pipeline.read.tarstream import (
    Budget,
    BudgetExceeded,
    ReadLimits,
    ShardReadError,
    ShardTimeoutError,
    iter_members,
    printable,
    show_name,
)

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "fail")  # iter_shard's on_error, and so the config key on_error
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})


@dataclass(frozen=True, eq=False)  # eq=False: identity comparison, arrays have no truth value
class Sample:
    key: str  # the WebDataset __key__
    index: int  # 0-based ordinal among all groups (samples and rejects) of the shard, tar order
    array: np.ndarray  # float32, C-contiguous, [C, H, W] for images, [C, ...] for arrays
    # kept members, {column: value or None} (pipeline.read.conditioning); keyword-only, so that
    # subclasses may add positional fields
    cond: dict = field(default_factory=dict, kw_only=True)


@dataclass(frozen=True)
class Reject:
    key: str  # the sample key; for a member of no sample, its name (see _groups)
    index: int  # as Sample.index
    reason: str


class SampleError(PipelineError, ValueError):
    """A bad sample under ``on_error="fail"`` (exit 1: the job stopped there); attributes
    ``url``, ``key``, ``index`` and ``reason``."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, url=None, key=None, index=None, reason=None):
        super().__init__(message)  # args == (message,): picklable, so it crosses Ray actors
        self.url, self.key, self.index, self.reason = url, key, index, reason


def _split(name: str, limits: ReadLimits) -> tuple[str | None, str | None]:
    """base_plus_ext of a name within ``limits.max_name_bytes`` (else (None, None))."""
    from webdataset.tariterators import base_plus_ext

    if len(name.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
        return None, None
    return base_plus_ext(name)


def _groups(
    url: str, limits: ReadLimits, budget: Budget
) -> Iterator[tuple[str, dict[str, bytes | None], str | None]]:
    """(key, {ext: bytes}, problem) per group of consecutive members with one key, in tar order.

    A member that belongs to no sample (no extension, name too long) is a group of its own with
    a problem, keyed by its printable name (cut to 200 characters), yielded after the group it
    interrupts. Keys that are not valid UTF-8 are yielded printable (``\\xNN``) with a problem.
    At a stream fault the pending group is yielded unless the fault struck one of its members
    (then it is dropped and named in the ShardReadError)."""
    from webdataset.tariterators import base_plus_ext

    seen: set[str] = set()
    key, members, problem, strays = None, {}, None, []

    def stray(name: str, reason: str):
        text = printable(name)
        return (text if len(text) <= 200 else text[:200] + "..."), {}, reason

    try:
        for m in iter_members(url, limits, budget):
            prefix, ext = (None, None) if m.stray else base_plus_ext(m.name)
            if prefix is None:
                reason = m.problem or (
                    f"tar member {show_name(m.name)} has no extension: not part of any sample "
                    "(WebDataset names members <key>.<extension>)"
                )
                strays.append(stray(m.name, reason))
                continue
            if prefix != key:
                if key is not None:
                    yield printable(key), members, problem
                yield from strays
                key, members, problem, strays = prefix, {}, None, []
                if prefix in seen:
                    problem = "duplicate key within shard (members not contiguous in the tar?)"
                elif printable(prefix) != prefix:
                    raw = m.name.encode("utf-8", "surrogateescape")
                    problem = (
                        f"member name {raw!r} is not valid UTF-8: keys are stored as UTF-8 text; "
                        "re-create the tar with UTF-8 member names"
                    )
                seen.add(prefix)
            ext = printable(ext.lower())
            if problem is None and m.problem is not None:
                problem = m.problem
            if ext in members and problem is None:
                problem = f"duplicate member {show_name(f'{prefix}.{ext}')} within the sample"
            members[ext] = m.data
    except ShardReadError as exc:
        if key is not None and exc.member and _split(exc.member, limits)[0] == key:
            exc.args = (f"{exc.args[0]} (sample {show_name(key)} incomplete, dropped)",)
        elif key is not None:
            yield printable(key), members, problem
        raise
    if key is not None:
        yield printable(key), members, problem
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
    if any, is called first. A decoder whose ``keyed`` is true is called as ``decoder(members,
    key) -> (array, columns)`` and its columns join :attr:`Sample.cond` (aspect-ratio buckets).
    Every array is made float32 C-contiguous and checked: at least 1-d,
    not empty, no NaN/Inf. ``on_error``: ``"skip"`` yields Reject items, ``"fail"`` raises
    :class:`SampleError` at the first bad sample (other values: ValueError, raised here).
    ``limits``: what the shard may cost (:class:`ReadLimits`, default: the config defaults; from
    a config: ``ReadLimits.from_source(cfg.source)``). Stream failures and exceeding
    ``limits.shard_timeout_s`` raise :class:`ShardReadError` (see :mod:`pipeline.read.tarstream`).
    ``conditioning``: a :class:`pipeline.read.conditioning.Conditioning` whose ``extract(members)``
    fills :attr:`Sample.cond`; its DecodeError is a bad sample like the decoder's. Any other
    exception a decoder or the conditioning raises (an ``Exception``, not a ``BaseException``)
    also rejects only its sample, the reason naming its type (logged with its traceback).
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
    budget = Budget(limits.shard_timeout_s)
    if callable(getattr(decoder, "reset", None)):
        decoder.reset()
    groups = _groups(url, limits, budget)
    try:
        for index, (key, members, problem) in enumerate(groups):
            try:
                budget.check()
            except BudgetExceeded as exc:
                msg = f"shard {url} timed out before sample {show_name(key)} (index {index}): {exc}"
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
        if getattr(decoder, "keyed", False):  # buckets: micro-conditioning beside the array
            array, extra = decoder(members, key)
            cond = {**cond, **extra}
        else:
            array = decoder(members)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim < 1:
            raise DecodeError("decoder returned a 0-d array")
        if array.size == 0:
            raise DecodeError(f"decoder returned an empty array of shape {array.shape}")
        check_finite(array)
    except DecodeError as exc:
        reason = exc.describe(key)
    except Exception as exc:  # a parser's other exception types: still only this sample's fault
        log.warning("sample %r of %s: unexpected %s", key, url, type(exc).__name__, exc_info=True)
        reason = f"cannot decode sample {show_name(key)}: {type(exc).__name__}: {exc}"
    else:
        return Sample(key, index, array, cond=cond)
    if fail:
        msg = f"bad sample in shard {url}: key {key!r} (index {index}): {reason}"
        raise SampleError(msg, url=url, key=key, index=index, reason=reason)
    return Reject(key, index, reason)


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs of ``spec`` as WebDataset expands them (``webdataset.shardlists.expand_urls``,
    without importing webdataset): split on ``::``, substitute ``${VAR}`` from ``WDS_VAR``
    environment variables, brace-expand (``a-{000..009}.tar``, ``{a,b}``). A list is expanded
    element by element. Other text (``pipe:`` commands, ``s3://``) is untouched. Raises
    UsageError (a ValueError) if nothing remains or a ``WDS_`` variable is missing."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for part in s.split("::"):
            try:
                part = _substitute_wds_vars(part)
            except KeyError as exc:
                raise UsageError(
                    f"cannot expand {s!r}: missing environment variable {exc.args[0]} "
                    f"(${{{exc.args[0][4:]}}} is read from {exc.args[0]})"
                ) from None
            urls.extend(u for u in braceexpand.braceexpand(part) if u.strip())
    if not urls:
        raise UsageError(f"no shard URLs in {spec!r}")
    return urls


_GLOB_CHARS = re.compile(r"[*?\[]")
_NOT_FILES = ("pipe:", "http://", "https://")  # commands and web URLs: never globbed or listed


def has_glob(url: str) -> bool:
    """Whether ``url`` (a path or an object-store URI) holds a glob pattern (``*``, ``?``,
    ``[..]``); ``pipe:`` commands and http(s) URLs never do."""
    return not url.startswith(_NOT_FILES) and bool(_GLOB_CHARS.search(url))


def expand_globs(urls: list[str]) -> list[str]:
    """``urls`` with every glob pattern replaced by the files it matches, as Hugging Face
    ``datasets``' ``data_files`` does: ``*`` and ``?`` within a path segment, ``[..]`` a class,
    ``**`` any number of segments; local paths and object stores alike (:func:`glob_url`).
    Matches are sorted, and a file already in the list (matched by an earlier pattern) is not
    added again. UsageError names a pattern that matches no file."""
    out: list[str] = []
    seen: set[str] = set()
    for url in urls:
        if not has_glob(url):
            out.append(url)
            seen.add(url)
            continue
        matches = glob_url(url)
        if not matches:
            raise UsageError(f"source.urls: the pattern {url!r} matches no file")
        for m in matches:
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


def glob_url(pattern: str) -> list[str]:
    """The files (not directories) matching ``pattern``, sorted, spelled as the pattern is (the
    same scheme and prefix). Local paths use :func:`glob.glob` (hidden files only when named);
    other URIs list the pattern's fixed prefix recursively through :func:`pipeline.fs.resolve`
    (pyarrow or fsspec) and match the rest."""
    import glob

    from pipeline.fs import is_remote, resolve

    if not is_remote(pattern):
        local = pattern.split("://", 1)[1] if "://" in pattern else pattern
        prefix = pattern[: len(pattern) - len(local)]
        return sorted(prefix + p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
    import pyarrow.fs as pafs

    cut = pattern.rfind("/", 0, _GLOB_CHARS.search(pattern).start()) + 1
    base, rest = pattern[:cut], pattern[cut:]
    fs, root = resolve(base)
    root = root.rstrip("/")
    regex = re.compile(_glob_regex(rest))
    selector = pafs.FileSelector(root, recursive="/" in rest or "**" in rest, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        rel = info.path[len(root) :].lstrip("/")
        if info.type == pafs.FileType.File and regex.fullmatch(rel):
            found.append(base + rel)
    return sorted(found)


def _glob_regex(pattern: str) -> str:
    """A regular expression for a relative glob ``pattern``: ``**/`` any number of directories,
    ``**`` anything, ``*`` and ``?`` within one segment, ``[..]`` / ``[!..]`` a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def missing_local_shards(urls: list[str]) -> list[str]:
    """The local shard paths (plain or ``file://``) among ``urls`` that are not files, in order;
    object stores, ``pipe:`` commands and web URLs are not checked here (their workers retry)."""
    from pipeline.fs import is_remote

    missing = []
    for url in urls:
        if url.startswith(_NOT_FILES) or is_remote(url):
            continue
        path = url.split("://", 1)[1] if "://" in url else url
        if not os.path.isfile(path):
            missing.append(url)
    return missing


_WDS_VAR = re.compile(r"\$\{(\w+)\}")


def _substitute_wds_vars(url: str) -> str:
    """WebDataset's ``envsubst``: ``${VAR}`` -> ``$WDS_VAR``, repeated (at most 10 times) while
    a value brings new ``${...}``; KeyError names a missing variable."""
    for _ in range(10):
        last, url = url, _WDS_VAR.sub(lambda m: os.environ["WDS_" + m.group(1)], url)
        if url == last:
            break
    return url


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
    name = re.sub(f"[^{ID_CHARS}]", "_", name).strip(".")  # so it matches manifest.SHARD_ID
    return name or "shard-" + hashlib.sha1(url.encode()).hexdigest()[:12]


def check_unique_ids(urls: list[str]) -> dict[str, str]:
    """``{shard_id: url}`` for ``urls`` (in order); UsageError naming every clash."""
    ids: dict[str, str] = {}
    clashes = []
    for url in urls:
        sid = shard_id(url)
        if sid in ids:
            clashes.append(f"{sid!r}: {ids[sid]!r} and {url!r}")
        else:
            ids[sid] = url
    if clashes:
        raise UsageError("shard ids are not unique: " + "; ".join(clashes))
    return ids
