"""Dispatch: a pool of :class:`pipeline.run.worker.ShardWorker` actors takes the pending shards, an
idle actor the next one; a failed attempt is retried while attempts remain
(``ray.max_shard_retries``), a partial shard is committed on its last attempt and discarded
before, and the pending shards fail when no actor can start or be placed.
"""

from __future__ import annotations

import logging
import time

import ray
from tqdm import tqdm

from pipeline.errors import JobError
from pipeline.output.commit import commit, discard
from pipeline.output.contracts import CommitMarker
from pipeline.read.source import SampleError
from pipeline.read.tarstream import ShardTimeoutError
from pipeline.run.config import actor_config
from pipeline.run.jobstate import JobState, ShardTask
from pipeline.run.pool import ActorPool, death_cause, placement_problem, pool_size
from pipeline.run.worker import ShardWorker  # torch-free to import: its actors load torch

log = logging.getLogger(__name__)

PLACEMENT_WARN_S = 30.0  # with no actor placed, when to say what is asked against what nodes have


class Progress:
    """The driver's tqdm bar over shards, with samples and samples/s."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="shard", disable=not enabled, dynamic_ncols=True)
        self.samples, self.t0 = 0, time.perf_counter()

    def shard_done(self, marker: CommitMarker) -> None:
        self.samples += marker.samples
        self.bar.update(1)
        rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(samples=self.samples, rate=f"{rate:.0f}/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def dispatch(job: JobState) -> None:
    """Hand pending shards to idle actors until every shard is committed or out of attempts.
    With no shard pending, one actor is started for its setup, which writes the dataset's own
    files that are missing (the empty prompt's embedding: ``JobState.missing_dataset_files``)."""
    r = job.cfg.ray
    pool = ActorPool(
        ShardWorker,
        (actor_config(job.cfg), job.metadata),  # typed: the dataclasses of run/config.py
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor,
    )
    problem = placement_problem(r.cpus_per_actor, r.gpus_per_actor)
    if problem and r.address is None:  # an embedded Ray never grows: no actor could ever start
        raise JobError(problem)
    job.placement_problem = problem  # a cluster's autoscaler may still add such a node
    pool.start(pool_size(r, len(job.pending)))
    running: dict = {}  # task ref -> (actor, shard)
    progress = Progress(len(job.pending), job.cfg.progress)
    last_manifest, no_actor_since = time.monotonic(), None
    try:
        while job.pending or running or _setting_up(job, pool):
            while job.pending and (actor := pool.acquire()) is not None:
                shard = job.pending.popleft()
                shard.attempts += 1
                running[actor.process.remote(shard.url)] = (actor, shard)
            if running or pool.live:
                no_actor_since = None
            else:
                no_actor_since = no_actor_since or time.monotonic()
                if no_actor_will_come(job, pool, no_actor_since):
                    break
            done, _ = ray.wait([*running, *pool.starting_refs()], timeout=5.0)
            for ref in done:
                if pool.is_starting(ref):
                    pool.started(ref)
                    continue
                actor, shard = running.pop(ref)
                summary = outcome(job, pool, actor, shard, ref)
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


def _setting_up(job: JobState, pool: ActorPool) -> bool:
    """No shard to process, but the dataset's own files to write: wait until an actor has set
    up (it wrote them) or none will."""
    return not pool.live and bool(job.missing_dataset_files())


def no_actor_will_come(job: JobState, pool: ActorPool, since: float) -> bool:
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


def outcome(job: JobState, pool: ActorPool, actor, shard: ShardTask, ref) -> CommitMarker | None:
    """The commit marker of a finished task, or None after recording why it failed. A
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
    if isinstance(result, CommitMarker):  # committed by the worker
        return result
    if result.retryable and not job.last_attempt(shard):
        discard(job.out, result)
        job.failed_attempt(shard, f"ShardReadError: {result.error}")
        return None
    try:
        return commit(job.out, result)
    except OSError as exc:
        job.failed_attempt(shard, f"{type(exc).__name__}: {exc}")
        return None
