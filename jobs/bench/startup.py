"""The project's fixed cost: the start-up and shutdown phases of an embedded-Ray run, timed.

``python -m jobs.bench.startup [--repeats 3]`` prints JSON: for each phase the median and the
range over fresh interpreters. Each repeat runs ``python -m jobs.bench.startup --child`` (from
the repository root) and times, as the precompute driver does them, in order:

* ``import``: ``import pipeline.precompute`` (Hydra and Ray; the driver does not load torch);
* ``ray_init``: ``ray.init(include_dashboard=False)``, i.e. starting GCS, raylet, the API
  server, dashboard and runtime-env agents, log monitor and autoscaler monitor;
* ``actors``: two 1-CPU actors that import the shard worker and what its setup and first shard
  load (torch, webdataset, pyarrow, PIL), until both answer a call;
* ``shutdown``: ``ray.shutdown()`` (SIGTERM to Ray's processes and waiting for them).

The precompute pays these once per job; the floor pays ~0.5 s for its process pool.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where jobs is importable
PHASES = ("import", "ray_init", "actors", "shutdown")


def child() -> dict:
    """One fresh interpreter's phase times, in seconds."""
    t0 = time.perf_counter()
    import ray

    import pipeline.precompute  # noqa: F401

    t1 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    t2 = time.perf_counter()

    @ray.remote(num_cpus=1)
    class Warm:
        def __init__(self):
            # what a ShardWorker loads by its first shard (the module imports torch lazily)
            import torch  # noqa: F401
            import webdataset  # noqa: F401

            import pipeline.run.worker  # noqa: F401

        def ping(self) -> int:
            return 1

    actors = [Warm.remote() for _ in range(2)]
    ray.get([a.ping.remote() for a in actors])
    t3 = time.perf_counter()
    ray.shutdown()
    t4 = time.perf_counter()
    return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))


def measure(repeats: int = 3) -> dict:
    """{phase: {median, min, max}} over ``repeats`` fresh interpreters, plus their total."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-m", "jobs.bench.startup", "--child"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {}
    for phase in (*PHASES, "total"):
        vals = [sum(r.values()) if phase == "total" else r[phase] for r in runs]
        result[phase] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return {"repeats": repeats, "phases": result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    print(json.dumps(child() if a.child else measure(a.repeats), indent=None if a.child else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
