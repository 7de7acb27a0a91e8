"""Where the validator's shard scans run: Ray tasks, or a process pool on this machine.

``executor`` (``conf/validate.yaml``):

* ``ray``: every shard's scan is a Ray task on the Ray that ``ray.address`` names
  (:mod:`pipeline.raysession`: a cluster, or a new embedded Ray when it is null), and so is each
  bucket of the duplicate-noise check (:class:`pipeline.noisehash.RayBuckets`). A task whose
  process died (out of memory, lost node) counts as an unreadable file.
* ``local``: a pool of ``workers`` processes of this machine (``concurrent.futures``, started by
  a fork server that has imported the scan once), with the noise hashes spilled to a private
  temporary directory (:class:`pipeline.noisehash.SpillBuckets`). No Ray is started, which on
  one machine saves its start and shutdown (several seconds, about a third of validating 16,000
  photos on 2 cores). A scan whose process died is retried alone in a fresh process, then
  counts as an unreadable file.
* ``auto`` (default): ``ray`` when ``ray.address`` is set or this process already runs a Ray
  (a test session, a notebook, a Ray job's driver), ``local`` otherwise.

Both give the same statistics and verdicts: each shard is scanned by the same function
(:func:`scan_task`) and merged in the order the scans finish, with exact merges.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from .manifest import OutputDir
from .noisehash import RayBuckets, SpillBuckets, merge_duplicates, noise_buckets, split_hashes
from .scan import DatasetStats, ScanPlan, ShardStats, scan_shard


def choose(executor: str, address: str | None) -> str:
    """``ray`` or ``local`` for the config's ``executor`` and ``ray.address``."""
    if executor != "auto":
        return executor
    ray = sys.modules.get("ray")  # a Ray this process runs was imported before us
    running = ray is not None and ray.is_initialized()
    return "ray" if address is not None or running else "local"


def local_workers(workers: int | None) -> int:
    """The local pool's size: ``workers``, or the CPUs this process may run on."""
    return workers or len(os.sched_getaffinity(0))


def scan_task(out: OutputDir, shard: str, plan: ScanPlan, ordinal: int, buckets: int) -> tuple:
    """One shard's scan where it runs: :func:`pipeline.scan.scan_shard`, then
    :func:`split_scan`. Returns ``1 + buckets`` values, each its own object in Ray."""
    return split_scan(scan_shard(out, shard, plan), ordinal, buckets)


def split_scan(st: ShardStats, ordinal: int, buckets: int) -> tuple:
    """A shard's ShardStats without its noise hashes (``bucket_sizes`` set instead), then the
    hashes split by prefix into ``buckets`` parts owned by ``ordinal``
    (:func:`pipeline.noisehash.split_hashes`)."""
    hashes = st.hashes if st.hashes is not None else np.zeros((0, 12), dtype=np.uint8)
    st.hashes = None
    parts = split_hashes(hashes, ordinal, buckets)
    st.bucket_sizes = [len(p) for p in parts]
    return (st, *parts)


def scan_all(cfg: DictConfig, out: OutputDir, shards: list[str], ds: DatasetStats) -> None:
    """Scan ``shards`` with the executor the config names, fold each into ``ds`` in shard order
    and set ``ds.duplicates``; phases timed in ``ds.wall``. Raises
    :class:`pipeline.raysession.RayConnectError` when Ray cannot start."""
    records = sum(int(ds.entries.get(k, {}).get("records") or 0) for k in shards)
    buckets = noise_buckets(records)
    kind = choose(cfg.executor, cfg.ray.address)
    ds.executor = kind
    with tqdm(total=len(shards), unit="shard", desc="validate", disable=not cfg.progress) as bar:
        run = _scan_ray if kind == "ray" else _scan_local
        run(cfg, out, list(enumerate(shards)), ds, buckets, bar.update)


class _Phases:
    """Times consecutive phases into a dict of seconds."""

    def __init__(self, wall: dict):
        self.wall, self.t = wall, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.wall[name] = now - self.t
        self.t = now


class _InOrder:
    """Scan results folded in shard order whatever order they finish in, so that the merged
    statistics are the same floating-point sums on every run and with either executor. Holds
    the results that finished early; the callers count them in their window of scans."""

    def __init__(self, fold: Callable[[int, tuple], None], done: Callable):
        self.fold, self.done, self.next, self.held = fold, done, 0, {}

    def put(self, ordinal: int, result: tuple) -> None:
        self.held[ordinal] = result
        while self.next in self.held:
            self.fold(self.next, self.held.pop(self.next))
            self.next += 1
            self.done(1)

    def __len__(self) -> int:
        return len(self.held)


def _died(out: OutputDir, shard: str, why: str) -> tuple:
    return (ShardStats(shard, out.display(OutputDir.data_name(shard)), error=why),)


# -- Ray ---------------------------------------------------------------------------------------


def _scan_ray(cfg, out, todo: list, ds, buckets: int, done: Callable) -> None:
    import ray

    from .raysession import ray_session

    lap = _Phases(ds.wall)
    with ray_session(cfg.ray.address):
        lap("ray_start")
        cpus = cfg.ray.num_cpus_per_task
        task = ray.remote(scan_task).options(num_cpus=cpus, num_returns=1 + buckets)
        window = cfg.ray.max_in_flight or max(
            2, int(2 * ray.cluster_resources().get("CPU", 1) / cpus)
        )
        held = RayBuckets(buckets, cpus)

        def fold(ordinal: int, result: tuple) -> None:
            st, *parts = result
            ds.add(st, ordinal)
            if st.error is None:
                held.add(parts, st.bucket_sizes)

        order, running = _InOrder(fold, done), {}
        todo.reverse()
        while todo or running:
            while todo and len(running) + len(order) < window:
                ordinal, shard = todo.pop()
                refs = task.remote(out, shard, ds.plan, ordinal, buckets)
                running[refs[0]] = (ordinal, shard, refs[1:])
            ready, _ = ray.wait(list(running), num_returns=1)
            ordinal, shard, parts = running.pop(ready[0])
            try:
                result = (ray.get(ready[0]), *parts)
            except ray.exceptions.RayError as exc:  # the task's process died (OOM, node)
                result = _died(out, shard, str(exc))
            order.put(ordinal, result)
        lap("scan_tasks")
        ds.duplicates = merge_duplicates(held.reduce(), ds.names())
        lap("duplicate_reduce")
    lap("ray_shutdown")


# -- local process pool ------------------------------------------------------------------------


def _pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose processes fork from a server that imported :mod:`pipeline.scan` once (not
    this process, which may hold threads, and not ``__main__``)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.scan"])
    return ProcessPoolExecutor(workers, mp_context=ctx)


def _scan_local(cfg, out, todo: list, ds, buckets: int, done: Callable) -> None:
    lap = _Phases(ds.wall)
    workers = local_workers(cfg.workers)
    with SpillBuckets(buckets) as spill:

        def fold(ordinal: int, result: tuple) -> None:
            st, *parts = result
            ds.add(st, ordinal)
            if st.error is None:
                spill.add(parts)

        order = _InOrder(fold, done)
        while todo:  # a new pool after a scan's process died and broke the last one
            with _pool(workers) as pool:
                todo, died = _run_window(pool, 2 * workers, out, todo, ds, buckets, order)
            for ordinal, shard in died:  # which of those in flight died is unknown: each alone
                with _pool(1) as alone:
                    try:
                        result = alone.submit(
                            scan_task, out, shard, ds.plan, ordinal, buckets
                        ).result()
                    except BrokenProcessPool:
                        result = _died(out, shard, "the scan's process died (out of memory?)")
                order.put(ordinal, result)
        lap("scan_tasks")
        with _pool(min(workers, buckets)) as pool:
            ds.duplicates = merge_duplicates(spill.reduce(pool.map), ds.names())
        lap("duplicate_reduce")


def _run_window(pool, window: int, out, todo: list, ds, buckets: int, order: _InOrder) -> tuple:
    """Scans on ``pool``, at most ``window`` in flight or finished early, each put to ``order``
    as it finishes. Returns (shards not submitted, shards in flight) when the pool broke (a
    process died), else ([], [])."""
    todo, running = list(reversed(todo)), {}
    while todo or running:
        while todo and len(running) + len(order) < window:
            ordinal, shard = todo.pop()
            running[pool.submit(scan_task, out, shard, ds.plan, ordinal, buckets)] = ordinal, shard
        finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in finished:
            try:
                result = fut.result()
            except BrokenProcessPool:
                wait(list(running))  # every future of a broken pool ends, in error
                return list(reversed(todo)), sorted(running.values())
            order.put(running.pop(fut)[0], result)
    return [], []
