"""Where the validator's shard scans run: Ray tasks, or a process pool on this machine.

``executor`` (``conf/validate.yaml``):

* ``ray``: every shard's scan is a Ray task on the Ray that ``ray.address`` names
  (:mod:`pipeline.run.raysession`: a cluster, or a new embedded Ray when it is null), and so is the
  check of each bucket of noise hashes, pinned to the driver's node, where the buckets' files
  are, and declaring the memory it needs. A task whose process died (out of memory, lost node)
  counts as an unreadable file.
* ``local``: a pool of ``workers`` processes of this machine (``concurrent.futures``, started by
  a fork server that has imported the scan once). No Ray is started, which on one machine saves
  its start and shutdown (5-6 s on 2 cores). A scan whose process died is retried alone in a
  fresh process, then counts as an unreadable file.

Either way the driver appends each shard's noise hashes to bucket files as the scan returns
them (:class:`pipeline.validate.noisehash.SpillBuckets`) and holds none.
* ``auto`` (default): ``ray`` when ``ray.address`` is set or this process already runs a Ray
  (a test session, a notebook, a Ray job's driver), or when pool processes could not import
  this program's ``__main__`` (a program read from stdin); ``local`` otherwise.

Both give the same statistics and verdicts: each shard is scanned by the same function
(:func:`scan_task`) and merged in the order the scans finish, with exact merges.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from omegaconf import DictConfig
from tqdm import tqdm

from pipeline import errors
from pipeline.output.manifest import OutputDir
from pipeline.validate.cost import Cost
from pipeline.validate.measures import DatasetStats, ShardStats
from pipeline.validate.noisehash import (
    CHECK_BYTES_PER_RECORD,
    SpillBuckets,
    duplicates_in_file,
    merge_duplicates,
    noise_buckets,
)
from pipeline.validate.scan import scan_shard, shard_names, shown_files


class CannotStart(errors.CannotStart):
    """The local pool cannot run here; the message names the fix (exit 2)."""


def _main_module() -> tuple[str | None, str | None]:
    """(module name, file) by which multiprocessing makes a pool process import this program's
    ``__main__`` before it runs a task (``python -m pkg.mod``: the name; a script: its file)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    return name, None if name else getattr(main, "__file__", None)


def local_possible() -> bool:
    """Whether pool processes can import ``__main__``: not when it is read from stdin."""
    name, path = _main_module()
    return name is not None or path is None or os.path.isfile(path)


def choose(executor: str, address: str | None) -> str:
    """``ray`` or ``local`` for the config's ``executor`` and ``ray.address``."""
    if executor != "auto":
        return executor
    ray = sys.modules.get("ray")  # a Ray this process runs was imported before us
    running = ray is not None and ray.is_initialized()
    return "ray" if address is not None or running or not local_possible() else "local"


def local_workers(workers: int | None) -> int:
    """The local pool's size: ``workers``, or the CPUs this process may run on."""
    return workers or len(os.sched_getaffinity(0))


def scan_all(cfg: DictConfig, out: OutputDir, shards: list[str], ds: DatasetStats) -> None:
    """Scan ``shards`` with the executor the config names, fold each into ``ds`` in shard order
    and set ``ds.duplicates``; phases timed in ``ds.wall``. Raises
    :class:`pipeline.run.raysession.RayConnectError` when Ray cannot start, :class:`CannotStart`
    when the local pool cannot run."""
    records = sum(int(ds.entries.get(k, {}).get("records") or 0) for k in shards)
    buckets = noise_buckets(records)
    kind = choose(cfg.executor, cfg.ray.address)
    ds.executor = kind
    with (
        tqdm(total=len(shards), unit="shard", desc="validate", disable=not cfg.progress) as bar,
        SpillBuckets(buckets) as spill,
    ):

        def fold(ordinal: int, st: ShardStats) -> None:
            if st.hashes is not None:
                spill.add(st.hashes, ordinal)
                st.hashes = None
            ds.add(st, ordinal)

        run = _scan_ray if kind == "ray" else _scan_local
        phases = Cost()  # the driver's phases, timed like a scan's parts
        run(cfg, out, list(enumerate(shards)), ds, spill, _InOrder(fold, bar.update), phases.lap)
        ds.wall.update(phases.seconds)


class _InOrder:
    """Scan results folded in shard order whatever order they finish in, so that the merged
    statistics are the same floating-point sums on every run and with either executor. Holds
    the results that finished early; the callers count them in their window of scans."""

    def __init__(self, fold: Callable[[int, ShardStats], None], done: Callable):
        self.fold, self.done, self.next, self.held = fold, done, 0, {}

    def put(self, ordinal: int, result: ShardStats) -> None:
        self.held[ordinal] = result
        while self.next in self.held:
            self.fold(self.next, self.held.pop(self.next))
            self.next += 1
            self.done(1)

    def __len__(self) -> int:
        return len(self.held)


def _died(out: OutputDir, shard: str, why: str, plan) -> ShardStats:
    """A shard whose scan's process died: an unreadable file, named as its scan would name it
    (:func:`pipeline.validate.scan.shown_files`: a bucketed shard's bucket files, found by one
    listing; no marker is read on the driver)."""
    try:
        names = shard_names(out, shard, None, plan)
    except OSError:  # the listing failed too: the shard id is all there is to name
        names = []
    return ShardStats(shard, shown_files(out, shard, names), error=why, died=True)


# -- Ray ---------------------------------------------------------------------------------------


def _scan_ray(cfg, out, todo: list, ds, spill: SpillBuckets, order: _InOrder, lap) -> None:
    import ray

    from pipeline.run.raysession import ray_session

    with ray_session(cfg.ray.address):
        lap("ray_start")
        cpus = cfg.ray.num_cpus_per_task
        task = ray.remote(scan_shard).options(num_cpus=cpus)
        window = cfg.ray.max_in_flight or max(
            2, int(2 * ray.cluster_resources().get("CPU", 1) / cpus)
        )
        todo.reverse()
        running = {}
        while todo or running:
            while todo and len(running) + len(order) < window:
                ordinal, shard = todo.pop()
                running[task.remote(out, shard, ds.plan)] = ordinal, shard
            ready, _ = ray.wait(list(running), num_returns=1)
            ordinal, shard = running.pop(ready[0])
            try:
                st = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the task's process died (OOM, node)
                st = _died(out, shard, str(exc), ds.plan)
            order.put(ordinal, st)
        lap("scan_tasks")
        ds.duplicates = merge_duplicates(_check_on_ray(spill, cpus), ds.names())
        lap("duplicate_reduce")
    lap("ray_shutdown")


def _check_on_ray(spill: SpillBuckets, cpus: float) -> list:
    """Each bucket's check as a Ray task on this (the driver's) node, where the files are,
    declaring the memory it needs so that Ray runs no more at once than the node holds."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    spill.flush()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    check = ray.remote(duplicates_in_file)
    return ray.get(
        [
            check.options(
                num_cpus=cpus,
                scheduling_strategy=here,
                memory=CHECK_BYTES_PER_RECORD * spill.bucket_records(b) + (64 << 20),
            ).remote(path)
            for b, path in enumerate(spill.paths)
        ]
    )


# -- local process pool ------------------------------------------------------------------------


# What the pool's fork server imports once: the scan, and what ``python -m pipeline.validate``
# (the processes' ``__main__``) imports, so that re-importing it costs each process little.
PRELOAD = ["pipeline.validate.scan", "pipeline.validate.report", "pipeline.validate.config"]


def _pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose processes fork from a server (not this process, which may hold threads)
    that imported :data:`PRELOAD` once; each process then re-imports ``__main__``, as
    multiprocessing does (``pipeline.validate`` imports no scipy for that reason). A script
    that calls the validator must guard its entry point with ``if __name__ == "__main__":``,
    as for any multiprocessing code. (``__main__`` itself is not preloaded: Python would warn
    in every process that the module was imported before it ran.)"""
    if not local_possible():
        raise CannotStart(
            f"executor=local: pool processes cannot import this program's __main__ "
            f"({_main_module()[1]}); run it from a file or with -m, or set executor=ray"
        )
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ProcessPoolExecutor(workers, mp_context=ctx)


def _scan_local(cfg, out, todo: list, ds, spill: SpillBuckets, order: _InOrder, lap) -> None:
    workers = local_workers(cfg.workers)
    pool = _pool(workers)
    try:
        while todo:
            todo, died = _run_window(pool, 2 * workers, out, todo, ds.plan, order)
            if todo or died:  # a process died, the pool broke: lost scans alone, a new pool
                pool.shutdown()
                _retry_alone(died, out, ds, order)
                pool = _pool(workers)
        lap("scan_tasks")
        try:
            checked = spill.reduce(pool.map)
        except BrokenProcessPool:  # the last scan broke the pool, or a bucket's check died
            pool.shutdown()
            pool = _pool(workers)
            try:
                checked = spill.reduce(pool.map)
            except BrokenProcessPool:
                raise CannotStart(
                    "the duplicate-noise check's process died (out of memory? one bucket's "
                    f"check holds ~{CHECK_BYTES_PER_RECORD} bytes per record of its bucket)"
                ) from None
        ds.duplicates = merge_duplicates(checked, ds.names())
        lap("duplicate_reduce")
    finally:
        pool.shutdown()


def _retry_alone(died: list, out, ds, order: _InOrder) -> None:
    """Scans that were in flight when their pool broke, each alone in a fresh process (which
    of them died is unknown); one that dies again counts as an unreadable file."""
    for ordinal, shard in died:
        with _pool(1) as alone:
            try:
                st = alone.submit(scan_task, out, shard, ds.plan).result()
            except BrokenProcessPool:
                st = _died(out, shard, "the scan's process died (out of memory?)", ds.plan)
        order.put(ordinal, st)


def _run_window(pool, window: int, out, todo: list, plan, order: _InOrder) -> tuple:
    """Scans on ``pool``, at most ``window`` in flight or finished early, each put to ``order``
    as it finishes. Returns (shards not submitted, shards whose scan was lost) when the pool
    broke (a process died: noticed by a future, or by ``submit`` when it died since the last
    wait), else ([], [])."""
    todo, running = list(reversed(todo)), {}
    while todo or running:
        while todo and len(running) + len(order) < window:
            try:
                fut = pool.submit(scan_task, out, todo[-1][1], plan)
            except BrokenProcessPool:
                return _broken(todo, running, order)
            running[fut] = todo.pop()
        finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in finished:
            try:
                st = fut.result()
            except BrokenProcessPool:
                return _broken(todo, running, order)
            order.put(running.pop(fut)[0], st)
    return [], []


def _broken(todo: list, running: dict, order: _InOrder) -> tuple:
    """After the pool broke: the scans in flight that finished are kept, the others returned
    with the shards not submitted (see :func:`_run_window`)."""
    wait(list(running))  # every future of a broken pool ends, in error or with its result
    lost = []
    for fut, (ordinal, shard) in running.items():
        try:
            order.put(ordinal, fut.result())
        except BrokenProcessPool:
            lost.append((ordinal, shard))
    return list(reversed(todo)), sorted(lost)


# What a pool process runs for one shard (a name, so that tests can stand in a dying scan).
scan_task = scan_shard
