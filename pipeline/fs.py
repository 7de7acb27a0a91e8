"""Where a path or URI lives: the one place that turns ``/data/x``, ``s3://b/x``, ``memory://x``
into a ``pyarrow.fs.FileSystem`` and a path on it.

pyarrow resolves local paths and the schemes it implements itself (:data:`PYARROW_SCHEMES`);
any other scheme goes through fsspec (``memory://``, ``az://``, ...), wrapped so the rest of the
project sees one filesystem API. A filesystem passed in explicitly (pyarrow or fsspec) wins.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

# URI schemes pyarrow.fs resolves itself; any other scheme goes through fsspec.
PYARROW_SCHEMES = ("file", "local", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")
# open_input's read-ahead: a sequential read of an S3 object (a shard) takes one request per
# 8 MiB instead of one per read call (tarfile reads 10 KiB at a time).
READ_BUFFER_BYTES = 8 * 2**20


def scheme(uri: str) -> str:
    """The lower-case URI scheme, or "" for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_remote(uri: str) -> bool:
    """True for a URI on another filesystem than the local one (``s3://``, ``memory://``, ...)."""
    return scheme(uri) not in ("", "file", "local")


def resolve(uri: str, filesystem=None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for ``uri``; a local path is made absolute.

    ``filesystem``: a ``pyarrow.fs.FileSystem`` or an fsspec filesystem to use instead of the
    one the URI names (the URI's scheme, if any, is then stripped from the path).
    """
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):  # an fsspec filesystem
            filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
        path = uri.split("://", 1)[1] if "://" in uri else uri
        return filesystem, path.rstrip("/") or "/"
    kind = scheme(uri)
    if kind and kind not in PYARROW_SCHEMES:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    if kind:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def open_input(uri: str, buffer_size: int = READ_BUFFER_BYTES):
    """A readable binary stream of the file at ``uri`` (any scheme :func:`resolve` knows): its
    bytes as stored (no decompression by file extension), read ahead ``buffer_size`` bytes at a
    time (an object store's stream unbuffered sends one ranged request per read)."""
    fs, path = resolve(uri)
    return fs.open_input_stream(path, compression=None, buffer_size=buffer_size)


def identity(url: str) -> dict | None:
    """What identifies the content of the file at ``url`` without reading it: its size and
    modification time (an object store's mtime changes with every upload). None for what
    cannot be looked at (``pipe:`` commands, unreachable files)."""
    if url.startswith("pipe:") or url == "-":
        return None
    try:
        fs, path = resolve(url)
        info = fs.get_file_info(path)
    except (OSError, ValueError):
        return None
    if info.type != pafs.FileType.File:
        return None
    mtime = info.mtime_ns
    return {"size": info.size, "mtime_ns": mtime}


def _listable(url: str) -> bool:
    """Whether the directory of ``url`` can be listed (not a ``pipe:`` command or HTTP)."""
    return not (url.startswith("pipe:") or url == "-" or scheme(url) in ("http", "https"))


def identities(urls) -> dict[str, dict | None]:
    """:func:`identity` of many URLs with one listing per directory instead of one stat per
    URL (a URL its directory's listing does not show, or that cannot be listed (``pipe:``,
    HTTP), is looked at alone)."""
    found: dict[str, dict | None] = {}
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        head, sep, _ = url.rpartition("/")
        if sep and head and _listable(url):
            by_dir.setdefault(head, []).append(url)
        else:
            found[url] = identity(url)
    for head, group in by_dir.items():
        listed: dict[str, pafs.FileInfo] = {}
        if len(group) > 1:  # one URL: a stat is cheaper than listing its directory
            try:
                fs, path = resolve(head)
                sel = pafs.FileSelector(path, allow_not_found=True)
                listed = {os.path.basename(i.path): i for i in fs.get_file_info(sel)}
            except (OSError, ValueError):
                listed = {}
        for url in group:
            info = listed.get(url.rpartition("/")[2])
            if info is not None and info.type == pafs.FileType.File:
                found[url] = {"size": info.size, "mtime_ns": info.mtime_ns}
            else:
                found[url] = identity(url)
    return found
