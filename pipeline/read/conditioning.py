"""Conditioning carried into the records: labels, captions and metadata of each sample.

``source.keep`` lists WebDataset member extensions (default ``[cls, txt, json]``); each becomes
one nullable column of every record, named after the extension with ``.`` as ``_``
(``meta.json`` -> ``meta_json``). The last component of the extension sets the column's type:

========  ========  ===============================================================
ends in   type      value
========  ========  ===============================================================
``cls``   int64     the member's text as a decimal integer (``"3"``, ``" -1\\n"``)
``txt``   string    the member's bytes as UTF-8 text
``json``  string    the member's text, unchanged, when it is one valid JSON document
other     binary    the member's bytes
========  ========  ===============================================================

A member that does not parse (a ``cls`` that is not an integer in int64, bytes that are not
UTF-8, text that is not strict JSON: no NaN/Infinity, no BOM) rejects its sample with the reason,
like an undecodable image. An absent member gives a null; ``source.require`` (a subset of
``keep``) rejects a sample lacking one of its members instead. Values are never unpickled or
evaluated: an extension of :data:`pipeline.read.source.PICKLE_EXTS` cannot be kept (refused by
:func:`config_problems`), and the reader rejects samples holding such members anyway. Members
are capped by ``source.max_member_bytes`` like any member (the reader rejects larger ones unread).

Every file of a dataset has the same columns: they come from the config, recorded in the
process metadata as :meth:`Conditioning.describe` (``conditioning`` entry, see
:mod:`pipeline.output.records`). Each (key, draw) record of a sample carries the sample's values.

Class names
-----------
``source.class_names`` names the labels of the ``cls`` member: a list (``[cat, dog]``) or the
path of a text file with one name per line (blank lines skipped, as ``datasets.ClassLabel``'s
``names_file``). Label ``i`` is ``names[i]``: a sample whose ``cls`` is not in ``0 ..
len(names) - 1`` is rejected with the reason. The names are recorded in the metadata's
``conditioning`` entry (the list, never the path) and are part of the config hash; the Hugging
Face export makes ``cls`` a ``ClassLabel`` with them (:mod:`pipeline.consume.hf`). ``null`` (the
default): no names, ``cls`` stays a plain integer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.output.records import ARROW_TYPES, reserved_names
from pipeline.read.decoders import ArrayDecoder, DecodeError, ImageDecoder
from pipeline.read.source import PICKLE_EXTS

if TYPE_CHECKING:
    from pipeline.run.config import SourceConfig

DEFAULT_KEEP = ("cls", "txt", "json")
# kind (the extension's last component, else "binary") -> Arrow type name
KINDS = {"cls": "int64", "txt": "string", "json": "string", "binary": "binary"}
PAYLOAD_EXTS = {"images": ImageDecoder.payload_exts, "arrays": ArrayDecoder.payload_exts}
_EXT = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
_INT = re.compile(r"[+-]?[0-9]+")
INT64 = (-(2**63), 2**63 - 1)
INT64_DIGITS = len(str(2**63))  # 19: a longer label is out of range before it is parsed


def column_name(ext: str) -> str:
    """The column of a kept extension: ``meta.json`` -> ``meta_json``."""
    return ext.replace(".", "_")


def kind_of(ext: str) -> str:
    """``cls``, ``txt``, ``json`` (by the extension's last component) or ``binary``."""
    last = ext.rsplit(".", 1)[-1]
    return last if last in KINDS else "binary"


def class_names(source: SourceConfig) -> list[str] | None:
    """The names of ``source.class_names`` (a list, or a file read as one name per line);
    None when unset. ValueError naming ``source.class_names`` for a file that cannot be read, an
    empty list, a name that is not a non-empty string, or a name given twice. ``source``: the
    typed ``source`` group (:class:`pipeline.run.config.SourceConfig`, or the composed
    DictConfig: read by attribute)."""
    return _names(source.class_names)


def _names(value) -> list[str] | None:
    """:func:`class_names` of the value of ``source.class_names``."""
    if value is None:
        return None
    where = "source.class_names"
    if isinstance(value, str):
        try:
            with open(value, encoding="utf-8") as f:
                names = [line.strip() for line in f.read().split("\n") if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{where}={value!r} is a string, so the path of a names file (one name per "
                f"line), and it cannot be read: {exc}; give an existing file or a list "
                "(source.class_names=[cat,dog])"
            ) from None
        where = f"{where} ({value})"
    elif isinstance(value, Sequence):
        names = list(value)
    else:
        raise ValueError(f"source.class_names must be null, a list of names or a file path, "
                         f"got {type(value).__name__}")  # fmt: skip
    if not names:
        raise ValueError(f"{where}: no class names")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"{where}: entry {i} is {name!r}; names are non-empty strings "
                "(quote a name that YAML reads as a number or null)"
            )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{where}: {name!r} is both label {seen[name]} and label {i}")
        seen[name] = i
    return names


def config_problems(source: SourceConfig) -> list[tuple[str, str]]:
    """``(config key, message)`` for every bad ``source.keep`` / ``source.require`` entry:
    not a lowercase extension, a pickle extension, a payload extension of the source kind, a
    column name of the record format, two entries mapping to one column, duplicates, or a
    ``require`` entry that is not kept; and a bad ``source.class_names``. ``source``: the typed
    ``source`` group (or the composed DictConfig)."""
    return _problems(source.keep, source.require, source.kind, source.class_names)


def _problems(keep, require, kind: str | None, names) -> list[tuple[str, str]]:
    """:func:`config_problems` of these values (``kind`` None: no payload extensions)."""
    keep, require = list(keep or []), list(require or [])
    payload = PAYLOAD_EXTS.get(kind, ())
    problems, columns = [], {}
    for ext in keep:
        if not isinstance(ext, str) or not _EXT.fullmatch(ext):
            problems.append(
                (
                    "source.keep",
                    f"{ext!r} is not a member extension: lowercase letters, digits and _, parts "
                    "joined by '.' (the reader lowercases extensions), e.g. cls, txt, meta.json",
                )
            )
            continue
        if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
            problems.append(
                (
                    "source.keep",
                    f"{ext!r} is a pickle extension ({', '.join(sorted(PICKLE_EXTS))}): shards "
                    "are untrusted and nothing is unpickled; store labels as cls, txt or json",
                )
            )
        elif ext in payload:
            problems.append(
                (
                    "source.keep",
                    f"{ext!r} is a payload extension of source.kind={kind} "
                    f"({', '.join(payload)}): the payload is x_0, not conditioning",
                )
            )
        col = column_name(ext)
        if col in reserved_names():  # the fixed columns of pipeline.output.records
            problems.append(
                ("source.keep", f"{ext!r} would be column {col!r}, a column of every record")
            )
        elif col in columns:
            problems.append(
                ("source.keep", f"{columns[col]!r} and {ext!r} would both be column {col!r}")
            )
        columns.setdefault(col, ext)
    for ext in require:
        if ext not in keep:
            problems.append(
                ("source.require", f"{ext!r} is not in source.keep {keep}: only kept members")
            )
    if len(set(require)) != len(require):
        problems.append(("source.require", f"duplicate entries in {require}"))
    if names is not None:
        try:
            _names(names)
        except ValueError as exc:
            problems.append(("source.class_names", str(exc)))
        if "cls" not in keep:
            problems.append(
                ("source.class_names", f"names cls labels, but cls is not in source.keep {keep}")
            )
    return problems


@dataclass(frozen=True)
class Kept:
    """One kept member: its extension, column, kind (how it is parsed) and Arrow type name."""

    ext: str
    column: str
    kind: str
    type: str


class Conditioning:
    """The extractor of kept members: ``extract(members) -> {column: value}`` for one sample.

    Build it from a ``source`` config group (:meth:`from_source`) or from the ``conditioning``
    entry of the process metadata (:meth:`from_spec`); :meth:`describe` is that entry.
    """

    def __init__(
        self,
        keep: Sequence[str] = DEFAULT_KEEP,
        require: Sequence[str] = (),
        max_member_bytes: int | None = None,
        class_names: Sequence[str] | None = None,
    ):
        keep, require = list(keep), list(require)
        names = None if class_names is None else list(class_names)
        problems = _problems(keep, require, None, names)
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        self.kept = tuple(Kept(e, column_name(e), kind_of(e), KINDS[kind_of(e)]) for e in keep)
        self.require = tuple(require)
        self.max_member_bytes = max_member_bytes  # None: the reader's limit only
        self.class_names = None if names is None else tuple(names)

    @classmethod
    def from_source(cls, source: SourceConfig) -> Conditioning:
        """From the typed ``source`` group (or the composed DictConfig): its ``keep``,
        ``require``, ``max_member_bytes`` and ``class_names``."""
        return cls(source.keep, source.require, source.max_member_bytes, class_names(source))

    @classmethod
    def from_spec(cls, spec: Mapping | None) -> Conditioning:
        """From the metadata's ``conditioning`` entry; None (records written before it): none."""
        if not spec:
            return cls((), ())
        return cls(spec["keep"], spec.get("require", ()), class_names=spec.get("class_names"))

    def describe(self) -> dict:
        """The ``conditioning`` entry of the process metadata (what readers need); it holds
        ``class_names`` only when names are given."""
        out = {
            "keep": [k.ext for k in self.kept],
            "require": list(self.require),
            "columns": [
                {"column": k.column, "ext": k.ext, "kind": k.kind, "type": k.type}
                for k in self.kept
            ],
        }
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(k.column for k in self.kept)

    def fields(self) -> list[pa.Field]:
        """The nullable Arrow fields of the kept columns, in ``keep`` order."""
        return [pa.field(k.column, ARROW_TYPES[k.type], nullable=True) for k in self.kept]

    def __bool__(self) -> bool:
        return bool(self.kept)

    def extract(self, members: Mapping[str, bytes]) -> dict:
        """``{column: value or None}`` of one sample; DecodeError for a missing required member
        or a kept member that does not parse."""
        missing = [e for e in self.require if members.get(e) is None]
        if missing:
            names = ", ".join(f".{e}" for e in missing)
            raise DecodeError(
                f"required member{'s' if len(missing) > 1 else ''} {names} missing "
                f"(source.require); members: {sorted(members)}"
            )
        return {
            k.column: None if members.get(k.ext) is None else self.parse(k, members[k.ext])
            for k in self.kept
        }

    def parse(self, kept: Kept, data: bytes):
        """One member's value; DecodeError naming the member and why."""
        if self.max_member_bytes is not None and len(data) > self.max_member_bytes:
            raise DecodeError(
                "kept member too large",
                kept.ext,
                f"{len(data)} bytes > source.max_member_bytes={self.max_member_bytes}",
            )
        if kept.kind == "binary":
            return bytes(data)
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("not UTF-8 text", kept.ext, str(exc)) from None
        if kept.kind == "txt":
            return text
        if kept.kind == "cls":
            stripped = text.strip(" \t\r\n")
            if not _INT.fullmatch(stripped):
                raise DecodeError("class label is not an integer", kept.ext, _head(text))
            sign, digits = stripped[0] if stripped[0] in "+-" else "", stripped.lstrip("+-")
            digits = digits.lstrip("0") or "0"  # int() raises beyond 4300 digits, zeros included
            if len(digits) > INT64_DIGITS:
                detail = f"{_head(text)} ({len(digits)} digits)"
                raise DecodeError("class label out of int64 range", kept.ext, detail)
            value = int(sign + digits)
            if not INT64[0] <= value <= INT64[1]:
                raise DecodeError("class label out of int64 range", kept.ext, _head(text))
            names = self.class_names
            if names is not None and kept.ext == "cls" and not 0 <= value < len(names):
                raise DecodeError(
                    "class label not in source.class_names",
                    kept.ext,
                    f"{value}; {len(names)} names, labels 0 to {len(names) - 1}",
                )
            return value
        try:
            json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise DecodeError("invalid JSON", kept.ext, f"{type(exc).__name__}: {exc}") from None
        return text


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _head(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def spec_of(metadata: Mapping | None) -> Conditioning:
    """The Conditioning a file's process metadata describes (none for older files)."""
    return Conditioning.from_spec((metadata or {}).get("conditioning"))
