"""The precompute driver: ``python -m pipeline.precompute source.urls=... output.dir=...``.

Composes and validates the Hydra config (before Ray starts), prepares ``output.dir``
(:mod:`pipeline.output.prepare`) and resumes from what it already holds
(:mod:`pipeline.output.resume`), fixes the sample shape and the process metadata
(:mod:`pipeline.run.metadata`), hands the shards to a pool of
:class:`pipeline.run.worker.ShardWorker` actors (:mod:`pipeline.run.dispatch`: an idle actor takes
the next shard, failed shards are retried), and writes the manifest, ``rejects.jsonl``
(:mod:`pipeline.run.jobstate`) and a summary. Exit codes: :class:`pipeline.errors.ExitCode`
(``--help`` lists them).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.encode.memory import fit_batch_size, host_memory_share, working_set_per_sample
from pipeline.errors import ExitCode, JobError, PipelineError, describe, internal_error
from pipeline.fs import is_remote
from pipeline.output import resume
from pipeline.output.description import ProcessMetadata
from pipeline.output.lease import LeaseError, OutputLease
from pipeline.output.manifest import MANIFEST, CorruptFileError, OutputDir
from pipeline.output.prepare import prepare_output
from pipeline.read.conditioning import class_names
from pipeline.read.source import SampleError, check_unique_ids, expand_globs, expand_urls, shard_id
from pipeline.run.config import (
    config_hash,
    multirun_refusal,
    quote_url_overrides,
    register_configs,
    validate,
)
from pipeline.run.dispatch import dispatch
from pipeline.run.jobstate import JobState, ShardTask
from pipeline.run.metadata import dataset_metadata, refuse_missing_shards, sample_shape
from pipeline.run.raysession import RayConnectError, ray_session

__all__ = [
    "JobError",
    "JobState",
    "ShardTask",
    "dataset_metadata",
    "format_summary",
    "main",
    "run",
    "sample_shape",
]

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Run the job for a composed config; returns the manifest with an ``exit_code``."""
    validate(cfg)
    if not is_remote(cfg.output.dir):  # actors on other nodes resolve it the same way
        cfg.output.dir = os.path.abspath(cfg.output.dir)
    if isinstance(cfg.source.class_names, str):  # actors get the names, not the file
        cfg.source.class_names = class_names(cfg.source)
    spec = cfg.source.urls
    urls = expand_globs(expand_urls(spec if isinstance(spec, str) else list(spec)))
    ids = check_unique_ids(urls)
    out = OutputDir(cfg.output.dir)
    try:
        out.makedirs()
    except OSError as exc:
        raise JobError(
            f"output.dir={out.display()} is not writable (cannot create it): {exc}"
        ) from exc
    lease = OutputLease(out, cfg.output.lease_timeout_s)
    try:
        lease.acquire()
    except (LeaseError, OSError) as exc:
        raise JobError(str(exc)) from exc
    try:
        return _run(cfg, out, lease, urls, ids)
    except (LeaseError, resume.OutputRefused, CorruptFileError) as exc:
        raise JobError(str(exc)) from exc
    finally:
        lease.release()


def manifest_shape(out: OutputDir, old: dict | None) -> list[int] | None:
    """The sample shape an earlier run of ``out`` fixed (its manifest's ``process`` block), None
    without one; JobError (exit 2) naming the manifest when that block is of a newer format than
    this version reads, or not a process description."""
    if old is None or not (old.get("process") or {}).get("shape"):
        return None
    try:
        return ProcessMetadata.from_json(old["process"]).shape
    except (ValueError, TypeError) as exc:
        raise JobError(
            f"{out.display(MANIFEST)}: {exc}; resume it with the version that wrote it, or write "
            "to a new output.dir"
        ) from None


def _run(cfg: DictConfig, out: OutputDir, lease: OutputLease, urls: list, ids: dict) -> dict:
    chash = config_hash(cfg)
    old = prepare_output(out, cfg, chash)
    summaries = resume.committed_shards(out, ids, chash, old)
    resume.stale_dataset_files(out, old)  # the empty prompt's embedding: written again
    shape = manifest_shape(out, old) or sample_shape(cfg, urls)
    refuse_missing_shards([u for u in urls if shard_id(u) not in summaries])
    try:  # a sample that cannot fit in an actor's memory would only kill actor after actor
        per_sample = working_set_per_sample(shape, cfg.sampling.draws_per_sample)
        fit_batch_size(1, per_sample, host_memory_share(cfg.ray.cpus_per_actor), where="host")
    except MemoryError as exc:
        raise JobError(f"sample shape {list(shape)}: {exc}") from exc
    job = JobState(
        cfg=cfg,
        out=out,
        lease=lease,
        metadata=dataset_metadata(cfg, shape, chash),
        shards=[ShardTask(u, shard_id(u)) for u in urls],
        summaries=summaries,
    )
    job.write_manifest(final=False)
    log.info(
        "%d shards, %d already committed, %d to do",
        len(job.shards), len(summaries), len(job.pending),
    )  # fmt: skip
    if job.pending or job.missing_dataset_files():  # an actor's setup writes those
        try:
            with ray_session(cfg.ray.address):
                dispatch(job)
        except RayConnectError as exc:
            raise JobError(str(exc)) from exc
    manifest = job.write_manifest(final=True)
    job.write_rejects(manifest)
    t = manifest["totals"]
    manifest["missing_files"] = job.missing_dataset_files()  # no actor could start
    clean = t["partial"] == 0 and t["failed"] == 0 and t["records"] > 0
    clean = clean and not manifest["missing_files"]
    manifest["exit_code"] = int(ExitCode.OK if clean else ExitCode.FAILED)
    manifest["wall_seconds"] = time.time() - job.started
    # samples of the shards committed before this run (resume): not this run's throughput
    manifest["resumed_samples"] = sum(int(s.samples or 0) for s in summaries.values())
    return manifest


def _why_no_records(t: dict) -> str:
    """What a job without records did, from its totals: no shard read, every sample rejected, or
    no sample at all."""
    if t["shards"] and t["failed"] == t["shards"]:
        return f"no shard could be read ({t['failed']} failed, their errors below)"
    if t["rejected"] and t["rejected"] == t["samples"]:
        failed = f"; {t['failed']} shards failed (below)" if t["failed"] else ""
        return f"every sample read was rejected (see rejects.jsonl){failed}"
    if t["samples"] == 0:
        return "the shards that were read hold no sample" + (
            f"; {t['failed']} shards failed (below)" if t["failed"] else ""
        )
    return f"{t['samples']} samples read, {t['rejected']} rejected, {t['failed']} shards failed"


def format_summary(manifest: dict) -> str:
    t = manifest["totals"]
    secs = manifest.get("wall_seconds", 0.0)
    resumed = manifest.get("resumed_samples", 0)
    done = t["samples"] - resumed  # read by this run (a resume keeps the committed shards)
    rate = f"throughput: {done / max(secs, 1e-9):.1f} samples/s"
    if resumed:
        rate += f" ({done} samples this run, {resumed} kept from committed shards)"
    lines = [
        f"shards: {t['shards']} ({t['ok']} ok, {t['partial']} partial, {t['failed']} failed)",
        f"samples: {t['samples']}  records: {t['records']}  rejected: {t['rejected']}",
        f"bytes: {t['bytes'] / 1e6:.1f} MB  wall: {secs:.1f} s  {rate}",
        f"output: {manifest['config']['output']['dir']}",
    ]
    if t["records"] == 0:
        lines.append("  no records were written: " + _why_no_records(t))
    for sid, e in manifest["shards"].items():
        if e["status"] in ("partial", "failed"):
            lines.append(f"  {e['status']} shard {sid} ({e['url']}): {e.get('error')}")
    for name in manifest.get("missing_files") or ():
        lines.append(f"  {name} was not written (an actor writes it at setup): rerun the job")
    return "\n".join(lines)


def _config_error(exc: BaseException) -> None:
    """A config that Hydra or OmegaConf refused: one line naming the key, exit code 2."""
    from pipeline.run.config import config_error_message

    print(f"error: {config_error_message(exc)}", file=sys.stderr)
    sys.exit(ExitCode.CANNOT_START)


def _job(cfg: DictConfig) -> None:
    """The Hydra task: run the job for the composed config and exit with its code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.run.config import check_keys

    try:
        check_keys(cfg)  # a key added with +/++ that the schema lacks; a required value unset
        manifest = run(cfg)
    except (HydraException, OmegaConfBaseException) as exc:  # some are ValueErrors
        _config_error(exc)
    except PipelineError as exc:  # printed once (a log line too would repeat it)
        on_error = " (on_error=fail)" if isinstance(exc, SampleError) else ""
        print(f"error{on_error}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # e.g. output.dir became unwritable mid-run
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(ExitCode.FAILED)
    except Exception:  # a bug: never reported as a config error
        sys.exit(internal_error())
    print(format_summary(manifest))
    sys.exit(manifest["exit_code"])


def main() -> None:
    """``diffusion-precompute``: Hydra's command line (overrides, ``--help``, ``--cfg job``).

    The configs come from :data:`pipeline.run.config.CONF_DIR`; Hydra writes nothing to the working
    directory (the ``hydra:`` block of conf/config.yaml). A config that Hydra or OmegaConf
    refuses (a required value unset, an unknown key, an override it cannot parse) exits 2 with
    one line naming the key; ``HYDRA_FULL_ERROR=1`` adds the traceback."""
    import os
    import traceback

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.run.config import CONF_DIR

    register_configs()
    if not OmegaConf.has_resolver("exit_codes"):  # --help's paragraph (pipeline/errors.py)
        OmegaConf.register_new_resolver("exit_codes", describe)
    refusal = multirun_refusal(sys.argv[1:])
    if refusal is not None:  # before Hydra: its sweeper would write multirun/ into the cwd
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(ExitCode.CANNOT_START)
    sys.argv[1:] = quote_url_overrides(sys.argv[1:])
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises a config error instead of exiting 1
    task = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_job)
    try:
        task()
    except (HydraException, OmegaConfBaseException) as exc:
        if show_traceback:
            traceback.print_exc()
        _config_error(exc)


if __name__ == "__main__":
    main()
