"""``python -m jobs.bench.scale [N ...]``: the driver's own per-shard work at many shards.

Simulated, no Ray and no actors: an output dir of N committed shards is built on local disk as
actors leave it (one 1-row Parquet file, a real marker and an empty rejects part per shard, one
tiny input file per shard in one directory). Real: the driver's code, called directly. Phase
"driver": JobState over N shards, every shard committed in turn with a periodic manifest write
every ``--per-write`` commits (100 shards/s at one write per 10 s), then the final manifest and
rejects.jsonl. Phase "resume": ``resume.committed_shards`` on that directory. Each phase runs in
its own process (``--code DIR`` runs another checkout's code, e.g. a ``git archive`` of the old
commit with this file copied in) and reports CPU seconds (the machine is shared: CPU, not wall),
RSS after the imports and at peak, requests and bytes written.

Default: N = 1,000, 10,000 and 100,000; the raw figures go to ``jobs/bench/results/scale.json``
(``--append`` keeps the rows of other (code, N) there) and the curves to ``docs/scale.png``;
``--plot-only`` redraws the PNG from the JSON. Each N's directory is deleted after its phases
unless ``--keep``. Each phase runs ``--repeat`` times on the same directory; the run with
the median CPU seconds is kept (all runs' CPU seconds and peak RSS are listed beside it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

JSON = "jobs/bench/results/scale.json"
PNG = "docs/scale.png"


def build(root: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.fs import identity
    from pipeline.output.manifest import OutputDir

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


def _rss_mb() -> float | None:
    """This process's resident set now (Linux /proc), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def phase(root: str, n: int, kind: str, per_write: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline import fs
    from pipeline.output import resume
    from pipeline.output.contracts import CommitMarker
    from pipeline.output.manifest import OutputDir
    from pipeline.precompute import JobState, ShardTask
    from pipeline.run.config import compose

    calls = {"reads": 0, "listings": 0, "stats": 0, "footers": 0, "input_stats": 0}
    calls.update(writes=0, written_bytes=0)

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
    if hasattr(OutputDir, "write_bytes"):
        write_bytes = OutputDir.write_bytes

        def counted_write(self, name, data):
            calls["writes"] += 1
            calls["written_bytes"] += len(data)
            return write_bytes(self, name, data)

        OutputDir.write_bytes = counted_write
    out = OutputDir(f"{root}/out")
    cfg = None
    if kind == "driver":
        cfg = compose(["progress=false", "source=arrays", "source.urls=x", f"output.dir={root}"])
    # the baseline: everything imported (pyarrow, torch, hydra via pipeline) and composed
    rss_base, peak_base = _rss_mb(), _peak_rss_mb()
    urls = {f"s{i:06d}": f"{root}/in/s{i:06d}.tar" for i in range(n)}  # source.urls, expanded
    t0, c0 = time.perf_counter(), time.process_time()
    extra: dict = {}
    if kind == "driver":

        class Lease:
            def refresh(self):
                pass

        shards = [ShardTask(u, s) for s, u in urls.items()]
        job = JobState(cfg, out, Lease(), {"config_hash": "h"}, shards, {})
        manifest_bytes = periodic_bytes = periodic_writes = 0
        load_cpu = 0.0  # reading the markers: the simulation's stand-in for an actor's return
        for i, s in enumerate(shards):
            s.attempts = 1
            c = time.process_time()
            with open(out.path(f"_shards/{s.id}.json")) as f:
                marker = CommitMarker.from_json(json.load(f))
            load_cpu += time.process_time() - c
            job.committed(s, marker)
            if (i + 1) % per_write == 0:
                before = calls["written_bytes"]
                job.write_manifest(final=False)
                manifest_bytes += os.path.getsize(out.path("_manifest.json"))
                periodic_bytes += calls["written_bytes"] - before
                periodic_writes += 1
        c, peak_commits = time.process_time(), _peak_rss_mb()
        job.write_rejects(job.write_manifest(final=True))
        extra = {
            "periodic_writes": periodic_writes,
            "periodic_manifest_bytes": manifest_bytes,  # _manifest.json only
            "periodic_written_bytes": periodic_bytes,  # + index segments (0 if not counted)
            "final_cpu_s": round(time.process_time() - c, 3),  # final manifest + rejects
            "peak_rss_growth_before_final_mb": round(peak_commits - peak_base, 1),
            "final_manifest_bytes": os.path.getsize(out.path("_manifest.json")),
            "marker_load_cpu_s": round(load_cpu, 3),
        }
    else:
        m = out.read_manifest()
        try:
            kept = resume.committed_shards(out, urls, "h", m)
        except TypeError:  # the old signature
            kept = resume.committed_shards(out, urls, "h")
        assert len(kept) == n, len(kept)
    cpu = time.process_time() - c0
    peak = _peak_rss_mb()
    return {
        "phase": kind,
        "n": n,
        "cpu_s": round(cpu, 3),
        "cpu_s_per_shard": cpu / n,
        "wall_s": round(time.perf_counter() - t0, 3),
        "rss_after_imports_mb": rss_base,
        "peak_rss_mb": peak,
        "peak_rss_growth_mb": round(peak - peak_base, 1),  # over the peak after the imports
        **extra,
        **calls,
    }


def _label(code: str) -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return "current" if os.path.abspath(code) == here else os.path.basename(os.path.abspath(code))


def _git(code: str) -> str | None:
    r = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True)
    return r.stdout.decode().strip() or None


def plot(doc: dict, png: str) -> None:
    """Log-log curves of the rows in ``doc`` (the JSON this harness writes), one line per code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = list(dict.fromkeys(r["label"] for r in rows))

    def series(label, kind, key):
        pts = sorted((r["n"], r[key]) for r in rows if r["label"] == label and r["phase"] == kind)
        pts = [(n, v) for n, v in pts if v is not None and v > 0]  # log axes
        return [p[0] for p in pts], [p[1] for p in pts]

    def linear(ax, xs, ys, text="∝ N"):  # a reference line through the first point
        if xs:
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color="grey", label=text)

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a1, a2), (a3, a4) = axes
    for i, lab in enumerate(labels):
        col = f"C{i}"
        for kind, mark in (("driver", "o-"), ("resume", "s--")):
            xs, ys = series(lab, kind, "cpu_s_per_shard")
            a1.plot(xs, [y * 1e6 for y in ys], mark, color=col, label=f"{lab}: {kind}")
            if i == 0 and kind == "driver" and xs:
                a1.plot(xs, [ys[-1] * 1e6] * len(xs), ":", color="grey", label="constant")
        xs, ys = series(lab, "resume", "cpu_s")
        a2.plot(xs, ys, "o-", color=col, label=f"{lab}: resume CPU s")
        xw, yw = series(lab, "resume", "wall_s")
        a2.plot(xw, yw, "s--", color=col, alpha=0.6, label=f"{lab}: resume wall s")
        if i == 0:
            linear(a2, xs, ys)
        for kind, mark in (("driver", "o"), ("resume", "s")):
            xs, ys = series(lab, kind, "peak_rss_mb")
            a3.plot(xs, ys, mark + "-", color=col, label=f"{lab}: {kind} peak")
            xs, ys = series(lab, kind, "peak_rss_growth_mb")
            a3.plot(xs, ys, mark + "--", color=col, alpha=0.6, label=f"{lab}: {kind} growth")
            if i == 0 and kind == "driver":
                linear(a3, xs, ys)
        xs, ys = series(lab, "driver", "periodic_manifest_bytes")
        a4.plot(xs, ys, "o-", color=col, label=f"{lab}: _manifest.json")
        xs2, ys2 = series(lab, "driver", "periodic_written_bytes")
        if ys2 and ys2 != ys:
            a4.plot(xs2, ys2, "s--", color=col, alpha=0.6, label=f"{lab}: + index segments")
        if i == 0:
            linear(a4, xs2 or xs, ys2 or ys)
    a1.set(title="CPU per shard (driver: commits, manifests, rejects)", ylabel="CPU µs / shard")
    a2.set(title="resume (resume.committed_shards)", ylabel="seconds")
    a3.set(title="peak RSS: total, and growth over the imports", ylabel="MiB")
    a4.set(title=f"periodic manifest bytes (a write / {doc.get('per_write')} shards)",
           ylabel="bytes written over the run")  # fmt: skip
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("shards N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("python -m jobs.bench.scale: the driver at N tiny shards (simulated, local disk)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 10000, 100000])
    ap.add_argument("--root", default="bench-out/scale")
    ap.add_argument("--code", action="append", default=None, help="checkout(s) to compare")
    ap.add_argument("--per-write", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per phase; the median is kept")
    ap.add_argument("--json", default=JSON, help="where the raw figures go ('' = nowhere)")
    ap.add_argument("--png", default=PNG, help="where the plot goes ('' = nowhere)")
    ap.add_argument("--append", action="store_true", help="keep the JSON's rows of other runs")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    ap.add_argument("--keep", action="store_true", help="keep the built directories")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:  # one phase in this process
        print(json.dumps(phase(a.root, a.sizes[0], a.phase, a.per_write)))
        return 0
    if a.plot_only:
        with open(a.json) as f:
            plot(json.load(f), a.png)
        return 0
    command = "python -m jobs.bench.scale " + " ".join(argv or sys.argv[1:])
    doc = {"commands": [command], "per_write": a.per_write, "repeat": a.repeat,
           "cpus": os.cpu_count(), "rows": []}  # fmt: skip
    if a.append and a.json and os.path.exists(a.json):
        with open(a.json) as f:
            doc = json.load(f)
        doc["commands"].append(command)
    new = []
    for n in a.sizes:
        for code in a.code or ["."]:
            root = os.path.abspath(f"{a.root}/{n}-{len(new)}")
            shutil.rmtree(root, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": os.path.abspath(code)}
            build_cmd = f"from jobs.bench.scale import build; build({root!r}, {n})"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", build_cmd], check=True)
            build_s = round(time.perf_counter() - t, 1)
            runs: dict = {"driver": [], "resume": []}
            for _ in range(a.repeat):  # the driver rewrites the same manifest: same state
                for kind in ("driver", "resume"):
                    load = [round(x, 2) for x in os.getloadavg()]
                    cmd = [sys.executable, "-m", "jobs.bench.scale", str(n), "--root", root,
                           "--phase", kind, "--per-write", str(a.per_write)]  # fmt: skip
                    r = subprocess.run(
                        cmd, env=env, cwd=code, capture_output=True, text=True, check=True
                    )
                    run = json.loads(r.stdout.strip().splitlines()[-1])
                    runs[kind].append({**run, "loadavg_before": load})
            for rs in runs.values():  # the median run by CPU seconds
                rs.sort(key=lambda x: x["cpu_s"])
                row = {"label": _label(code), "code": code, "commit": _git(code),
                       **rs[len(rs) // 2], "cpu_s_repeats": [x["cpu_s"] for x in rs],
                       "peak_rss_mb_repeats": [x["peak_rss_mb"] for x in rs],
                       "build_wall_s": build_s,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
                new.append(row)
                print(json.dumps(row), flush=True)
            if not a.keep:
                shutil.rmtree(root, ignore_errors=True)
    done = {(r["label"], r["n"], r["phase"]) for r in new}
    doc["rows"] = [r for r in doc["rows"] if (r["label"], r["n"], r["phase"]) not in done] + new
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    if a.png:
        plot(doc, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
