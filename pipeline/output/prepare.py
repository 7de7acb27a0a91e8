"""The driver's preparation of ``output.dir`` before a run, with the lease held: refuse a
foreign directory or another config's records (naming the keys that differ), clear them with
``output.overwrite=true``, check it is writable and remove temporary files of interrupted
writes. The checks themselves are :mod:`pipeline.output.resume`'s.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline.errors import JobError
from pipeline.output import resume
from pipeline.output.manifest import SHARDS, OutputDir, is_temporary
from pipeline.run.config import process_config

log = logging.getLogger(__name__)


def config_differences(old: dict, new: dict) -> list[str]:
    """What differs between two process configs, one line per key; an encoder by its model,
    revision and file hashes (the same files read from another folder are no difference)."""
    from pipeline.encode import encoder

    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == "encoder":
            if encoder.hashed_identity(a or {}) != encoder.hashed_identity(b or {}):
                lines.append(f"encoder: {encoder.summary(a)} -> {encoder.summary(b)}")
        elif k == "text":
            from pipeline.encode import text

            if text.hashed_identity(a or {}) != text.hashed_identity(b or {}):
                lines.append(f"text: {text.summary(a)} -> {text.summary(b)}")
        else:
            lines += _differing_keys(k, a, b)
    return lines


_ABSENT = "(absent)"


def _differing_keys(key: str, a, b) -> list[str]:
    """``key.sub: a -> b`` for every leaf that differs between two values (nested dicts are
    walked, so one changed key is one line: ``source.resolution: 256 -> 128``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differing_keys(f"{key}.{k}", a.get(k, _ABSENT), b.get(k, _ABSENT))
        return out
    if a == b:
        return []
    show = [v if v is _ABSENT else repr(v) for v in (a, b)]
    return [f"{key}: {show[0]} -> {show[1]}"]


def prepare_output(out: OutputDir, cfg: DictConfig, chash: str) -> dict | None:
    """Check what ``output.dir`` holds (see :mod:`pipeline.output.resume`): refuse a foreign
    directory or, unless output.overwrite=true, another config's records (overwrite deletes only
    what this pipeline wrote); fail, naming the path, when it cannot be written. Call with the lease
    held. Returns the manifest of an earlier run of this config (None if there is none)."""
    old = out.read_manifest()
    resume.check_foreign(out, old)
    if old is not None and old.get("config_hash") != chash:
        if not cfg.output.overwrite:
            new = process_config(cfg)
            diff = config_differences(old.get("process_config", {}), new)
            raise JobError(
                f"{out.display()} holds records of another config (hash "
                f"{old.get('config_hash')} != {chash}; differences: "
                f"{'; '.join(diff) or 'unknown'}). Use another output.dir, or "
                "output.overwrite=true to delete them"
            )
        removed = resume.clear(out, old)
        log.warning("output.overwrite=true: deleted %d files of %s", len(removed), out.display())
        old = None
    try:
        resume.check_writable(out)
    except OSError as exc:
        raise JobError(f"output.dir={out.display()} is not writable: {exc}") from exc
    remove_temporaries(out)
    return old


def remove_temporaries(out: OutputDir) -> None:
    """This pipeline's temporary files of interrupted writes (a killed run, actor or node)."""
    for name in out.list() + out.list(SHARDS):
        if is_temporary(name):
            out.remove(name)
