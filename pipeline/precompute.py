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
import math
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import __version__
from .config import config_hash, process_config, quote_url_overrides, register_configs, validate
from .manifest import COMMITTED, MANIFEST, MANIFEST_FORMAT, REJECTS, SHARDS, OutputDir
from .noise import KeyedNoise
from .records import FORMAT
from .schedule import make_schedule
from .source import (
    Sample,
    SampleError,
    ShardReadError,
    check_unique_ids,
    expand_urls,
    iter_shard,
    shard_id,
)
from .worker import ShardWorker, make_decoder

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot start; the message says which config key or path to fix (exit code 2)."""


@dataclass
class _Shard:
    url: str
    id: str
    attempts: int = 0
    errors: list = field(default_factory=list)


def sample_shape(cfg: DictConfig, urls: list[str]) -> list[int]:
    """The [C, ...] shape every record of this dataset has: from the config, or for arrays
    without ``source.shape`` from the first valid sample of the first shards (deterministic)."""
    src = cfg.source
    if src.kind == "images":
        return [src.channels, src.resolution, src.resolution]
    if src.shape is not None:
        return list(src.shape)
    for url in urls:
        try:
            for item in iter_shard(url, make_decoder(OmegaConf.to_container(src)), on_error="skip"):
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
    sch = cfg.schedule
    schedule = make_schedule(
        sch.name, sch.num_timesteps, zero_terminal_snr=sch.zero_terminal_snr, **sch.params
    )
    noise = KeyedNoise(
        cfg.seed, sch.num_timesteps, cfg.sampling.draws_per_sample, cfg.sampling.timesteps
    )
    source = process_config(cfg)["source"]
    return {
        "format": FORMAT,
        "schedule": schedule.describe(),
        "noise": noise.describe(),
        "dtype": cfg.output.dtype,
        "shape": shape,
        "store_x0": cfg.output.store_x0,
        "source": source,
        "config_hash": chash,
        "library_version": __version__,
    }


def _prepare_output(out: OutputDir, cfg: DictConfig, chash: str) -> dict | None:
    """Refuse to mix records of two configs unless output.overwrite=true (then clear the dir);
    fail before Ray starts, naming the path, when output.dir cannot be written. Returns the
    manifest of an earlier run of this config (None if there is none)."""
    try:
        old = _prepare_output_dir(out, cfg, chash)
        out.makedirs(SHARDS)
        probe = f"{SHARDS}/.write-probe.tmp-{uuid.uuid4().hex[:12]}"  # a temporary file's name
        out.write_bytes(probe, b"")
        out.remove(probe)
    except OSError as exc:
        raise JobError(f"output.dir={out.display()} is not writable: {exc}") from exc
    return old


def _prepare_output_dir(out: OutputDir, cfg: DictConfig, chash: str) -> dict | None:
    old = out.read_manifest()
    if old is not None and old.get("config_hash") != chash:
        if not cfg.output.overwrite:
            new = process_config(cfg)
            diff = sorted(
                f"{k}: {old['process_config'].get(k)!r} -> {new[k]!r}"
                for k in new
                if old.get("process_config", {}).get(k) != new[k]
            )
            raise JobError(
                f"{out.display()} holds records of another config (hash {old.get('config_hash')} != "
                f"{chash}; differences: {'; '.join(diff) or 'unknown'}). Use another output.dir, or "
                "output.overwrite=true to delete them"
            )
        log.warning("output.overwrite=true: deleting the records in %s", out.display())
        for name in out.data_files() + out.list(SHARDS) + [MANIFEST, REJECTS]:
            out.remove(name)
        old = None
    _remove_temporaries(out)
    return old


def _remove_temporaries(out: OutputDir) -> None:
    """Temporary files of interrupted writes (a killed run, actor or node)."""
    for name in out.list() + out.list(SHARDS):
        if name.rsplit("/", 1)[-1].startswith(".") and ".tmp-" in name:
            out.remove(name)


def _remove_uncommitted(out: OutputDir, shards: list, summaries: dict) -> None:
    """After the last attempt: what attempts of shards that did not commit left behind (an actor
    killed between its rename and its marker, a failed commit), so no file without a marker
    remains, and temporary files of killed attempts."""
    try:
        _remove_temporaries(out)
    except OSError as exc:  # the output became unwritable: the manifest write will say so
        log.warning("cannot clean up %s: %s", out.display(), exc)
    for s in shards:
        for name in (out.data_name(s.id), out.rejects_name(s.id)) if s.id not in summaries else ():
            try:
                out.remove(name)
            except OSError as exc:
                log.warning("cannot remove %s of uncommitted shard %s: %s", name, s.id, exc)


def _num_actors(cfg: DictConfig, pending: int) -> int:
    r = cfg.ray
    if r.num_actors is not None:
        return max(1, min(r.num_actors, pending))
    res = ray.cluster_resources()
    if r.gpus_per_actor > 0:
        n = math.floor(res.get("GPU", 0) / r.gpus_per_actor)
    else:
        n = math.floor(res.get("CPU", 1) / r.cpus_per_actor)
    return max(1, min(n, pending))


class _Pool:
    """Actors that take shards as they become idle; dead actors are replaced, never awaited.

    ``max_restarts=0``: Ray does not restart a dead actor in place (a task sent to an actor that
    is restarting waits for it, forever if its node is gone and nothing else fits); the driver
    starts a fresh actor instead, which Ray places wherever resources are free, or never (the
    run goes on with fewer actors: degraded, not stuck)."""

    def __init__(self, cfg: DictConfig, metadata: dict):
        self.cls = ray.remote(ShardWorker).options(
            num_cpus=cfg.ray.cpus_per_actor, num_gpus=cfg.ray.gpus_per_actor, max_restarts=0
        )
        self.args = (OmegaConf.to_container(cfg, resolve=True), metadata)
        self.starting: dict = {}  # ready ref -> actor
        self.idle: list = []
        self.live = 0
        self.wanted = 0
        self.start_error: str | None = None  # why the last actor failed to start

    def start(self, n: int) -> None:
        self.wanted = max(self.wanted, n)
        for _ in range(n):
            actor = self.cls.remote(*self.args)
            self.starting[actor.info.remote()] = actor

    def ready(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.warning("an actor failed to start: %s", exc)
            return
        log.info(
            "actor ready: pid %s device %s gpu ids %s", info["pid"], info["device"], info["gpu_ids"]
        )
        self.idle.append(actor)
        self.live += 1

    def lost(self, actor, why: str) -> None:
        """A busy actor died (its process, or its node): start a replacement."""
        self.live -= 1
        ray.kill(actor)  # if it is only unreachable, it must not go on writing
        self.start(1)
        log.warning(
            "actor lost (%s): %d of %d actors live, a replacement is starting",
            why, self.live, self.wanted,
        )  # fmt: skip

    def shutdown(self, busy=()) -> None:
        for actor in list(self.starting.values()) + self.idle + list(busy):
            ray.kill(actor)


def _init_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ray.exceptions.RayError) as exc:  # no cluster there, token refused
        where = cfg.ray.address or "a new local Ray"
        raise JobError(f"cannot start or join Ray (ray.address={where}): {exc}") from exc


def _write_manifest(out, cfg, chash, metadata, shards, summaries, started, final) -> dict:
    entries = {}
    for s in shards:
        if s.id in summaries:
            entries[s.id] = {**summaries[s.id], "attempts": max(s.attempts, 1)}
        else:
            status = "failed" if final else "pending"
            entries[s.id] = {
                "url": s.url,
                "status": status,
                "attempts": s.attempts,
                "error": "; ".join(s.errors) or None,
            }
    totals = {
        "shards": len(shards),
        "ok": sum(e["status"] == "ok" for e in entries.values()),
        "partial": sum(e["status"] == "partial" for e in entries.values()),
        "failed": sum(e["status"] == "failed" for e in entries.values()),
        "pending": sum(e["status"] == "pending" for e in entries.values()),
        "samples": sum(e.get("samples", 0) for e in entries.values()),
        "records": sum(e.get("records", 0) for e in entries.values()),
        "rejected": sum(e.get("rejected", 0) for e in entries.values()),
        "bytes": sum(e.get("bytes", 0) for e in entries.values()),
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "library_version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": chash,
        "process_config": process_config(cfg),
        "process": metadata,
        "shards": entries,
        "totals": totals,
        "started": started,
        "updated": time.time(),
        "complete": final,
    }
    out.write_json(MANIFEST, manifest)
    return manifest


def _write_rejects(out: OutputDir, shards: list[_Shard], manifest: dict) -> None:
    rows = []
    for s in shards:
        entry = manifest["shards"][s.id]
        if entry["status"] in COMMITTED and out.exists(out.rejects_name(s.id)):
            rows.extend(out.read_jsonl(out.rejects_name(s.id)))
        elif entry["status"] == "failed":
            reason = f"shard failed after {s.attempts} attempt(s): {entry['error']}"
            rows.append({"shard": s.id, "key": None, "index": None, "reason": reason})
    out.write_jsonl(REJECTS, rows)


def run(cfg: DictConfig) -> dict:
    """Run the job for a composed config; returns the manifest with an ``exit_code``."""
    validate(cfg)
    urls = expand_urls(
        OmegaConf.to_container(cfg.source.urls)
        if not isinstance(cfg.source.urls, str)
        else cfg.source.urls
    )
    if not urls:
        raise JobError(f"source.urls={cfg.source.urls!r} expands to no shard")
    check_unique_ids(urls)
    out = OutputDir(cfg.output.dir)
    chash = config_hash(cfg)
    old = _prepare_output(out, cfg, chash)
    shards = [_Shard(u, shard_id(u)) for u in urls]
    summaries = {k: v for k, v in out.markers().items() if v.get("status") in COMMITTED}
    pending = deque(s for s in shards if s.id not in summaries)
    started = time.time()
    if old is not None and old.get("process", {}).get("shape"):
        shape = old["process"]["shape"]
    else:
        shape = sample_shape(cfg, urls)
    metadata = dataset_metadata(cfg, shape, chash)
    _write_manifest(out, cfg, chash, metadata, shards, summaries, started, final=False)
    log.info("%d shards, %d already committed, %d to do", len(shards), len(summaries), len(pending))

    if pending:
        _init_ray(cfg)
        _dispatch(cfg, out, metadata, shards, pending, summaries, started)
    manifest = _write_manifest(out, cfg, chash, metadata, shards, summaries, started, final=True)
    _write_rejects(out, shards, manifest)
    t = manifest["totals"]
    manifest["exit_code"] = 0 if t["partial"] == 0 and t["failed"] == 0 else 1
    manifest["wall_seconds"] = time.time() - started
    return manifest


def _dispatch(cfg, out, metadata, shards, pending: deque, summaries: dict, started) -> None:
    max_attempts = cfg.ray.max_shard_retries + 1
    timeout = cfg.ray.actor_start_timeout_s
    pool = _Pool(cfg, metadata)
    pool.start(_num_actors(cfg, len(pending)))
    running: dict = {}  # task ref -> (actor, shard)
    bar = tqdm(total=len(pending), unit="shard", disable=not cfg.progress, dynamic_ncols=True)
    samples, t0, last_manifest = 0, time.perf_counter(), time.monotonic()
    no_actor_since = None
    try:
        while pending or running:
            while pool.idle and pending:
                actor, shard = pool.idle.pop(), pending.popleft()
                shard.attempts += 1
                running[actor.process.remote(shard.url, shard.attempts >= max_attempts)] = (
                    actor,
                    shard,
                )
            waiting = list(running) + list(pool.starting)
            if not running and not pool.live:
                no_actor_since = no_actor_since or time.monotonic()
                if not pool.starting:  # every actor failed to start: none will come
                    for shard in pending:
                        shard.errors.append(f"no actor could start: {pool.start_error}")
                    break
                if time.monotonic() - no_actor_since > timeout:
                    need = f"{cfg.ray.cpus_per_actor} CPU, {cfg.ray.gpus_per_actor} GPU"
                    for shard in pending:
                        shard.errors.append(
                            f"no actor ({need}) could be placed on the cluster in {timeout:g} s "
                            "(ray.actor_start_timeout_s)"
                        )
                    break
            else:
                no_actor_since = None
            done, _ = ray.wait(waiting, num_returns=1, timeout=5.0)
            for ref in done:
                if ref in pool.starting:
                    pool.ready(ref)
                    continue
                actor, shard = running.pop(ref)
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # process() raised
                    pool.idle.append(actor)
                    cause = exc.cause if hasattr(exc, "cause") else exc
                    if isinstance(cause, SampleError):
                        raise cause from None  # on_error=fail: stop at the first bad sample
                    _retry(shard, f"{type(cause).__name__}: {cause}", pending, max_attempts)
                    continue
                except ray.exceptions.RayError as exc:  # the actor's process or node died
                    why = f"actor died: {type(exc).__name__}"
                    pool.lost(actor, f"{why} while processing {shard.id}")
                    _retry(shard, why, pending, max_attempts)
                    continue
                pool.idle.append(actor)
                summaries[shard.id] = summary
                samples += summary["samples"]
                bar.update(1)
                rate = samples / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(samples=samples, rate=f"{rate:.0f}/s", refresh=False)
            if time.monotonic() - last_manifest > 10:
                _write_manifest(
                    out,
                    cfg,
                    metadata["config_hash"],
                    metadata,
                    shards,
                    summaries,
                    started,
                    final=False,
                )
                last_manifest = time.monotonic()
        _remove_uncommitted(out, shards, summaries)  # nothing runs any more
    finally:
        bar.close()
        pool.shutdown(busy=[actor for actor, _ in running.values()])


def _retry(shard: _Shard, reason: str, pending: deque, max_attempts: int) -> None:
    shard.errors.append(f"attempt {shard.attempts}: {reason}")
    if shard.attempts < max_attempts:
        log.warning(
            "shard %s: %s; retrying (%d/%d)", shard.url, reason, shard.attempts, max_attempts
        )
        pending.append(shard)
    else:
        log.error("shard %s failed after %d attempts: %s", shard.url, shard.attempts, reason)


def format_summary(manifest: dict) -> str:
    t = manifest["totals"]
    secs = manifest.get("wall_seconds", 0.0)
    lines = [
        f"shards: {t['shards']} ({t['ok']} ok, {t['partial']} partial, {t['failed']} failed)",
        f"samples: {t['samples']}  records: {t['records']}  rejected: {t['rejected']}",
        f"bytes: {t['bytes'] / 1e6:.1f} MB  wall: {secs:.1f} s  throughput: {t['samples'] / max(secs, 1e-9):.1f} samples/s",
        f"output: {manifest['config']['output']['dir']}",
    ]
    for sid, e in manifest["shards"].items():
        if e["status"] in ("partial", "failed"):
            lines.append(f"  {e['status']} shard {sid} ({e['url']}): {e.get('error')}")
    return "\n".join(lines)


register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        manifest = run(cfg)
    except SampleError as exc:  # before ValueError: SampleError is one
        print(f"error (on_error=fail): {exc}", file=sys.stderr)
        sys.exit(1)
    except (JobError, ValueError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # e.g. output.dir became unwritable mid-run
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(format_summary(manifest))
    sys.exit(manifest["exit_code"])


def main() -> None:
    sys.argv[1:] = quote_url_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
