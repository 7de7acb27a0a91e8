"""Measuring whole processes for the benchmark, and building its input shards.

:func:`run_measured` starts a command, times it from spawn to exit (start-up included) and polls
its whole process tree (the driver, Ray's raylet/GCS and every worker or pool process under it)
with psutil every ``interval`` seconds: the peak RSS of each pid, its CPU time (user + system)
and its names over time (Ray retitles workers: ``ray::IDLE`` -> ``ray::ShardWorker.process``).
CPU seconds are the larger of the sum over pids of their last sampled CPU time and
``getrusage(RUSAGE_CHILDREN)`` (exact for processes that are waited for, e.g. a
multiprocessing pool, but blind to Ray's workers, which the driver never waits for).

Roles: ``driver`` (the command itself), ``actor`` (a process that ran a ``ray::ShardWorker`` or
``ray::MapWorker`` actor), ``worker`` (another ``ray::`` worker: tasks, idle workers, Ray Data's
helper actors; or a multiprocessing child of the driver), ``ray-system`` (raylet, GCS, agents).
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

try:
    import psutil
except ImportError:  # ray[default] ships psutil in ray/thirdparty_files, put on sys.path by ray
    __import__("ray")
    import psutil

ACTOR_NAMES = ("ray::ShardWorker", "ray::MapWorker")
ROOT = Path(__file__).resolve().parents[2]  # the repository root


class TreeMonitor(threading.Thread):
    """Polls the process tree of ``root`` until :meth:`stop`; see the module docstring."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[int, dict] = {}
        self.peak_total = 0  # the largest sum of RSS over the tree in one poll
        self._handles: dict[int, psutil.Process] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def _tree(self) -> list[psutil.Process]:
        try:
            root = self._handles.setdefault(self.root, psutil.Process(self.root))
            kids = root.children(recursive=True)
        except psutil.Error:
            kids, root = [], None
        procs = [root] if root is not None else []
        for k in kids:  # keep one handle per pid so that pid reuse is detected
            procs.append(self._handles.setdefault(k.pid, k))
        # processes seen before and now orphaned (reparented when their parent exited)
        seen = {p.pid for p in procs}
        procs += [h for pid, h in self._handles.items() if pid not in seen and h.is_running()]
        return procs

    def poll(self) -> None:
        total = 0
        for p in self._tree():
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    cpu = p.cpu_times()
                    cmd = " ".join(p.cmdline())[:200] or p.name()
                    ppid = p.ppid()
            except psutil.Error:
                continue
            total += rss
            rec = self.procs.setdefault(p.pid, {"pid": p.pid, "ppid": ppid, "names": [], "rss": 0})
            rec["rss"] = max(rec["rss"], rss)
            rec["cpu"] = cpu.user + cpu.system
            if cmd not in rec["names"] and len(rec["names"]) < 8:
                rec["names"].append(cmd)
        self.peak_total = max(self.peak_total, total)

    def alive(self) -> list[int]:
        return [pid for pid, h in self._handles.items() if pid != self.root and h.is_running()]


def role(rec: dict, root: int) -> str:
    names = rec["names"]
    if rec["pid"] == root:
        return "driver"
    if any(n.startswith(ACTOR_NAMES) for n in names):
        return "actor"
    if any(n.startswith("ray::") for n in names):
        return "worker"
    if rec["ppid"] == root and not any("/ray/" in n for n in names):
        return "worker"  # a multiprocessing child
    return "ray-system"


def _busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s) for a second in which the machine is less than
    ``threshold`` busy; returns the seconds waited. Other work on a shared machine skews runs."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        if psutil.cpu_percent(interval=1.0) < threshold * 100:
            break
    return time.monotonic() - start


def run_measured(cmd: list[str], log: Path, cwd=None, interval: float = 0.2, env=None) -> dict:
    """Run ``cmd`` to completion; returns wall, CPU and memory figures (see module docstring).
    ``others_cpu_util``: CPU used meanwhile by processes outside the tree (the machine's busy
    time less the tree's), as a share of wall x cores: above a few % the run was disturbed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    busy0 = _busy_cpu()
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        mon = TreeMonitor(proc.pid, interval)
        mon.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        busy = _busy_cpu() - busy0
        mon.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    deadline = time.monotonic() + 60  # let Ray's processes exit before the next run starts
    while mon.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    rusage_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sampled_cpu = sum(r.get("cpu", 0.0) for r in mon.procs.values())
    procs = [{**r, "role": role(r, proc.pid)} for r in mon.procs.values()]
    by_role = {k: [p["rss"] for p in procs if p["role"] == k] for k in ("actor", "worker")}
    cpu = max(rusage_cpu, sampled_cpu)
    return {
        "cmd": cmd,
        "exit_code": code,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_util": cpu / (wall * os.cpu_count()),
        "load_before": load,
        "others_cpu_util": max(0.0, busy - cpu) / (wall * os.cpu_count()),
        "driver_peak_rss": next((p["rss"] for p in procs if p["role"] == "driver"), 0),
        "actor_peak_rss": sorted(by_role["actor"], reverse=True),
        "worker_peak_rss": sorted(by_role["worker"], reverse=True),
        "tree_peak_rss": mon.peak_total,
        "procs": sorted(procs, key=lambda p: -p["rss"]),
        "leftover_pids": mon.alive(),
    }


def parquet_stats(out: Path) -> dict:
    """Rows and bytes of every Parquet file under ``out``."""
    import pyarrow.parquet as pq

    files = sorted(out.rglob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    return {"files": len(files), "rows": rows, "bytes": sum(f.stat().st_size for f in files)}


# ---------------------------------------------------------------------------------- the data
def _photo_shard(job: tuple) -> str:
    path, shard, per_shard, seed, min_crop, max_crop = job
    from pipeline.demo import write_photo_shards

    tmp = Path(path).parent / f".tmp-{shard}"
    # one shard per call, seeded per shard, so the first n shards of any set are the same
    write_photo_shards(
        tmp, 1, per_shard, seed * 100_003 + shard, min_crop, max_crop, f"p{shard}x", labels=False
    )
    next(tmp.glob("*.tar")).rename(path)
    tmp.rmdir()
    return path


def _array_shard(job: tuple) -> str:
    path, shard, per_shard, seed, shape = job
    import webdataset as wds

    rng = np.random.default_rng([seed, shard])
    tmp = Path(path).with_suffix(".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for i in range(per_shard):
            buf = io.BytesIO()
            np.save(buf, rng.standard_normal(shape, dtype=np.float32) * np.float32(4))
            sink.write({"__key__": f"lat{shard:04d}_{i:06d}", "npy": buf.getvalue()})
    tmp.rename(path)
    return path


def dataset(root: Path, kind: str, shards: int, per_shard: int, seed: int = 0, **kw) -> list[str]:
    """Paths of ``shards`` cached shards of ``per_shard`` samples (built on first use, in
    parallel). kind ``photos``: ``min_crop``/``max_crop``; kind ``arrays``: ``shape``."""
    if kind == "photos":
        # "-nolabels": crops without .cls/.txt members (shards built before that carry them)
        tag = f"photos-c{kw['min_crop']}-{kw['max_crop']}-n{per_shard}-s{seed}-nolabels"
        extra = (kw["min_crop"], kw["max_crop"])
        fn = _photo_shard
    else:
        tag = f"arrays-{'x'.join(map(str, kw['shape']))}-n{per_shard}-s{seed}"
        extra = (tuple(kw["shape"]),)
        fn = _array_shard
    d = root / tag
    d.mkdir(parents=True, exist_ok=True)
    paths = [str(d / f"shard-{s:04d}.tar") for s in range(shards)]
    todo = [(p, s, per_shard, seed, *extra) for s, p in enumerate(paths) if not Path(p).exists()]
    if todo:
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(min(len(todo), os.cpu_count())) as pool:
            pool.map(fn, todo, chunksize=1)
        print(f"[bench] built {len(todo)} shard(s) in {d} ({time.perf_counter() - t0:.0f} s)")
    return paths


def brace_url(paths: list[str]) -> str:
    """``dir/shard-{0000..000N}.tar`` for the consecutive shards written by :func:`dataset`."""
    if len(paths) == 1:
        return paths[0]
    d = os.path.dirname(paths[0])
    return f"{d}/shard-{{0000..{len(paths) - 1:04d}}}.tar"


# ------------------------------------------------------------------------------- the machine
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("ray", "pyarrow", "numpy", "torch", "PIL", "webdataset"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "?"

    def git(*args):  # not stripped: porcelain lines start with a status column that may be " "
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "versions": versions,
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "dirty": dirty_paths(git("status", "--porcelain")),
    }


def dirty_paths(porcelain: str) -> list[str]:
    """Paths of ``git status --porcelain`` output (``XY path`` lines; X may be a space)."""
    return sorted(line[3:] for line in porcelain.splitlines() if line.strip())


if __name__ == "__main__":  # python -m jobs.bench.measure CMD...: measure one command
    print(json.dumps(run_measured(sys.argv[1:], Path(os.devnull)), indent=1))
