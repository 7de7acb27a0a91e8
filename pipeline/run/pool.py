"""The driver's pool of :class:`pipeline.run.worker.ShardWorker` actors.

Actors start in the background; the driver :meth:`ActorPool.acquire`\\ s an idle one for a shard,
:meth:`ActorPool.release`\\ s it when the shard's task returns, and reports it
:meth:`ActorPool.lost` when its process or node died. A lost actor is replaced by a fresh one,
never awaited.

``max_restarts=0``: Ray does not restart a dead actor in place (a task sent to an actor that is
restarting waits for it, forever if its node is gone and nothing else fits); the pool starts a
fresh actor instead, which Ray places wherever resources are free, or never (the run goes on with
fewer actors: degraded, not stuck).
"""

from __future__ import annotations

import logging
import math

import ray

log = logging.getLogger(__name__)


def pool_size(ray_cfg, pending: int) -> int:
    """Actors to start: ``ray.num_actors``, or as many as the cluster's GPUs (with
    ``ray.gpus_per_actor`` > 0) or CPUs allow; at least 1, at most one per pending shard."""
    if ray_cfg.num_actors is not None:
        return max(1, min(ray_cfg.num_actors, pending))
    res = ray.cluster_resources()
    if ray_cfg.gpus_per_actor > 0:
        n = math.floor(res.get("GPU", 0) / ray_cfg.gpus_per_actor)
    else:
        n = math.floor(res.get("CPU", 1) / ray_cfg.cpus_per_actor)
    return max(1, min(n, pending))


def placement_problem(num_cpus: float, num_gpus: float) -> str | None:
    """Why no alive node of the Ray this process joined can hold one actor asking for
    ``num_cpus`` CPUs and ``num_gpus`` GPUs, with what each node has and the override that
    fits; None when a node can hold one (it may be busy: that is waiting, not a refusal)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in nodes]
    if any(cpu >= num_cpus and gpu >= num_gpus for cpu, gpu in have):
        return None
    shown = "; ".join(f"{cpu:g} CPU, {gpu:g} GPU" for cpu, gpu in have[:8]) or "no alive node"
    if len(have) > 8:
        shown += f"; ... ({len(have)} nodes)"
    fixes = []
    max_gpu = max((gpu for _, gpu in have), default=0.0)
    max_cpu = max((cpu for cpu, _ in have), default=0.0)
    if num_gpus > max_gpu:
        fixes.append(
            "ray.gpus_per_actor=0 (CPU actors)"
            + (f" or ray.gpus_per_actor={max_gpu:g}" if max_gpu > 0 else "")
        )
    if num_cpus > max_cpu and max_cpu > 0:
        fixes.append(f"ray.cpus_per_actor={max_cpu:g} (or less)")
    return (
        f"each actor asks for {num_cpus:g} CPU and {num_gpus:g} GPU (ray.cpus_per_actor, "
        f"ray.gpus_per_actor) but no node of this Ray has that (nodes: {shown}); set "
        + " and ".join(fixes or ["smaller ray.cpus_per_actor / ray.gpus_per_actor"])
    )


def death_cause(exc: BaseException) -> str:
    """Why an actor's task failed without raising: out of memory when Ray's memory monitor
    killed it (OutOfMemoryError, or a death message that says so), else the error's type."""
    text = str(exc)
    if isinstance(exc, ray.exceptions.OutOfMemoryError) or "low on memory" in text:
        return (
            "actor died: out of memory (Ray's memory monitor killed it); reduce batch_size or "
            "the sample size (source.resolution), or give each actor more memory"
        )
    if "SIGKILL" in text or "exit code 137" in text or "killed" in text.lower():
        return (
            f"actor died: {type(exc).__name__}, its process was killed (most often by the "
            "kernel's OOM killer: check the node's memory, batch_size and source.resolution)"
        )
    return f"actor died: {type(exc).__name__}"


class ActorPool:
    """Actors of ``actor_cls`` (a plain class) built with ``args``, each reserving ``num_cpus``
    and ``num_gpus``."""

    def __init__(self, actor_cls, args: tuple, *, num_cpus: float, num_gpus: float):
        self.cls = ray.remote(actor_cls).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0
        )
        self.args = args
        self._starting: dict = {}  # ready ref -> actor
        self._idle: list = []
        self._busy: set = set()
        self.live = 0  # started and not lost
        self.wanted = 0
        self.start_error: str | None = None  # why the last actor failed to start

    def start(self, n: int) -> None:
        self.wanted = max(self.wanted, n)
        for _ in range(n):
            actor = self.cls.remote(*self.args)
            self._starting[actor.info.remote()] = actor

    def starting_refs(self) -> list:
        """Refs that resolve when a starting actor is ready: wait on them with the task refs."""
        return list(self._starting)

    def is_starting(self, ref) -> bool:
        return ref in self._starting

    @property
    def any_starting(self) -> bool:
        return bool(self._starting)

    def started(self, ref) -> None:
        """A starting actor's ready ref resolved: it joins the idle actors, or is dropped (and
        :attr:`start_error` says why) when it failed to start."""
        actor = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.warning("an actor failed to start: %s", exc)
            return
        log.info(
            "actor ready: pid %s device %s gpu ids %s", info["pid"], info["device"], info["gpu_ids"]
        )
        self._idle.append(actor)
        self.live += 1

    def acquire(self):
        """An idle actor, now busy; None when none is idle."""
        if not self._idle:
            return None
        actor = self._idle.pop()
        self._busy.add(actor)
        return actor

    def release(self, actor) -> None:
        """A busy actor finished its task (successfully or with an error it raised)."""
        self._busy.discard(actor)
        self._idle.append(actor)

    def lost(self, actor, why: str) -> None:
        """A busy actor died (its process, or its node): kill it and start a replacement."""
        self._busy.discard(actor)
        self.live -= 1
        ray.kill(actor)  # if it is only unreachable, it must not go on writing
        self.start(1)
        log.warning(
            "actor lost (%s): %d of %d actors live, a replacement is starting",
            why, self.live, self.wanted,
        )  # fmt: skip

    def shutdown(self) -> None:
        for actor in [*self._starting.values(), *self._idle, *self._busy]:
            ray.kill(actor)
        self._starting.clear()
        self._idle.clear()
        self._busy.clear()
