"""Where the time goes: py-spy samples one shard's processing, in-process and without Ray.

``python -m jobs.bench.profile --system project|floor --out DIR SHARD.tar`` runs one shard
through :meth:`pipeline.run.worker.ShardWorker.process` (built as the driver builds it, default
config) or through the floor's ``process_shard``; :func:`profile` runs that under ``py-spy
record --format raw`` and sorts every sampled stack into a stage (:data:`STAGES`: the first rule
that matches wins; a rule matches the stack's frames, or the source line of its deepest frame in
the project or the floor). Only stacks inside the shard's processing count: imports and set-up
are left out, and so are modules imported on first use inside it (a one-off per process, given
apart as ``import_seconds``). Native code is charged to the Python line that called it.
"""

from __future__ import annotations

import argparse
import linecache
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent  # this package: the floor's source
ROOT = BENCH.parents[1]  # the repository root
IMPORTS = "imports on first use"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")

# (stage, frame pattern, source-line pattern): the frame pattern is searched in the whole
# stack; the line pattern (if any) in the source of the deepest project/floor frame.
STAGES = [
    (IMPORTS, r"<frozen importlib", None),
    ("tar read", r"\(tarfile\.py|_files \(|_groups \(", None),
    (
        "image decode (PIL)",
        r"ImageFile\.load|JpegImagePlugin|PngImagePlugin|Image\.open|draft",
        None,
    ),
    ("resize (PIL)", r"Image\.resize \(", None),
    ("mode convert, alpha (PIL)", r"Image\.convert \(|alpha_composite|exif_transpose", None),
    ("finite checks", r"_check_finite|isfinite", None),
    ("identity hash, t", r"digests \(|timesteps \(|_digest \(|blake2b", r"blake2b|>> np\.uint64"),
    ("noise (Philox normal)", r"KeyedNoise\.noise", r"Philox|standard_normal"),
    (
        "x_t, posterior (float32)",
        r"q_sample|q_posterior|_gather|record_table\.<locals>\.g",
        r"x_t = |mean = ",
    ),
    ("float16 cast", r"$^", r"float16|torch_out|\.to\("),
    ("to float32, normalise", r"ImageDecoder|decode_image|decode_array", None),
    ("Arrow table build", r"build_table|tensor_array|pa\.table", None),
    ("Parquet encode, write", r"ParquetWriter|write_table|_RowGroupWriter|parquet", None),
    ("commit, manifest", r"commit \(|write_json|write_jsonl", None),
]
INSIDE = ("ShardWorker.process", "process_shard")


def _deepest_source(frames: list[tuple[str, str, int]]) -> str:
    """Source line of the deepest frame in pipeline/ or the floor."""
    for _, file, line in reversed(frames):
        if file.startswith("pipeline/") or "/pipeline/" in file:
            path = ROOT / "pipeline" / file.rsplit("pipeline/", 1)[1]
        elif file.startswith("jobs/bench/") or "/jobs/bench/" in file:
            path = BENCH / file.rsplit("jobs/bench/", 1)[1]
        else:
            continue
        return linecache.getline(str(path), line)
    return ""


def classify(stack: str) -> str | None:
    """The stage of one collapsed stack (``frame;frame;...``), None outside a shard's work."""
    if not any(mark in stack for mark in INSIDE):
        return None
    frames = []
    for f in stack.split(";"):
        m = FRAME.match(f)
        if m:
            frames.append((m["func"], m["file"], int(m["line"])))
    source = _deepest_source(frames)
    for stage, frame_re, line_re in STAGES:
        if re.search(frame_re, stack) or (line_re and source and re.search(line_re, source)):
            return stage
    return "other"


def breakdown(raw: str) -> Counter:
    """Stage -> samples in a py-spy ``--format raw`` profile (stacks inside a shard's work)."""
    counts: Counter = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        stage = classify(stack) if n.isdigit() else None
        if stage:
            counts[stage] += int(n)
    return counts


def _project(url: str, out: str, resolution: int, kind: str) -> dict:
    from pipeline.output.manifest import SHARDS, OutputDir
    from pipeline.precompute import dataset_metadata, sample_shape
    from pipeline.run.config import actor_config, compose, config_hash
    from pipeline.run.worker import ShardWorker

    cfg = compose(
        [f"source={kind}", f"source.urls={url}", f"output.dir={out}", "progress=false"]
        + ([f"source.resolution={resolution}"] if kind == "images" else [])
    )
    shape = sample_shape(cfg, [url])
    meta = dataset_metadata(cfg, shape, config_hash(cfg))
    worker = ShardWorker(actor_config(cfg), meta)
    OutputDir(out).makedirs(SHARDS)
    return worker.process(url).to_json()  # the marker (or partial result) as its JSON dict


def _floor(url: str, out: str, resolution: int) -> dict:
    from . import floor as bench_floor

    Path(out).mkdir(parents=True, exist_ok=True)
    return bench_floor.process_shard((url, out, resolution, 0))


def profile(system: str, url: str, out: Path, resolution: int = 64, rate: int = 500) -> dict:
    """Run one shard of ``system`` under py-spy; returns {stages, samples, seconds, raw path}."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw = out / f"profile-{system}.txt"
    target = [sys.executable, "-m", "jobs.bench.profile", "--system", system]
    target += ["--out", str(out / "records"), "--resolution", str(resolution), url]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "-r", str(rate), "--format", "raw", "-o", str(raw), "--", *target]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # jobs is importable
    if proc.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({proc.returncode}): {proc.stderr[-2000:]}")
    counts = breakdown(raw.read_text())
    imports = counts.pop(IMPORTS, 0)  # a one-off per process: left out of the shares
    total = sum(counts.values())
    return {
        "stages": {k: v / total for k, v in counts.most_common()} if total else {},
        "seconds": total / rate,
        "import_seconds": imports / rate,
        "raw": str(raw),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", choices=("project", "floor"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--kind", choices=("images", "arrays"), default="images")
    p.add_argument("shard")
    a = p.parse_args(argv)
    if a.system == "project":
        print(_project(a.shard, a.out, a.resolution, a.kind))
    else:
        print(_floor(a.shard, a.out, a.resolution))
    return 0


if __name__ == "__main__":
    sys.exit(main())
