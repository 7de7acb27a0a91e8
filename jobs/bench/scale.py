"""``python -m jobs.bench.scale [N ...]``: the driver's own per-shard work at many shards.

Simulated, no Ray and no actors: an output dir of N committed shards is built on local disk as
actors leave it (one 1-row Parquet file, a real marker and an empty rejects part per shard, one
tiny input file per shard in one directory). Real: the driver's code, called directly. Phase
"driver": JobState over N shards, every shard committed in turn with a periodic manifest write
every ``--per-write`` commits (100 shards/s at one write per 10 s), then the final manifest and
rejects.jsonl. Phase "resume": ``resume.committed_shards`` on that directory. Each phase runs in
its own process (``--code DIR`` runs another checkout's code, e.g. a ``git worktree`` of the old
commit) and reports CPU seconds (the machine is shared: CPU, not wall), peak RSS and requests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time


def build(root: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.fs import identity
    from pipeline.manifest import OutputDir

    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["k"]}), buf)
    data = buf.getvalue()
    os.makedirs(f"{root}/in", exist_ok=True)
    out = OutputDir(f"{root}/out")
    out.makedirs("_shards")
    for i in range(n):
        url = f"{root}/in/s{i:06d}.tar"
        with open(url, "wb") as f:
            f.write(b"x")
        with open(out.path(f"s{i:06d}.parquet"), "wb") as f:
            f.write(data)
        summary = {"url": url, "status": "ok", "samples": 1, "records": 1, "rejected": 0,
                   "bytes": len(data), "seconds": 0.01, "config_hash": "h",
                   "source_identity": identity(url)}  # fmt: skip
        with open(out.path(f"_shards/s{i:06d}.json"), "w") as f:
            f.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        open(out.path(f"_shards/s{i:06d}.rejects.jsonl"), "w").close()


def phase(root: str, n: int, kind: str, per_write: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline import fs, resume
    from pipeline.config import compose
    from pipeline.manifest import OutputDir
    from pipeline.precompute import JobState, ShardTask

    calls = {"reads": 0, "listings": 0, "stats": 0, "footers": 0, "input_stats": 0}

    def count(obj, name, kind_):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            calls[kind_] += 1
            return fn(*a, **k)

        setattr(obj, name, wrapper)

    for name, k in (("read_bytes", "reads"), ("list", "listings"), ("exists", "stats")):
        count(OutputDir, name, k)
    if hasattr(OutputDir, "list_info"):
        count(OutputDir, "list_info", "listings")
    count(pq, "read_metadata", "footers")
    count(fs, "identity", "input_stats")
    if hasattr(resume, "identity"):
        count(resume, "identity", "input_stats")
    out = OutputDir(f"{root}/out")
    urls = {f"s{i:06d}": f"{root}/in/s{i:06d}.tar" for i in range(n)}
    t0, c0 = time.perf_counter(), time.process_time()
    written = 0
    if kind == "driver":
        cfg = compose(["progress=false", "source=arrays", "source.urls=x", f"output.dir={root}"])

        class Lease:
            def refresh(self):
                pass

        shards = [ShardTask(u, s) for s, u in urls.items()]
        job = JobState(cfg, out, Lease(), {"config_hash": "h"}, shards, {})
        for i, s in enumerate(shards):
            s.attempts = 1
            with open(out.path(f"_shards/{s.id}.json")) as f:
                job.committed(s, json.load(f))
            if (i + 1) % per_write == 0:
                job.write_manifest(final=False)
                written += os.path.getsize(out.path("_manifest.json"))
        job.write_rejects(job.write_manifest(final=True))
    else:
        m = out.read_manifest()
        try:
            kept = resume.committed_shards(out, urls, "h", m)
        except TypeError:  # the old signature
            kept = resume.committed_shards(out, urls, "h")
        assert len(kept) == n, len(kept)
    return {
        "phase": kind,
        "n": n,
        "cpu_s": round(time.process_time() - c0, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "periodic_manifest_bytes": written,
        **calls,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 10000])
    ap.add_argument("--root", default="bench-out/scale")
    ap.add_argument("--code", action="append", default=None, help="checkout(s) to compare")
    ap.add_argument("--per-write", type=int, default=1000)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:  # one phase in this process
        print(json.dumps(phase(a.root, a.sizes[0], a.phase, a.per_write)))
        return 0
    rows = []
    for n in a.sizes:
        for code in a.code or ["."]:
            root = os.path.abspath(f"{a.root}/{n}-{len(rows)}")
            subprocess.run(["rm", "-rf", root], check=True)
            env = {**os.environ, "PYTHONPATH": os.path.abspath(code)}
            build_cmd = f"from jobs.bench.scale import build; build({root!r}, {n})"
            subprocess.run([sys.executable, "-c", build_cmd], check=True)
            for kind in ("driver", "resume"):
                cmd = [sys.executable, "-m", "jobs.bench.scale", str(n), "--root", root,
                       "--phase", kind, "--per-write", str(a.per_write)]  # fmt: skip
                r = subprocess.run(
                    cmd, env=env, cwd=code, capture_output=True, text=True, check=True
                )
                row = {"code": code, **json.loads(r.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
