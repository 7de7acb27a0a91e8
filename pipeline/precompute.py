"""The precompute driver: ``python -m pipeline.precompute source.urls=... output.dir=...``.

Composes and validates the Hydra config (before Ray starts), resumes from what ``output.dir``
already holds, starts a pool of :class:`pipeline.worker.ShardWorker` actors, hands shards out
dynamically (an idle actor takes the next shard), retries failed shards, and writes the manifest,
``rejects.jsonl`` and a summary. Exit codes: 0 every shard committed cleanly; 1 some shard failed
or was only partly readable, or ``on_error=fail`` stopped the job; 2 the job could not start
(bad config, output written with another config, no shards).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import __version__, resume, stages
from .buckets import bucket_table, data_names_by_shard, describe_buckets, largest_shape
from .buckets import config_problems as bucket_problems
from .conditioning import Conditioning, class_names
from .config import (
    config_hash,
    multirun_refusal,
    process_config,
    quote_url_overrides,
    register_configs,
    targets,
    validate,
)
from .decoders import make_decoder
from .fs import is_remote
from .lease import LeaseError, OutputLease
from .manifest import (
    COMMITTED,
    MANIFEST,
    MANIFEST_FORMAT,
    REJECTS,
    SHARDS,
    CorruptFileError,
    OutputDir,
    is_temporary,
)
from .memory import fit_batch_size, host_memory_share, working_set_per_sample
from .noise import KeyedNoise
from .pool import ActorPool, death_cause, placement_problem, pool_size
from .process import from_config as process_from_config
from .raysession import RayConnectError, ray_session
from .records import make_metadata
from .source import (
    Sample,
    SampleError,
    check_unique_ids,
    expand_globs,
    expand_urls,
    iter_shard,
    missing_local_shards,
    shard_id,
)
from .tarstream import ReadLimits, ShardReadError, ShardTimeoutError
from .worker import ShardWorker  # torch-free to import: its actors load torch

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot start; the message says which config key or path to fix (exit code 2)."""


def sample_shape(cfg: DictConfig, urls: list[str]) -> list[int]:
    """The [C, ...] shape every record of this dataset has: from the config, or for arrays
    without ``source.shape`` from the first valid sample of the first shards (deterministic).
    With ``encoder=vae`` the latent shape of that input, from the model's config.json (no weights
    are loaded); JobError when the input does not fit the model (channels, size)."""
    from . import encoder

    buckets = bucket_shapes(cfg)
    if buckets is not None:  # aspect-ratio buckets: the largest of their shapes
        return largest_shape(buckets)
    shape = _input_shape(cfg, urls)
    if not encoder.enabled(cfg):
        return shape
    try:
        return encoder.latent_shape(encoder.describe_encoder(cfg).config, shape)
    except encoder.EncoderError as exc:
        raise JobError(f"encoder.model={cfg.encoder.model}: {exc}") from None


def bucket_shapes(cfg: DictConfig) -> list[dict] | None:
    """The aspect-ratio buckets and the record shape of each (:func:`describe_buckets`; the
    latent's with ``encoder=vae``); None when ``source.buckets`` is null. With an encoder every
    bucket must be a whole number of its latent cells (the downsampling factor f): JobError
    naming ``source.bucket_step`` (auto) or ``source.buckets`` otherwise."""
    from . import encoder

    source = OmegaConf.to_container(cfg.source, resolve=True)
    if source.get("kind") != "images" or source.get("buckets") is None:
        return None
    if not encoder.enabled(cfg):
        return describe_buckets(source)
    config = encoder.describe_encoder(cfg).config
    for key, message in bucket_problems(source, patch=encoder.downsampling_factor(config)):
        raise JobError(f"{key}: {message} (encoder.model={cfg.encoder.model})")
    try:
        return describe_buckets(source, lambda pixels: encoder.latent_shape(config, pixels))
    except encoder.EncoderError as exc:
        raise JobError(f"encoder.model={cfg.encoder.model}: {exc}") from None


def refuse_missing_shards(urls: list[str]) -> None:
    """ValueError (exit 2) naming the first of ``urls`` that is a local path and not a file: on
    the driver in a second, before Ray starts, instead of by an actor's retries."""
    missing = missing_local_shards(urls)
    if missing:
        more = (
            f" ({len(missing)} of the {len(urls)} shards to read are missing)"
            if len(missing) > 1
            else ""
        )
        raise ValueError(f"source.urls: shard {missing[0]} does not exist{more}")


def _input_shape(cfg: DictConfig, urls: list[str]) -> list[int]:
    src = cfg.source
    if src.kind == "images":
        return [src.channels, src.resolution, src.resolution]
    if src.shape is not None:
        return list(src.shape)
    refuse_missing_shards(urls)  # before reading the first shards for their shape
    for url in urls:
        try:
            source = OmegaConf.to_container(src)
            limits = ReadLimits.from_source(source)
            for item in iter_shard(url, make_decoder(source), on_error="skip", limits=limits):
                if isinstance(item, Sample):
                    log.info(
                        "array shape %s taken from %s key %s", list(item.array.shape), url, item.key
                    )
                    return list(item.array.shape)
        except ShardReadError:
            continue
    raise JobError(
        "no valid sample found in any shard to fix the array shape; set source.shape=[C,H,W]"
    )


def dataset_metadata(cfg: DictConfig, shape: list[int], chash: str) -> dict:
    sch, s = cfg.schedule, cfg.sampling
    try:  # the grid of this shape is built here: a dynamic shift's shape problem is exit 2
        proc = process_from_config(OmegaConf.to_container(sch, resolve=True), shape)
    except ValueError as exc:
        raise JobError(f"sample shape {list(shape)}: {exc}") from None
    noise = KeyedNoise(
        cfg.seed, sch.num_timesteps, s.draws_per_sample, s.timesteps, family=proc.family,
        logit_mean=s.logit_mean, logit_std=s.logit_std, mode_scale=s.mode_scale,
    )  # fmt: skip
    extra, store_x0 = targets(cfg)
    meta = make_metadata(
        schedule=proc,
        noise=noise,
        dtype=cfg.output.dtype,
        shape=shape,
        store_x0=store_x0,
        targets=extra,
        config_hash=chash,
        source=process_config(cfg)["source"],
        library_version=__version__,
        encoder=_encoder_metadata(cfg, shape),
        conditioning=Conditioning.from_source(cfg.source).describe(),
        buckets=bucket_shapes(cfg),
    )
    from . import text

    if text.enabled(cfg):  # the text encoders' identity (pipeline/text.py)
        meta["text"] = process_config(cfg)["text"]
    return meta


def _encoder_metadata(cfg: DictConfig, shape: list[int]) -> dict | None:
    """The ``encoder`` entry of the metadata: the model's identity and the input shape the
    actors decode to (``shape`` is the latent's)."""
    from . import encoder

    if not encoder.enabled(cfg):
        return None
    meta = process_config(cfg)["encoder"]
    return {**meta, "input_shape": encoder.input_shape(meta, shape)}


def _config_differences(old: dict, new: dict) -> list[str]:
    """What differs between two process configs, one line per key; an encoder by its model,
    revision and file hashes (the same files read from another folder are no difference)."""
    from . import encoder

    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == "encoder":
            if encoder.hashed_identity(a or {}) != encoder.hashed_identity(b or {}):
                lines.append(f"encoder: {encoder.summary(a)} -> {encoder.summary(b)}")
        elif k == "text":
            from . import text

            if text.hashed_identity(a or {}) != text.hashed_identity(b or {}):
                lines.append(f"text: {text.summary(a)} -> {text.summary(b)}")
        else:
            lines += _differing_keys(k, a, b)
    return lines


_ABSENT = "(absent)"
PLACEMENT_WARN_S = 30.0  # with no actor placed, when to say what is asked against what nodes have


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


def _prepare_output(out: OutputDir, cfg: DictConfig, chash: str) -> dict | None:
    """Check what ``output.dir`` holds (see :mod:`pipeline.resume`): refuse a foreign directory
    or, unless output.overwrite=true, another config's records (overwrite deletes only what
    this pipeline wrote); fail, naming the path, when it cannot be written. Call with the lease
    held. Returns the manifest of an earlier run of this config (None if there is none)."""
    old = out.read_manifest()
    resume.check_foreign(out, old)
    if old is not None and old.get("config_hash") != chash:
        if not cfg.output.overwrite:
            new = process_config(cfg)
            diff = _config_differences(old.get("process_config", {}), new)
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
    _remove_temporaries(out)
    return old


def _remove_temporaries(out: OutputDir) -> None:
    """This pipeline's temporary files of interrupted writes (a killed run, actor or node)."""
    for name in out.list() + out.list(SHARDS):
        if is_temporary(name):
            out.remove(name)


@dataclass
class ShardTask:
    """One input shard as the driver tracks it: its attempts and their errors."""

    url: str
    id: str
    attempts: int = 0
    errors: list = field(default_factory=list)


@dataclass
class JobState:
    """Everything the driver knows about one run: the config, the output directory, the process
    description, every shard, what is committed (``summaries``: shard id -> marker summary) and
    what is still to do (``pending``)."""

    cfg: DictConfig
    out: OutputDir
    lease: OutputLease
    metadata: dict
    shards: list[ShardTask]
    summaries: dict
    pending: deque = field(init=False)
    started: float = field(default_factory=time.time)
    placement_problem: str | None = None  # why no node can hold an actor (pool.placement_problem)
    placement_warned: bool = False

    def __post_init__(self):
        self.pending = deque(s for s in self.shards if s.id not in self.summaries)
        # the periodic manifest's cost is O(uncommitted), not O(shards) (manifest.py doc):
        # running totals of the committed shards, the shards not committed yet, and the
        # summaries not in an index segment yet (at first: those resumed from)
        self.open = {s.id: s for s in self.pending}
        self.done: Counter = Counter()
        for s in self.shards:
            if s.id in self.summaries:
                self._count(self.summaries[s.id])
        self.unindexed = dict(self.summaries)

    def _count(self, summary: dict) -> None:
        self.done[summary["status"]] += 1
        for key in ("samples", "records", "rejected", "bytes"):
            self.done[key] += summary.get(key, 0)

    @property
    def max_attempts(self) -> int:
        return self.cfg.ray.max_shard_retries + 1

    def last_attempt(self, shard: ShardTask) -> bool:
        return shard.attempts >= self.max_attempts

    def committed(self, shard: ShardTask, summary: dict) -> None:
        self.summaries[shard.id] = summary
        self.unindexed[shard.id] = summary
        if self.open.pop(shard.id, None) is not None:
            self._count(summary)

    def failed_attempt(self, shard: ShardTask, reason: str, retry: bool = True) -> None:
        """An attempt failed: retry the shard while attempts remain (unless ``retry`` is false:
        a retry would fail the same way)."""
        shard.errors.append(f"attempt {shard.attempts}: {reason}")
        if retry and not self.last_attempt(shard):
            log.warning(
                "shard %s: %s; retrying (%d/%d)",
                shard.url, reason, shard.attempts, self.max_attempts,
            )  # fmt: skip
            self.pending.append(shard)
        else:
            log.error("shard %s failed after %d attempts: %s", shard.url, shard.attempts, reason)

    def give_up(self, reason: str) -> None:
        """No actor will come: every pending shard fails with ``reason``."""
        for shard in self.pending:
            shard.errors.append(reason)
        self.pending.clear()

    def manifest(self, final: bool) -> dict:
        """The manifest (see manifest.py) as of now. ``final``: every shard, unfinished ones
        failed; else only the shards attempted and not committed yet, and the totals."""
        if final:
            entries = {}
            for s in self.shards:
                if s.id in self.summaries:
                    entries[s.id] = {**self.summaries[s.id], "attempts": max(s.attempts, 1)}
                else:
                    entries[s.id] = self._open_entry(s, "failed")
            values = entries.values()
            totals = {"shards": len(self.shards)}
            for status in ("ok", "partial", "failed", "pending"):
                totals[status] = sum(e["status"] == status for e in values)
            for key in ("samples", "records", "rejected", "bytes"):
                totals[key] = sum(e.get(key, 0) for e in values)
        else:
            entries = {
                s.id: self._open_entry(s, "pending")
                for s in self.open.values()
                if s.attempts or s.errors
            }
            totals = {"shards": len(self.shards), "ok": self.done["ok"]}
            totals.update(partial=self.done["partial"], failed=0, pending=len(self.open))
            for key in ("samples", "records", "rejected", "bytes"):
                totals[key] = self.done[key]
        buckets = {}
        if final and self.metadata.get("buckets") is not None:  # records and files per bucket
            table = bucket_table(self.summaries, self.metadata["buckets"])
            buckets = {"buckets": table}
        return {
            **buckets,
            "format": MANIFEST_FORMAT,
            "library_version": __version__,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "config_hash": self.metadata["config_hash"],
            "process_config": process_config(self.cfg),
            "process": self.metadata,
            "shards": entries,
            "totals": totals,
            "started": self.started,
            "updated": time.time(),
            "complete": final,
            "shards_scope": "all" if final else "uncommitted",
        }

    @staticmethod
    def _open_entry(s: ShardTask, status: str) -> dict:
        return {
            "url": s.url,
            "status": status,
            "attempts": s.attempts,
            "error": "; ".join(s.errors) or None,
        }

    def write_manifest(self, final: bool) -> dict:
        """Write the manifest and renew the lease (LeaseError if another run took it). A
        periodic write first writes an index segment of the markers committed since the last
        one; the final manifest is the compacted index, and the segments are then deleted."""
        self.lease.refresh()
        if not final and self.unindexed:
            self.out.write_segment(self.unindexed)
            self.unindexed = {}
        manifest = self.manifest(final)
        self.out.write_json(MANIFEST, manifest)
        if final:
            self.out.remove_segments()
            self.unindexed = {}
        return manifest

    def write_rejects(self, manifest: dict) -> None:
        """``rejects.jsonl``: the committed shards' rejects parts, and a row per failed shard."""
        rows, parts = [], self.out.list_info(SHARDS)  # one listing; empty parts are not read
        for s in self.shards:
            entry, part = manifest["shards"][s.id], self.out.rejects_name(s.id)
            if entry["status"] in COMMITTED and part in parts and parts[part].size:
                rows.extend(self.out.read_jsonl(part))
            elif entry["status"] == "failed":
                reason = f"shard failed after {s.attempts} attempt(s): {entry['error']}"
                rows.append({"shard": s.id, "key": None, "index": None, "reason": reason})
        self.out.write_jsonl(REJECTS, rows)

    def remove_uncommitted(self) -> None:
        """After the last attempt: what attempts of shards that did not commit left behind (an
        actor killed between its rename and its marker, a failed commit), so no file without a
        marker remains, and temporary files of killed attempts."""
        try:
            _remove_temporaries(self.out)
        except OSError as exc:  # the output became unwritable: the manifest write will say so
            log.warning("cannot clean up %s: %s", self.out.display(), exc)
        names = data_names_by_shard(self.out.list(), [s.id for s in self.shards])
        for s in self.shards:
            if s.id in self.summaries:
                continue
            for name in [*names.get(s.id, ()), self.out.rejects_name(s.id)]:
                try:
                    self.out.remove(name)
                except OSError as exc:
                    log.warning("cannot remove %s of uncommitted shard %s: %s", name, s.id, exc)


def run(cfg: DictConfig) -> dict:
    """Run the job for a composed config; returns the manifest with an ``exit_code``."""
    validate(cfg)
    if not is_remote(cfg.output.dir):  # actors on other nodes resolve it the same way
        cfg.output.dir = os.path.abspath(cfg.output.dir)
    if isinstance(cfg.source.get("class_names"), str):  # actors get the names, not the file
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


def _run(cfg: DictConfig, out: OutputDir, lease: OutputLease, urls: list, ids: dict) -> dict:
    chash = config_hash(cfg)
    old = _prepare_output(out, cfg, chash)
    summaries = resume.committed_shards(out, ids, chash, old)
    if old is not None and old.get("process", {}).get("shape"):
        shape = old["process"]["shape"]
    else:
        shape = sample_shape(cfg, urls)
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
    if job.pending:
        try:
            with ray_session(cfg.ray.address):
                _dispatch(job)
        except RayConnectError as exc:
            raise JobError(str(exc)) from exc
    manifest = job.write_manifest(final=True)
    job.write_rejects(manifest)
    t = manifest["totals"]
    clean = t["partial"] == 0 and t["failed"] == 0 and t["records"] > 0
    manifest["exit_code"] = 0 if clean else 1
    manifest["wall_seconds"] = time.time() - job.started
    return manifest


class _Progress:
    """The driver's tqdm bar over shards, with samples and samples/s."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="shard", disable=not enabled, dynamic_ncols=True)
        self.samples, self.t0 = 0, time.perf_counter()

    def shard_done(self, summary: dict) -> None:
        self.samples += summary["samples"]
        self.bar.update(1)
        rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(samples=self.samples, rate=f"{rate:.0f}/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _dispatch(job: JobState) -> None:
    """Hand pending shards to idle actors until every shard is committed or out of attempts."""
    r = job.cfg.ray
    pool = ActorPool(
        ShardWorker,
        (OmegaConf.to_container(job.cfg, resolve=True), job.metadata),
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor,
    )
    problem = placement_problem(r.cpus_per_actor, r.gpus_per_actor)
    if problem and r.address is None:  # an embedded Ray never grows: no actor could ever start
        raise JobError(problem)
    job.placement_problem = problem  # a cluster's autoscaler may still add such a node
    pool.start(pool_size(r, len(job.pending)))
    running: dict = {}  # task ref -> (actor, shard)
    progress = _Progress(len(job.pending), job.cfg.progress)
    last_manifest, no_actor_since = time.monotonic(), None
    try:
        while job.pending or running:
            while job.pending and (actor := pool.acquire()) is not None:
                shard = job.pending.popleft()
                shard.attempts += 1
                running[actor.process.remote(shard.url)] = (actor, shard)
            if running or pool.live:
                no_actor_since = None
            else:
                no_actor_since = no_actor_since or time.monotonic()
                if _no_actor_will_come(job, pool, no_actor_since):
                    break
            done, _ = ray.wait([*running, *pool.starting_refs()], timeout=5.0)
            for ref in done:
                if pool.is_starting(ref):
                    pool.started(ref)
                    continue
                actor, shard = running.pop(ref)
                summary = _outcome(job, pool, actor, shard, ref)
                if summary is not None:
                    job.committed(shard, summary)
                    progress.shard_done(summary)
            if time.monotonic() - last_manifest > 10:
                job.write_manifest(final=False)
                last_manifest = time.monotonic()
        job.remove_uncommitted()  # nothing runs any more
    finally:
        progress.close()
        pool.shutdown()


def _no_actor_will_come(job: JobState, pool: ActorPool, since: float) -> bool:
    """With no live actor: fail the pending shards when every actor failed to start, or when
    none could be placed within ``ray.actor_start_timeout_s``."""
    r = job.cfg.ray
    if not pool.any_starting:
        job.give_up(f"no actor could start: {pool.start_error}")
        return True
    waited = time.monotonic() - since
    if job.placement_problem and not job.placement_warned and waited > PLACEMENT_WARN_S:
        job.placement_warned = True
        log.warning(
            "no actor started in %.0f s: %s; waiting up to ray.actor_start_timeout_s=%g s for "
            "the autoscaler to add such a node",
            waited, job.placement_problem, r.actor_start_timeout_s,
        )  # fmt: skip
    if waited > r.actor_start_timeout_s:
        need = f"{r.cpus_per_actor} CPU, {r.gpus_per_actor} GPU"
        job.give_up(
            f"no actor ({need}) could be placed on the cluster in {r.actor_start_timeout_s:g} s "
            "(ray.actor_start_timeout_s)"
            + (f": {job.placement_problem}" if job.placement_problem else "")
        )
        return True
    return False


def _outcome(job: JobState, pool: ActorPool, actor, shard: ShardTask, ref) -> dict | None:
    """The committed summary of a finished task, or None after recording why it failed. A
    partial shard (its stream broke after some samples) is committed on its last attempt and
    discarded otherwise: the retry policy lives here, not in the worker."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # process() raised
        pool.release(actor)
        cause = exc.cause if hasattr(exc, "cause") else exc
        if isinstance(cause, SampleError):
            raise cause from None  # on_error=fail: stop at the first bad sample
        retry = not isinstance(cause, ShardTimeoutError)  # a retry would run out of time again
        job.failed_attempt(shard, f"{type(cause).__name__}: {cause}", retry=retry)
        return None
    except ray.exceptions.RayError as exc:  # the actor's process or node died
        why = death_cause(exc)
        pool.lost(actor, f"{why} while processing {shard.id}")
        job.failed_attempt(shard, why)
        return None
    pool.release(actor)
    if "tmp" not in result:
        return result
    if result["retryable"] and not job.last_attempt(shard):
        stages.discard(job.out, result)
        job.failed_attempt(shard, f"ShardReadError: {result['error']}")
        return None
    try:
        return stages.commit(job.out, result)
    except OSError as exc:
        job.failed_attempt(shard, f"{type(exc).__name__}: {exc}")
        return None


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
    lines = [
        f"shards: {t['shards']} ({t['ok']} ok, {t['partial']} partial, {t['failed']} failed)",
        f"samples: {t['samples']}  records: {t['records']}  rejected: {t['rejected']}",
        f"bytes: {t['bytes'] / 1e6:.1f} MB  wall: {secs:.1f} s  "
        f"throughput: {t['samples'] / max(secs, 1e-9):.1f} samples/s",
        f"output: {manifest['config']['output']['dir']}",
    ]
    if t["records"] == 0:
        lines.append("  no records were written: " + _why_no_records(t))
    for sid, e in manifest["shards"].items():
        if e["status"] in ("partial", "failed"):
            lines.append(f"  {e['status']} shard {sid} ({e['url']}): {e.get('error')}")
    return "\n".join(lines)


def _config_error(exc: BaseException) -> None:
    """A config that Hydra or OmegaConf refused: one line naming the key, exit code 2."""
    from .config import config_error_message

    print(f"error: {config_error_message(exc)}", file=sys.stderr)
    sys.exit(2)


def _job(cfg: DictConfig) -> None:
    """The Hydra task: run the job for the composed config and exit with its code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import check_keys

    try:
        check_keys(cfg)  # a key added with +/++ that the schema lacks; a required value unset
        manifest = run(cfg)
    except (HydraException, OmegaConfBaseException) as exc:  # before ValueError: some are
        _config_error(exc)
    except SampleError as exc:  # before ValueError: SampleError is one
        print(f"error (on_error=fail): {exc}", file=sys.stderr)
        sys.exit(1)
    except (JobError, ValueError) as exc:  # printed once (a log line too would repeat it)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # e.g. output.dir became unwritable mid-run
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(format_summary(manifest))
    sys.exit(manifest["exit_code"])


def main() -> None:
    """``diffusion-precompute``: Hydra's command line (overrides, ``--help``, ``--cfg job``).

    The configs come from :data:`pipeline.config.CONF_DIR`; Hydra writes nothing to the working
    directory (the ``hydra:`` block of conf/config.yaml). A config that Hydra or OmegaConf
    refuses (a required value unset, an unknown key, an override it cannot parse) exits 2 with
    one line naming the key; ``HYDRA_FULL_ERROR=1`` adds the traceback."""
    import os
    import traceback

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import CONF_DIR

    register_configs()
    refusal = multirun_refusal(sys.argv[1:])
    if refusal is not None:  # before Hydra: its sweeper would write multirun/ into the cwd
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(2)
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
