"""Validation cost against the precompute it checks: ``python -m jobs.bench.validation``.

On the same photo shards as the headline benchmark (the demo's crops, 64 px, built once under
``--workdir``/data), each repeat runs, as whole processes timed from spawn to exit (start-up
included, both on every core of the machine, embedded Ray):

* ``python -m pipeline.precompute source.urls=... source.resolution=64 output.dir=OUT``;
* ``python -m pipeline.validate output.dir=OUT progress=false`` on that output (default
  settings: plots on, 2000 regenerated records, every check);

and prints both walls, the ratio validate / precompute (the goal: <= 0.5, never above 1.0) and
what validation spent where, from the report's ``summary.cost_seconds`` (the driver's phases,
the shard scans' parts summed over shards, each check). Repeats alternate precompute and
validate; before each run the harness waits up to ``--quiet-wait`` s for an idle second and it
records the CPU that other processes used meanwhile (``others``: a busy machine slows both).
Results go to ``--out`` (JSON, every run).

``--validate-only DIR`` times validation of an existing output (no precompute). ``--before
ROOT`` also times, in each repeat and on the same output, the validator of another checkout
(``python -m pipeline.validate`` run with ROOT as working directory, e.g. the tree of a commit
from ``git archive <commit> pipeline conf | tar -x -C ROOT``): before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from . import measure
from .measure import ROOT
from .run import PHOTOS64


def precompute_cmd(paths: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.precompute", f"source.urls={measure.brace_url(paths)}",
            "source.resolution=64", f"output.dir={out}", "progress=false"]  # fmt: skip


def validate_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.validate", f"output.dir={out}", "progress=false",
            *overrides]  # fmt: skip


def timed(cmd: list[str], log: Path, cwd: Path, quiet_wait: float) -> dict:
    """One measured run (``jobs.bench.measure.run_measured``) after waiting for a quiet second."""
    waited = measure.wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
    m = measure.run_measured(cmd, log, cwd)
    keep = ("exit_code", "wall_s", "cpu_s", "cpu_util", "others_cpu_util", "load_before")
    return {"waited_s": waited, **{k: m[k] for k in keep}, "log": str(log)}


def cost_table(cost: dict) -> str:
    """The report's summary.cost_seconds as text lines."""
    lines = []
    for part in ("wall", "scan", "checks"):
        items = cost.get(part, {})
        if items:
            total = sum(v for k, v in items.items() if k != "task_total")
            lines.append(f"  {part} (s, sum {total:.2f}):")
            lines += [f"    {k:<28} {v:8.3f}" for k, v in items.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.validation", description=__doc__)
    p.add_argument("--shards", type=int, default=8, help="shards of --per-shard photos")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=str(ROOT / "bench-out"))
    p.add_argument("--quiet-wait", type=float, default=30.0, help="0: do not wait")
    p.add_argument("--validate-only", default=None, help="time validation of this output only")
    p.add_argument("--before", default=None, help="also time the validator of this checkout")
    p.add_argument("--out", default=None, help="results JSON (default workdir/validation.json)")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    cwd, logs = work / "cwd", work / "logs"
    cwd.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    if not a.validate_only:
        kw = {k: v for k, v in PHOTOS64.items() if k != "kind"}
        paths = measure.dataset(work / "data", "photos", a.shards, a.per_shard, **kw)
    for r in range(a.repeats):
        row = {"repeat": r}
        if a.validate_only:
            out = Path(a.validate_only).resolve()
        else:
            out = work / "runs" / f"validation-bench-{a.shards}x{a.per_shard}"
            shutil.rmtree(out, ignore_errors=True)
            row["precompute"] = timed(
                precompute_cmd(paths, out), logs / f"vb-precompute-r{r}.log", cwd, a.quiet_wait
            )
        if a.before:  # the other checkout's validator first: its report is overwritten below
            row["validate_before"] = timed(
                validate_cmd(out), logs / f"vb-before-r{r}.log", Path(a.before), a.quiet_wait
            )
        row["validate"] = timed(
            validate_cmd(out), logs / f"vb-validate-r{r}.log", cwd, a.quiet_wait
        )
        report = out / "validation" / "report.json"
        rep = json.loads(report.read_text()) if report.exists() else {}
        row["passed"] = rep.get("passed")
        row["cost_seconds"] = rep.get("summary", {}).get("cost_seconds", {})
        runs.append(row)
        pw = row.get("precompute", {}).get("wall_s")
        vw = row["validate"]["wall_s"]
        head = f"[validation-bench] r{r}: validate {vw:6.1f} s"
        if pw:
            head += f"  precompute {pw:6.1f} s  ratio {vw / pw:.2f}x"
        if a.before:
            bw = row["validate_before"]["wall_s"]
            head += f"  before: validate {bw:6.1f} s" + (f" ratio {bw / pw:.2f}x" if pw else "")
        others = row["validate"]["others_cpu_util"]
        print(f"{head}  (others' CPU during validate {others:.0%}, passed {row['passed']})")
        print(cost_table(row["cost_seconds"]), flush=True)
    vws = [r["validate"]["wall_s"] for r in runs]
    summary = {"validate_median_s": statistics.median(vws)}
    if a.before:
        summary["validate_before_median_s"] = statistics.median(
            r["validate_before"]["wall_s"] for r in runs
        )
        before = summary["validate_before_median_s"]
        print(f"[validation-bench] before: validate median {before:.1f} s")
    if not a.validate_only:
        pws = [r["precompute"]["wall_s"] for r in runs]
        ratios = [r["validate"]["wall_s"] / r["precompute"]["wall_s"] for r in runs]
        summary.update(
            precompute_median_s=statistics.median(pws),
            ratio_median=statistics.median(ratios),
            ratio_max=max(ratios),
        )
        print(f"[validation-bench] medians: precompute {summary['precompute_median_s']:.1f} s, "
              f"validate {summary['validate_median_s']:.1f} s, ratio "
              f"{summary['ratio_median']:.2f}x (max {summary['ratio_max']:.2f}x)")  # fmt: skip
    else:
        print(f"[validation-bench] validate median {summary['validate_median_s']:.1f} s")
    info = {
        "command": "python -m jobs.bench.validation "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": measure.machine(),
        "summary": summary,
        "runs": runs,
    }
    dest = Path(a.out) if a.out else work / "validation.json"
    dest.write_text(json.dumps(info, indent=1, default=str))
    print(f"[validation-bench] results: {dest}")
    ok = all(r["validate"]["exit_code"] in (0, 1) for r in runs)
    return 0 if ok and all(r.get("precompute", {}).get("exit_code", 0) == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
