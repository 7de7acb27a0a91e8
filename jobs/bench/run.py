"""Benchmark of the precompute against its floor and its Ray Data peer (``make bench``).

::

    python -m jobs.bench            # the full run (~30-40 min on 2 cores): docs/benchmark.{md,png}
                                    # and jobs/bench/results/benchmark.json
    python -m jobs.bench --quick    # a smoke run on a few hundred samples: bench-out/quick-report/
    python -m jobs.bench.loader     # the training loader against plain pyarrow (loader.py)

(from the repository root, where ``jobs`` is importable; ``make bench`` runs the first).

On the same shards and machine, in one run, it times as whole processes (spawn to exit, start-up
included) three systems doing the same work, each on every core of the machine:

* ``project``: ``python -m pipeline.precompute source.urls=... output.dir=... progress=false``
  (embedded local Ray, default settings);
* ``floor``: ``jobs/bench/floor.py``, the same records written plainly with numpy/pyarrow in a
  ``multiprocessing.Pool(os.cpu_count())``: the limit on this machine;
* ``peer``: ``jobs/bench/peer.py``, Ray Data ``read_webdataset -> map_batches(actor class) ->
  write_parquet`` with ``ray.init(num_cpus=os.cpu_count())``.

Scenarios (``--quick`` shrinks them): ``headline`` 16 x 1000 photo crops at 64 px (3 repeats);
``photos256`` 4 x 500 larger crops at 256 px; ``arrays`` 16 x 1000 latent-like float32
[4, 32, 32]; ``shards``: 1, 2 and 4 shards of 1000 photos (with the headline's 16: scaling in
shard count); ``samples``: 2 shards of 250 and 10,000 photos (with 2 x 1000: scaling in shard
size, and per-actor memory at 1k vs 10k samples per shard); ``long``: 64 x 1000 photos, project
and floor only (how far the project's fixed start-up cost amortises); ``arrays48``: 48 x 1000
arrays, project and floor only (with ``arrays``, the marginal rate on arrays); ``encoder``: 2 x 1000
photos at 64 px through a tiny random VAE (``encoder=vae``, :mod:`jobs.bench.encoder`, which
also splits decode vs encode), project only. Repeats are interleaved
(project, floor, peer, project, ...). Every run gets a fresh output directory and its row count
is checked. Before each run the harness waits (up to ``--quiet-wait`` s) for the machine to be
idle, and it reports the CPU that other processes used during each run.

Measured (``jobs/bench/measure.py``): wall time, samples/s, output MB/s (bytes of Parquet
written), CPU utilisation ((user + sys) / (wall x cores)) and peak RSS of the driver and of every
actor or worker process. A py-spy profile of one 64 px shard in the project's worker and in the
floor (``jobs/bench/profile.py``) says where the time goes inside a worker, and
``jobs/bench/startup.py`` times the project's fixed cost (imports, ``ray.init``, actors ready,
``ray.shutdown``) in fresh interpreters. Input shards are cached under
``--workdir`` (default ``bench-out/``) keyed by their parameters. Results: ``benchmark.json``
(every run; ``--results``, default ``jobs/bench/results/``, or beside the report with ``--docs``
or ``--quick``), ``benchmark.md`` (tables; text outside its generated block is kept) and
``benchmark.png`` (both in ``--docs``, default ``docs/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import encoder as bench_encoder
from . import measure as bench_measure
from . import profile as bench_profile
from . import report as bench_report
from . import startup as bench_startup
from .measure import ROOT

RESULTS = Path(__file__).resolve().parent / "results"  # the saved results of full runs

SYSTEMS = ("project", "floor", "peer")
PHOTOS64 = {"kind": "photos", "min_crop": 96, "max_crop": 320}  # demo's crops: JPEG, some PNG
PHOTOS256 = {"kind": "photos", "min_crop": 256, "max_crop": 768}
ARRAYS = {"kind": "arrays", "shape": (4, 32, 32)}


@dataclass
class Scenario:
    group: str  # headline | photos256 | arrays | shards | samples | long | arrays48 | encoder
    data: dict  # kind + dataset parameters (crops or shape)
    shards: int
    per_shard: int
    resolution: int  # images: output side; arrays: unused
    repeats: int = 1
    systems: tuple[str, ...] = SYSTEMS  # which systems run it
    overrides: tuple[str, ...] = ()  # more precompute overrides (the encoder scenario's)

    @property
    def name(self) -> str:
        what = f"photos{self.resolution}" if self.data["kind"] == "photos" else "arrays"
        what = f"vae-{what}" if self.group == "encoder" else what
        return f"{what} {self.shards}x{self.per_shard}"

    @property
    def samples(self) -> int:
        return self.shards * self.per_shard


def plan(quick: bool, repeats_headline: int, repeats: int) -> list[Scenario]:
    """The scenarios of a run; see the module docstring. The report finds the scaling series
    among the 64 px runs: shard count at ``n`` samples per shard, shard size at 2 shards."""
    n = 200 if quick else 1000  # samples per shard of the 64 px series
    small, big = 250, (2 if quick else 10) * n
    scenarios = [
        Scenario("headline", PHOTOS64, 2 if quick else 16, n, 64, repeats_headline),
        Scenario("photos256", PHOTOS256, 2 if quick else 4, 30 if quick else 500, 256, repeats),
        Scenario("arrays", ARRAYS, 2 if quick else 16, n, 0, repeats),
    ]
    for shards in () if quick else (1, 2, 4):
        scenarios.append(Scenario("shards", PHOTOS64, shards, n, 64))
    for per_shard in (big,) if quick else (small, big):
        scenarios.append(Scenario("samples", PHOTOS64, 2, per_shard, 64))
    # a 4x longer job than the headline: how far the project's fixed start-up cost amortises
    # (the peer would take ~5 min per run here and is left out)
    long = Scenario("long", PHOTOS64, 4 if quick else 64, n, 64, systems=("project", "floor"))
    # 3x the arrays job: with it, the marginal rate on arrays (delta samples / delta wall)
    arrays48 = Scenario(
        "arrays48", ARRAYS, 6 if quick else 48, n, 0, repeats, systems=("project", "floor")
    )
    # encoder=vae with a tiny random VAE (its path is set in main, under --workdir)
    encoder = Scenario("encoder", PHOTOS64, 2, n, 64, systems=("project",))
    return scenarios + [long, arrays48, encoder]


def command(system: str, sc: Scenario, paths: list[str], out: Path) -> list[str]:
    py = sys.executable
    if system == "project":
        cmd = [py, "-m", "pipeline.precompute"]
        if sc.data["kind"] == "arrays":
            cmd += ["source=arrays"]
        else:
            cmd += [f"source.resolution={sc.resolution}"]
        return cmd + [f"source.urls={bench_measure.brace_url(paths)}", f"output.dir={out}",
                      "progress=false", *sc.overrides]  # fmt: skip
    # floor and peer: modules of this package, run from the repository root (see run_one)
    module = f"jobs.bench.{system}"
    return [py, "-m", module, "--out", str(out), "--resolution", str(sc.resolution or 64), *paths]


def run_one(system: str, sc: Scenario, paths: list[str], work: Path, repeat: int, a) -> dict:
    out = work / "runs" / f"{system}-{sc.name.replace(' ', '-')}-r{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    # the project: Hydra writes outputs/ into the working directory; floor and peer run as
    # ``python -m jobs.bench.<system>``, so from the repository root
    cwd = work / "cwd" if system == "project" else ROOT
    cwd.mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    waited = bench_measure.wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else 0.0
    m = bench_measure.run_measured(command(system, sc, paths, out), log, cwd, a.interval)
    stats = (
        bench_measure.parquet_stats(out) if out.exists() else {"files": 0, "rows": 0, "bytes": 0}
    )
    ok = m["exit_code"] == 0 and stats["rows"] == sc.samples
    if not ok:
        print(f"[bench] !! {system} {sc.name}: exit {m['exit_code']}, {stats['rows']} rows of "
              f"{sc.samples}; see {log}")  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    row = {**asdict(sc), "name": sc.name, "samples": sc.samples, "system": system}
    row.update(repeat=repeat, ok=ok, log=str(log), waited_s=waited, **stats, **m)
    row["samples_per_s"] = sc.samples / m["wall_s"]
    row["mb_per_s"] = stats["bytes"] / 1e6 / m["wall_s"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few hundred samples, 1 repeat")
    p.add_argument("--workdir", default=str(ROOT / "bench-out"), help="cached shards, runs, logs")
    p.add_argument("--docs", default=None, help="report dir (default docs/, quick: workdir)")
    p.add_argument(
        "--results",
        default=None,
        help="benchmark.json path (default jobs/bench/results/; with --docs or --quick: beside "
        "the report)",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--groups", default=None, help="comma-separated scenario groups to run")
    p.add_argument("--repeats-headline", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="other groups; default 2 (quick: 1)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between RSS/CPU polls")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for a second with the machine "
        "< 25%% busy (0: do not wait)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    p.add_argument(
        "--no-startup", action="store_true", help="skip timing the start-up phases (~45 s)"
    )
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    docs = Path(a.docs or (work / "quick-report" if a.quick else ROOT / "docs")).resolve()
    saved = a.results or (docs if a.docs or a.quick else RESULTS) / "benchmark.json"
    saved = Path(saved).resolve()
    rh = a.repeats_headline or (1 if a.quick else 3)
    scenarios = plan(a.quick, rh, a.repeats or (1 if a.quick else 2))
    if a.groups:
        scenarios = [s for s in scenarios if s.group in a.groups.split(",")]
    systems = [s for s in a.systems.split(",") if s]
    started = time.time()
    info = {
        "command": "python -m jobs.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": bench_measure.machine(),
        "quick": a.quick,
        "systems": systems,
    }
    runs: list[dict] = []
    for sc in scenarios:
        if sc.group == "encoder":
            sc.overrides = tuple(bench_encoder.overrides(work))
        paths = bench_measure.dataset(
            work / "data", sc.data["kind"], sc.shards, sc.per_shard,
            **{k: v for k, v in sc.data.items() if k != "kind"},
        )  # fmt: skip
        for r in range(sc.repeats):
            for system in (s for s in systems if s in sc.systems):
                row = run_one(system, sc, paths, work, r, a)
                runs.append(row)
                print(
                    f"[bench] {sc.name:<22} {system:<8} r{r}  {row['wall_s']:6.1f} s  "
                    f"{row['samples_per_s']:7.1f} samples/s  cpu {row['cpu_util']:.0%}  "
                    f"others {row['others_cpu_util']:.0%}",
                    flush=True,
                )
    profile = {}
    if not a.no_profile:
        shard = bench_measure.dataset(work / "data", "photos", 1, 1000, **{
            k: v for k, v in PHOTOS64.items() if k != "kind"})[0]  # fmt: skip
        for system in ("project", "floor"):
            try:
                profile[system] = bench_profile.profile(system, shard, work / f"profile-{system}")
            except Exception as exc:  # py-spy may be missing or not allowed to ptrace
                print(f"[bench] profile of {system} failed: {exc}")
    startup = {}
    if not a.no_startup and "project" in systems:
        if a.quiet_wait > 0:
            bench_measure.wait_quiet(a.quiet_wait)
        startup = bench_startup.measure(repeats=3)
    info["seconds"] = round(time.time() - started)
    results = {**info, "runs": runs, "profile": profile, "startup": startup}
    docs.mkdir(parents=True, exist_ok=True)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1, default=str))
    bench_report.write(results, docs)
    print(bench_report.summary_table(results))
    print(f"[bench] {len(runs)} runs in {info['seconds']} s; report: {docs / 'benchmark.md'}, "
          f"results: {saved}")  # fmt: skip
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
