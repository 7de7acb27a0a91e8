"""The validator's run: open the dataset, plan and scan its shards, run the checks, write the
report (:func:`run`).

One pass over the records, bounded memory whatever the dataset size: every committed shard is
read one Parquet batch at a time by a Ray task or a local process
(:func:`pipeline.validate.scan.scan_shard`; which one: :mod:`pipeline.validate.executor`), and the
per-shard statistics (mergeable moments, co-moments, reservoirs, hashes; see
:mod:`pipeline.validate.stats`) are merged on the driver as tasks finish
(:class:`pipeline.validate.measures.DatasetStats`). Everything about the process comes from the
dataset itself: the manifest's ``process`` block and every file's ``ddpm`` metadata. The checks
(:data:`pipeline.validate.checks.CHECKS`) then give their verdicts, and
:mod:`pipeline.validate.report` writes the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import CannotStart, ExitCode, UsageError
from pipeline.output import records
from pipeline.output.description import ProcessMetadata
from pipeline.output.manifest import (
    COMMITTED,
    MANIFEST,
    MANIFEST_FORMAT,
    CorruptFileError,
    OutputDir,
)
from pipeline.read.buckets import data_names_by_shard
from pipeline.validate.config import check_values
from pipeline.validate.cost import cost_seconds
from pipeline.validate.inventory import take_inventory
from pipeline.validate.measures import DatasetStats
from pipeline.validate.plan import make_plan, shared_grid_t
from pipeline.validate.report import REPORT_FORMAT, dataset_summary, write_report


class CannotValidate(CannotStart):
    """The validator cannot run; the message names the path or config key (exit code 2)."""


def _check_config(cfg: DictConfig) -> None:
    """Values beyond their types (the schema checked those): CannotValidate naming the key."""
    try:
        check_values(cfg)
    except UsageError as exc:
        raise CannotValidate(str(exc)) from None


def open_dataset(uri: str) -> tuple[OutputDir, dict]:
    """The output dir and its manifest; CannotValidate (exit 2) naming the path otherwise."""
    try:
        out = OutputDir(uri)
        info = out.fs.get_file_info(out.root)
    except (OSError, ValueError, ImportError, NotImplementedError) as exc:  # unknown scheme, ...
        raise CannotValidate(f"cannot open output.dir {uri!r}: {exc}") from None
    if info.type.name != "Directory":
        raise CannotValidate(f"output.dir {out.display()}: no such directory")
    try:
        manifest = out.read_manifest()
    except (OSError, ValueError) as exc:  # unreadable, not JSON (CorruptFileError names it)
        raise CannotValidate(f"cannot read {out.display(MANIFEST)}: {exc}") from None
    if manifest is None:
        raise CannotValidate(
            f"no {MANIFEST} in {out.display()}: "
            "not written by pipeline.precompute (or never started)"
        )
    if manifest.get("format") != MANIFEST_FORMAT or "process" not in manifest:
        found = manifest.get("format")
        raise CannotValidate(
            f"{out.display(MANIFEST)}: format {found!r}, expected {MANIFEST_FORMAT}"
        )
    return out, manifest


def _scan_all(cfg: DictConfig, out: OutputDir, shards: list[str], ds: DatasetStats) -> None:
    """Scan the shards with the executor the config names (:mod:`pipeline.validate.executor`: Ray
    tasks or a local process pool); CannotValidate when Ray cannot start or the pool cannot run."""
    from pipeline.run.raysession import RayConnectError
    from pipeline.validate.executor import CannotStart, scan_all

    try:
        scan_all(cfg, out, shards, ds)
    except (RayConnectError, CannotStart) as exc:
        raise CannotValidate(str(exc)) from None


def positional(manifest: dict) -> list | None:
    """The sample shape the statistics per tensor position (the shared-noise test, the
    report's strip) are taken at: for a bucketed dataset the shape of the bucket with the most
    records (ties: the first in the manifest's bucket table), since the process's ``shape`` is
    the largest configured bucket, which may hold no record; None otherwise (the process's)."""
    rows = [r for r in manifest.get("buckets") or () if r.get("records") and r.get("shape")]
    if not rows:
        return None
    best = max(rows, key=lambda r: int(r["records"]))  # max keeps the first of equals
    return [int(s) for s in best["shape"]]


def run(cfg: DictConfig) -> dict:
    """Validate the dataset at ``cfg.output.dir``; returns the report (``report["exit_code"]``
    is 0 or 1). Raises :class:`CannotValidate` when it cannot run (exit code 2)."""
    _check_config(cfg)
    t0 = time.perf_counter()
    out, manifest = open_dataset(cfg.output.dir)
    entries = manifest.get("shards", {})
    present = data_names_by_shard(out.data_files(), entries)  # one file, or one per bucket
    to_scan = [
        k for k, e in sorted(entries.items()) if e.get("status") in COMMITTED and k in present
    ]
    try:  # the manifest's description, parsed (a bug further on is no "bad description")
        process = ProcessMetadata.from_json(manifest["process"])
        schedule = records.process_from_metadata(process)  # a GaussianProcess, either family
        noise = records.noise_from_metadata(process)
        records.check_dtype(process.dtype)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise CannotValidate(f"{out.display(MANIFEST)}: bad process description ({what})") from None
    grid_t = shared_grid_t(process, manifest)  # flow: t-bins labelled by the records' t
    plan = make_plan(cfg, process, len(to_scan), positional(manifest), grid_t)
    ds = DatasetStats(plan, entries)
    if to_scan:
        _scan_all(cfg, out, to_scan, ds)
    try:
        inventory = take_inventory(out, text=bool(process.text))
    except CorruptFileError as exc:
        raise CannotValidate(str(exc)) from None
    from pipeline.validate.checks import (  # here: scipy (~0.7 s), not in scan processes' imports
        CHECKS,
        Context,
    )

    ctx = Context(ds, out, manifest, inventory, schedule, noise, cfg)
    t1 = time.perf_counter()
    ds.wall["open_and_plan"] = t1 - t0 - sum(ds.wall.values())
    results, check_s = [], {}
    for check in CHECKS:
        result = check.run(ctx)
        if result is not None:
            results.append(result)
        check_s[check.NAME] = round(time.perf_counter() - t1, 4)
        t1 = time.perf_counter()
    ds.wall["checks"] = sum(check_s.values())
    passed = all(c.passed for c in results)
    report = {
        "format": REPORT_FORMAT,
        "dataset": out.display(),
        "passed": passed,
        "exit_code": int(ExitCode.OK if passed else ExitCode.FAILED),
        "checks": [asdict(c) for c in results],
        "terminal": schedule.terminal(),
        "summary": {
            **dataset_summary(manifest, ds, noise),
            "cost_seconds": cost_seconds(ds.wall, ds.cost, check_s),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    try:
        write_report(
            report,
            ds,
            schedule,
            out=out,
            report_dir=cfg.output.report_dir,
            plots=bool(cfg.plots),
        )
    except OSError as exc:
        where = cfg.output.report_dir or out.display("validation")
        raise CannotValidate(
            f"cannot write the report to {where}: {exc}; set output.report_dir to a writable "
            "directory"
        ) from None
    return report
