"""The validator's duplicate-noise check at many records: ``python -m jobs.bench.noisehash``.

The check compares every record's eps hash (:mod:`pipeline.validate.noisehash`). This harness
measures what it costs in memory, per process, as the number of records N grows, on synthetic hashes
(random 12-byte hashes, shards of ``--per-shard`` records; the check's code is the real one):

* ``local-driver``: the validator's driver folding N records' hashes shard by shard into
  :class:`~pipeline.validate.noisehash.SpillBuckets` (as it does when each scan returns), then the
  bucket files' total size;
* ``local-reduce``: one bucket's check (:func:`~pipeline.validate.noisehash.duplicates_in_file`), in
  its own process, on a bucket file of N records: the peak memory per record of a bucket;
* ``ray-driver``: the same driver with the shards' hashes coming back from Ray tasks, one object
  per shard, spilled and let go (the code);
* ``ray-held``: the design before it: each task returns its shard's hashes split into one object
  per bucket and the driver keeps every reference until the check.

Each measurement runs in a fresh process and reports its peak RSS (``VmHWM``) above its RSS after
the imports, and the CPU seconds. Results go to ``--out`` as JSON; the model for 1e9 records in
docs/benchmark.md is these per-record figures times the records each process holds there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

LOCAL, RAY = ("local-driver", "local-reduce"), ("ray-driver", "ray-held")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _shards(n: int, per_shard: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    for first in range(0, n, per_shard):
        yield rng.integers(0, 256, (min(per_shard, n - first), 12), dtype=np.uint8)


def local_driver(n: int, per_shard: int, buckets: int) -> dict:
    from pipeline.validate.noisehash import SpillBuckets

    base, t0 = _rss_mib("VmRSS"), time.process_time()
    with SpillBuckets(buckets) as spill:
        for ordinal, h in enumerate(_shards(n, per_shard)):
            spill.add(h, ordinal)
        spill.flush()
        on_disk = sum(os.path.getsize(p) for p in spill.paths if os.path.exists(p))
    return {"growth_mib": _rss_mib("VmHWM") - base, "cpu_s": time.process_time() - t0,
            "spill_bytes": on_disk}  # fmt: skip


def local_reduce(n: int, per_shard: int) -> dict:
    from pipeline.validate.noisehash import SpillBuckets

    with SpillBuckets(1, dir=tempfile.gettempdir()) as spill:
        for ordinal, h in enumerate(_shards(n, per_shard)):
            spill.add(h, ordinal)
        spill.flush()
        # this process's peak so far is the data generation; measure the check in a child
        code = (
            "import sys, time; from jobs.bench.noisehash import _rss_mib;"
            "from pipeline.validate.noisehash import duplicates_in_file; import json;"
            "b = _rss_mib('VmRSS'); t = time.process_time();"
            "d = duplicates_in_file(sys.argv[1]);"
            "print(json.dumps({'growth_mib': _rss_mib('VmHWM') - b,"
            " 'cpu_s': time.process_time() - t, 'duplicates': d[0]}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, spill.paths[0]], capture_output=True, text=True,
            check=True,
        )  # fmt: skip
    return json.loads(out.stdout)


def ray_driver(n: int, per_shard: int, buckets: int, held: bool) -> dict:
    """Scan tasks returning each shard's hashes, as Ray tasks; the driver spills them as the
    validator does (``held`` False), or, as the code before did, keeps a reference per shard and
    bucket to objects holding the bucket's part until the check (``held`` True)."""
    import logging

    import numpy as np
    import ray

    from pipeline.validate.noisehash import SpillBuckets, split_hashes

    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)

    def hashes(ordinal: int, rows: int):
        return np.random.default_rng(ordinal).integers(0, 256, (rows, 12), dtype=np.uint8)

    def parts(ordinal: int, rows: int, buckets: int) -> tuple:
        return tuple(split_hashes(hashes(ordinal, rows), ordinal, buckets))

    one = ray.remote(hashes)
    many = ray.remote(parts).options(num_returns=buckets)
    shards = [(o, min(per_shard, n - f)) for o, f in enumerate(range(0, n, per_shard))]
    kept = []
    try:
        with SpillBuckets(buckets) as spill:
            base, t0 = _rss_mib("VmRSS"), time.process_time()
            for first in range(0, len(shards), 64):  # 64 tasks in flight, as a window would
                batch = shards[first : first + 64]
                if held:
                    refs = [many.remote(o, rows, buckets) for o, rows in batch]
                    ray.wait([r[0] for r in refs], num_returns=len(refs), fetch_local=False)
                    kept += refs
                else:
                    for o, ref in [(o, one.remote(o, rows)) for o, rows in batch]:
                        spill.add(ray.get(ref), o)
            growth = _rss_mib("VmHWM") - base
        return {"growth_mib": growth, "cpu_s": time.process_time() - t0,
                "objects_held": len(kept) * buckets}  # fmt: skip
    finally:
        del kept
        ray.shutdown()


def child(args) -> dict:
    if args.what == "local-driver":
        r = local_driver(args.n, args.per_shard, args.buckets)
    elif args.what == "local-reduce":
        r = local_reduce(args.n, args.per_shard)
    else:
        r = ray_driver(args.n, args.per_shard, args.buckets, held=args.what == "ray-held")
    r["growth_bytes_per_record"] = r["growth_mib"] * 2**20 / args.n
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.noisehash", description=__doc__)
    p.add_argument("--records", default="100000,1000000,10000000")
    p.add_argument("--ray-records", default="300000,1000000,3000000")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--buckets", type=int, default=64, help="64: what 1e9 records get")
    p.add_argument("--out", default="jobs/bench/results/noisehash.json")
    p.add_argument("--child", choices=[*LOCAL, *RAY])
    p.add_argument("--n", type=int)
    args = p.parse_args(argv)
    if args.child:
        args.what = args.child
        print(json.dumps(child(args)))
        return 0
    rows = []
    plan = [(w, int(n)) for n in args.records.split(",") if n for w in LOCAL]
    plan += [(w, int(n)) for n in args.ray_records.split(",") if n for w in RAY]
    for what, n in plan:
        cmd = [sys.executable, "-m", "jobs.bench.noisehash", "--child", what, "--n", str(n),
               "--per-shard", str(args.per_shard), "--buckets", str(args.buckets)]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        row = {"what": what, "records": n, "wall_s": round(time.perf_counter() - t0, 2)}
        row.update(json.loads(res.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"per_shard": args.per_shard, "buckets": args.buckets, "load": os.getloadavg(),
                   "maxrss_self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
