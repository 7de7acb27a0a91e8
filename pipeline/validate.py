"""Validate a precomputed DDPM dataset: ``python -m pipeline.validate output.dir=/data/noised``.

This module is the orchestration: config, dataset, scans, checks, report. One pass over the
records, bounded memory whatever the dataset size: every committed shard is read one Parquet
batch at a time by a Ray task or a local process (:func:`pipeline.scan.scan_shard`; which one:
:mod:`pipeline.executor`), and the per-shard statistics
(mergeable moments, co-moments, reservoirs, hashes; see :mod:`pipeline.stats`) are merged on the
driver as tasks finish (:class:`pipeline.scan.DatasetStats`). Everything about the process comes
from the dataset itself: the manifest's ``process`` block and every file's ``ddpm`` metadata.

The named checks (:mod:`pipeline.checks`) each give a statistic, its expected value and a
tolerance of ``z`` standard errors (raised for families of tests), and a verdict.
:mod:`pipeline.report` writes the report to ``<output.dir>/validation/``: ``report.json``,
``report.md`` and PNG plots. The config's schema is :mod:`pipeline.validate_config`.

Exit codes: 0 every check passed (warnings allowed), 1 a check failed, 2 the validator could not
run (no such directory, no manifest, bad config value, ...), with a message naming the path/key.
What a shard scan measures: :class:`pipeline.scan.Stats`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from omegaconf import DictConfig, OmegaConf

from . import records
from .manifest import COMMITTED, MANIFEST, MANIFEST_FORMAT, REJECTS, CorruptFileError, OutputDir
from .report import REPORT_FORMAT, dataset_summary, format_console, write_report
from .scan import DatasetStats, ScanPlan, t_edges
from .validate_config import check_values, register_validate_configs


class CannotValidate(RuntimeError):
    """The validator cannot run; the message names the path or config key (exit code 2)."""


# -- orchestration ---------------------------------------------------------------------------


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/validate.yaml with command-line style overrides (``key=value``), typed by
    :class:`pipeline.validate_config.ValidateConfig`: an unknown key or a wrong type raises
    (Hydra's ConfigCompositionException, exit code 2 from :func:`main`)."""
    from .config import compose

    register_validate_configs()
    return compose(list(overrides), config_name="validate")


def _check_config(cfg: DictConfig) -> None:
    """Values beyond their types (the schema checked those): CannotValidate naming the key."""
    try:
        check_values(cfg)
    except ValueError as exc:
        raise CannotValidate(str(exc)) from None


def open_dataset(uri: str) -> tuple[OutputDir, dict]:
    """The output dir and its manifest; CannotValidate (exit 2) naming the path otherwise."""
    try:
        out = OutputDir(uri)
        info = out.fs.get_file_info(out.root)
    except Exception as exc:
        raise CannotValidate(f"cannot open output.dir {uri!r}: {exc}") from None
    if info.type.name != "Directory":
        raise CannotValidate(f"output.dir {out.display()}: no such directory")
    try:
        manifest = out.read_manifest()
    except Exception as exc:
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


def _plan(cfg: DictConfig, process: dict, n_files: int) -> ScanPlan:
    """The scan plan of every shard task: t-bins, reservoir sizes, regenerated records per file."""
    T = int(process["schedule"]["num_timesteps"])
    edges = t_edges(T, int(cfg.bins), float(cfg.terminal_window))
    quota = math.ceil(cfg.max_consistency_records / max(n_files, 1))
    return ScanPlan(
        process=process,
        edges=edges,
        reservoir_size=int(cfg.reservoir_size),
        recon_min_alpha_bar=float(cfg.reconstruct_min_alpha_bar),
        batch_elements=int(cfg.batch_elements),
        seed=int(cfg.seed),
        consistency_quota=quota,
        grid=bool(cfg.plots),
    )


def _scan_all(cfg: DictConfig, out: OutputDir, shards: list[str], ds: DatasetStats) -> None:
    """Scan the shards with the executor the config names (:mod:`pipeline.executor`: Ray tasks
    or a local process pool); CannotValidate when Ray cannot start or the pool cannot run."""
    from .executor import CannotStart, scan_all
    from .raysession import RayConnectError

    try:
        scan_all(cfg, out, shards, ds)
    except (RayConnectError, CannotStart) as exc:
        raise CannotValidate(str(exc)) from None


def run(cfg: DictConfig) -> dict:
    """Validate the dataset at ``cfg.output.dir``; returns the report (``report["exit_code"]``
    is 0 or 1). Raises :class:`CannotValidate` when it cannot run (exit code 2)."""
    _check_config(cfg)
    t0 = time.perf_counter()
    out, manifest = open_dataset(cfg.output.dir)
    process = manifest["process"]
    entries = manifest.get("shards", {})
    present = set(out.data_files())
    to_scan = [
        k
        for k, e in sorted(entries.items())
        if e.get("status") in COMMITTED and OutputDir.data_name(k) in present
    ]
    try:
        schedule = records.schedule_from_metadata(process)
        noise = records.noise_from_metadata(process)
        records.check_dtype(process["dtype"])
        ds = DatasetStats(_plan(cfg, process, len(to_scan)), entries)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise CannotValidate(f"{out.display(MANIFEST)}: bad process description ({what})") from None
    if to_scan:
        _scan_all(cfg, out, to_scan, ds)
    try:
        rejects = out.read_jsonl(REJECTS) if out.exists(REJECTS) else None
    except CorruptFileError as exc:
        raise CannotValidate(str(exc)) from None
    from . import checks, latents_check  # here: scipy (~0.7 s), not in scan processes' imports

    z, fc = float(cfg.z), bool(cfg.family_correction)
    t1 = time.perf_counter()
    ds.wall["open_and_plan"] = t1 - t0 - sum(ds.wall.values())
    results, check_s = [], {}
    for check, args in (
        (checks.completeness, (ds, out, manifest, rejects)),
        (checks.record_consistency, (ds, z, fc)),
        (checks.keyed_noise, (ds, z, fc)),
        (checks.epsilon_moments, (ds, z, fc)),
        (checks.epsilon_normality, (ds, z, fc)),
        (checks.noise_independence, (ds, z, fc)),
        (checks.variance_preservation, (ds, z, fc)),
        (checks.convergence, (ds, schedule, z, fc, float(cfg.terminal_mean_shift))),
        (checks.timestep_distribution, (ds, noise.sampler, z, fc)),
        (checks.conditioning, (ds,)),
    ):
        results.append(check(*args))
        check_s[results[-1].name] = round(time.perf_counter() - t1, 4)
        t1 = time.perf_counter()
    results += latents_check.latent_scale(ds)  # latent records (encoder=vae) only
    check_s["latent_scale"] = round(time.perf_counter() - t1, 4)
    ds.wall["checks"] = sum(check_s.values())
    passed = all(c.passed for c in results)
    report = {
        "format": REPORT_FORMAT,
        "dataset": out.display(),
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "checks": [asdict(c) for c in results],
        "terminal": schedule.terminal(),
        "summary": {
            **dataset_summary(manifest, ds, noise),
            "cost_seconds": ds.cost_seconds(check_s),
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


# -- entry points ----------------------------------------------------------------------------


def run_validation(output_dir: str, *overrides: str) -> int:
    """Validate ``output_dir`` with default settings plus overrides; print; return the exit code."""
    return main([f"output.dir={output_dir}", *overrides])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``diffusion-validate output.dir=... [key=value ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from .config import CONF_DIR

        print(__doc__.split("\n\n")[0] + "\n\nKeys, set as key=value (conf/validate.yaml):\n")
        print((CONF_DIR / "validate.yaml").read_text())
        return 0
    try:
        cfg = load_config(argv)
        report = run(cfg)
    except CannotValidate as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # hydra override errors, unknown keys, ...
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from .config import config_error_message

        if isinstance(exc, (HydraException, OmegaConfBaseException)):
            print(f"error: {config_error_message(exc)}", file=sys.stderr)
            return 2
        raise
    print(format_console(report))
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
