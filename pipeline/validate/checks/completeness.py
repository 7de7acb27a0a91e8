"""The ``completeness`` check: every manifest shard committed with its file, marker and rows;
the accounting of records and rejects; no stray files; totals add up. It reads no file: the
scans read the markers, the driver lists the directory (:mod:`pipeline.validate.inventory`)."""

from __future__ import annotations

import posixpath
from collections import Counter

from pipeline.output.contracts import CommitMarker
from pipeline.output.manifest import COMMITTED, REJECTS, OutputDir
from pipeline.read.buckets import data_names_by_shard
from pipeline.validate.checks.context import Context
from pipeline.validate.figures import kept_nulls
from pipeline.validate.inventory import Inventory
from pipeline.validate.measures import DatasetStats
from pipeline.validate.verdict import Check, litem, verdict

NAME = "completeness"


PROBLEMS = (
    "failed or pending shards",
    "missing files",
    "missing commit markers",
    "damaged or mismatching commit markers",
    "files changed since their commit",
    "unreadable files",
    "row count differs from manifest",
    "records != (samples - rejected) x draws",
    "rejects.jsonl lines != rejected",
    "metadata differs from manifest",
    "duplicate (key, draw) in a shard",
    "keys without all draws",
    "files not in the manifest",
    "manifest totals differ from shards",
    "no records",
)


def _marker_problem(out: OutputDir, shard: str, entry: dict, scanned: dict, chash) -> str | None:
    """What is wrong with a committed shard's marker (its commit point), or None; the marker
    was read by the shard's scan (``scanned``: its summary in DatasetStats.shards)."""
    name = OutputDir.marker_name(shard)
    marker, error = scanned.get("marker"), scanned.get("marker_error")
    if marker is None:
        return error or f"{out.display(name)}: listed, but gone when its shard was scanned"
    for key, got in (("status", marker.status), ("records", marker.records)):
        if got != entry.get(key):
            return f"{out.display(name)}: {key} {got!r}, manifest {entry.get(key)!r}"
    if marker.config_hash is not None and marker.config_hash != chash:  # None: an old marker
        return f"{out.display(name)}: config hash {marker.config_hash}, dataset {chash}"
    return None


def _file_changed(out: OutputDir, shard: str, scanned: dict) -> str | None:
    """How a committed file differs from what its marker recorded at commit (size, checksum),
    or None; a marker without a checksum (an older version's) is checked by size only."""
    marker: CommitMarker | None = scanned.get("marker")
    found = scanned.get("file_check") or {}
    if marker is None:
        return None  # reported by _marker_problem
    name = out.display(OutputDir.data_name(shard))
    if marker.files is not None:  # a bucketed shard: each of its files
        for f in marker.files:
            got = (found.get("files") or {}).get(f.name)
            why = _entry_changed(out, f.name, (f.bytes, f.checksum), got)
            if why:
                return why
        return _sides_changed(out, marker, found)
    if found.get("error"):
        return None  # an unreadable file is reported as such
    if marker.bytes is not None and found.get("bytes") != marker.bytes:
        return f"{name}: {found.get('bytes')} bytes, its commit marker says {marker.bytes}"
    if marker.checksum is not None and found.get("checksum") != marker.checksum:
        return (
            f"{name}: checksum {str(found.get('checksum'))[:19]}, its commit marker says "
            f"{marker.checksum[:19]} (rewritten or damaged since it was committed)"
        )
    return _sides_changed(out, marker, found)


def _sides_changed(out: OutputDir, marker: CommitMarker, found: dict) -> str | None:
    for side, want in sorted((marker.side_files or {}).items()):
        got = (found.get("side_files") or {}).get(side)
        why = _entry_changed(out, side, (want.get("bytes"), want.get("checksum")), got)
        if why:
            return why
    return None


def _entry_changed(
    out: OutputDir, name: str, want: tuple, got: dict | None, by: str = "its commit marker"
) -> str | None:
    """How one file a marker lists (a bucket file or a side file; ``by``: who recorded it)
    differs from its entry (``want``: (bytes, checksum)) as found (``got``), or None; a missing
    or unreadable file is reported as such elsewhere."""
    got = got or {}
    if got.get("missing") or got.get("error"):
        return None
    if (got.get("bytes"), got.get("checksum")) == tuple(want):
        return None
    return (
        f"{out.display(name)}: {got.get('bytes')} bytes, checksum "
        f"{str(got.get('checksum'))[:19]}; {by} says {want[0]} "
        f"bytes, {str(want[1])[:19]} (rewritten or damaged since it was recorded)"
    )


def _dataset_files(out: OutputDir, manifest: dict, inv: Inventory, prob: dict) -> list[str]:
    """The dataset's own files (the empty prompt's embedding) as found against the manifest's
    ``side_files``: missing, unreadable or changed (added to ``prob``); returns the notes (a
    manifest of an older version records no checksum)."""
    recorded, notes = manifest.get("side_files") or {}, []
    for name, got in sorted((inv.dataset_files or {}).items()):
        want = recorded.get(name)
        if got.get("missing"):
            prob["missing files"].append(out.display(name))
        elif got.get("error"):
            prob["unreadable files"].append(f"{out.display(name)}: {got['error']}")
        elif isinstance(want, dict):
            entry = (want.get("bytes"), want.get("checksum"))
            why = _entry_changed(out, name, entry, got, "the manifest's side_files")
            if why:
                prob["files changed since their commit"].append(why)
        else:
            notes.append(
                f"{out.display(name)} has no checksum in the manifest (written by an older "
                "version): not verified; a rerun of the job records it"
            )
    return notes


def _side_problems(out: OutputDir, scanned: dict) -> tuple[list[str], list[str]]:
    """(missing, unreadable) side files of a committed shard (its text embedding table) and
    bucket files (a bucketed shard's data files)."""
    check = scanned.get("file_check") or {}
    found = {**(check.get("files") or {}), **(check.get("side_files") or {})}
    missing = [out.display(n) for n, f in sorted(found.items()) if f.get("missing")]
    bad = [f"{out.display(n)}: {f['error']}" for n, f in sorted(found.items()) if f.get("error")]
    return missing, bad


def completeness(ds: DatasetStats, out: OutputDir, manifest: dict, inv: Inventory) -> Check:
    """Every manifest shard committed, with its file and its side files (the text table; the
    size and checksum its marker recorded at commit: a file rewritten or damaged since fails),
    and the dataset's own files (the empty prompt's embedding: the manifest's ``side_files``),
    marker and row count; accounting
    records = (samples - rejected) x K and rejects.jsonl; (key, draw) unique and complete per
    shard; file metadata = manifest process; no stray files; totals add up. ``out`` only names
    paths; what the directory holds is in ``inv``."""
    K = ds.plan.process.draws_per_sample
    shards = manifest.get("shards", {})
    committed = {k for k, e in shards.items() if e.get("status") in COMMITTED}
    prob: dict[str, list] = {k: [] for k in PROBLEMS}
    markers, rejects = inv.markers, inv.rejects
    rejected = Counter(r.get("shard") for r in rejects or () if r.get("key") is not None)
    unverified = 0  # committed by an older version: no checksum in the marker
    for k, e in sorted(shards.items()):
        s, ids = ds.shards.get(k), ds.shards.get(k, {}).get("ids", {})
        if k not in committed:
            prob["failed or pending shards"].append(f"{k} ({e.get('status')}): {e.get('error')}")
            continue
        if s is None:
            prob["missing files"].append(out.display(OutputDir.data_name(k)))
            continue
        marker_bad = (  # a scan that died read no marker: its shard is an unreadable file
            _marker_problem(out, k, e, s, manifest.get("config_hash"))
            if k in markers and not s.get("died")
            else None
        )
        changed = _file_changed(out, k, s) if k in markers and not marker_bad else None
        if s.get("marker") is not None:  # a bucketed marker has a checksum per file
            unverified += sum(not f.checksum for f in s["marker"].data_files(k))
        checks = (
            ("missing commit markers", k not in markers, k),
            ("damaged or mismatching commit markers", marker_bad, marker_bad),
            ("files changed since their commit", changed, changed),
            ("unreadable files", s["error"], f"{s['file']}: {s['error']}"),
            (
                "row count differs from manifest",
                not s["error"] and s["rows"] != e.get("records"),
                f"{k}: {s['rows']} rows, manifest {e.get('records')}",
            ),
            ("metadata differs from manifest", s["meta_problems"], f"{k}: {s['meta_problems']}"),
            (
                "records != (samples - rejected) x draws",
                e.get("records") != (e.get("samples", 0) - e.get("rejected", 0)) * K,
                f"{k}: {e.get('records')} != ({e.get('samples')} - {e.get('rejected')}) x {K}",
            ),
            (
                "rejects.jsonl lines != rejected",
                rejects is not None and rejected[k] != e.get("rejected", 0),
                f"{k}: {rejected[k]} lines, manifest {e.get('rejected')}",
            ),
            (
                "duplicate (key, draw) in a shard",
                ids.get("duplicate_key_draw"),
                f"{k}: {ids.get('duplicate_key_draw')}",
            ),
            (
                "keys without all draws",
                ids.get("keys_without_K_draws") or ids.get("draw_out_of_range"),
                f"{k}: {ids.get('keys_without_K_draws')} keys, "
                f"{ids.get('draw_out_of_range')} draws outside [0, {K})",
            ),
        )
        for what, bad, msg in checks:
            if bad:
                prob[what].append(msg)
        missing, unreadable = _side_problems(out, s)
        prob["missing files"] += missing
        prob["unreadable files"] += unreadable
    notes = _dataset_files(out, manifest, inv, prob)
    if unverified:
        notes.append(
            f"{unverified} committed files have no checksum in their marker (committed by an "
            "older version): checked by size only; rerun with output.overwrite=true to add them"
        )
    if rejects is None:
        notes.append(f"{out.display(REJECTS)} not found")
        if any(e.get("rejected") for e in shards.values()):
            prob["rejects.jsonl lines != rejected"].append(f"{out.display(REJECTS)} missing")
    owned = set()  # the data files of the committed shards: as their markers list them
    unlisted = []  # committed shards whose marker was not read: their files by name
    for k in committed:
        marker = (ds.shards.get(k) or {}).get("marker")
        files = marker.files if marker is not None else None
        owned.update([f.name for f in files] if files is not None else [OutputDir.data_name(k)])
        if marker is None:
            unlisted.append(k)
    for names in data_names_by_shard(inv.data_files, unlisted).values():
        owned.update(names)  # a bucketed shard's <shard>.<H>x<W>.parquet
    prob["files not in the manifest"] += [out.display(n) for n in inv.data_files if n not in owned]
    prob["files not in the manifest"] += [
        out.display(OutputDir.marker_name(m)) for m in sorted(markers - set(shards))
    ]
    prob["files not in the manifest"] += [  # a text table of no committed shard
        out.display(n) for n in inv.text_files if posixpath.basename(n)[:-8] not in committed
    ]
    if sum(shards[k].get("records", 0) for k in committed) == 0:
        prob["no records"].append(f"{out.display()}: no shard holds a record: nothing to train on")
    tot = manifest.get("totals") or {}
    for key in ("records", "samples", "rejected"):
        if key in tot and tot[key] != sum(shards[k].get(key, 0) for k in committed):
            prob["manifest totals differ from shards"].append(f"totals.{key} = {tot[key]}")
    items = [litem("dataset", k, len(v), 0, examples=v[:5]) for k, v in prob.items()]
    extra = {
        "statistic_name": "problems",
        "shards": len(shards),
        "committed": len(committed),
        "not_committed": sorted(set(shards) - committed),
        "nulls": kept_nulls(ds),  # per kept column (source.keep): records without the member
    }
    if extra["nulls"]:
        notes.append(
            "records with a null kept column (member absent): "
            + ", ".join(f"{c} {n}" for c, n in extra["nulls"].items())
        )
    return verdict(  # counts against 0: no z threshold
        NAME,
        [items],
        z=0.0,
        correct=False,
        notes=notes,
        statistic=sum(map(len, prob.values())),
        threshold=0,
        extra=extra,
    )


def run(ctx: Context) -> Check:
    return completeness(ctx.ds, ctx.out, ctx.manifest, ctx.inventory)
