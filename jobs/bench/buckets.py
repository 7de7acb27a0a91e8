"""Aspect-ratio buckets against the square crop, on the same photo crops.

``python -m jobs.bench.buckets [--shards 4] [--per-shard 250] [--resolution 64] [--step 16]
[--repeats 2] [--out FILE]`` runs the precompute on the benchmark's photo crops
(:func:`jobs.bench.measure.dataset`: crops of 96 to 320 px each side, aspect 0.3 to 3.3) twice
per repeat, alternating:
``square`` (``source.buckets=null``: shorter side to ``resolution``, center crop) and
``bucketed`` (``source.buckets=auto``, ``bucket_step``, center crop), and prints JSON:

* per mode, the median wall time and samples/s over the repeats (and each run's figures from
  :func:`jobs.bench.measure.run_measured`, with the CPU other processes took meanwhile);
* pixels kept per image: the share of the original image's area that reaches the record. The
  square crop keeps ``min(h, w) / max(h, w)`` of an ``h x w`` image; a bucket ``H x W`` keeps
  ``H * W / (rh * rw)`` of it, ``(rh, rw)`` the size it is resized to cover the bucket
  (:func:`pipeline.read.buckets.cover`). Both are computed from each record's ``original_size`` and
  ``target_size`` (read back from the bucketed run's records), and summarised by mean, median,
  10th percentile and minimum;
* the bucket histogram of the bucketed run (the manifest's bucket table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from .measure import brace_url, dataset, machine, run_measured

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = {"kind": "photos", "min_crop": 96, "max_crop": 320}
MODES = {
    "square": [],
    "bucketed": ["source.buckets=auto"],
}


def kept_shares(out: Path) -> dict[str, np.ndarray]:
    """Per record (draw 0), the share of its original's area that the square crop and the bucket
    keep, from the records' ``original_size`` and ``target_size``."""
    import pyarrow.parquet as pq

    from pipeline.read.buckets import cover

    square, bucketed = [], []
    for path in sorted(out.glob("*.parquet")):
        t = pq.read_table(path, columns=["draw", "original_size", "target_size"])
        for d, (h, w), (bh, bw) in zip(
            t["draw"].to_pylist(), t["original_size"].to_pylist(), t["target_size"].to_pylist()
        ):
            if d:
                continue
            rh, rw = cover(h, w, (bh, bw))
            bucketed.append(bh * bw / (rh * rw))
            square.append(min(h, w) / max(h, w))
    return {"square": np.array(square), "bucketed": np.array(bucketed)}


def summary(x: np.ndarray) -> dict:
    return {
        "images": int(len(x)),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p10": float(np.percentile(x, 10)),
        "min": float(x.min()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--step", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "ddpm-bench-data"))
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    paths = dataset(Path(args.data), shards=args.shards, per_shard=args.per_shard, **PHOTOS)
    common = [
        f"source.urls={brace_url(paths)}", "source=images", f"source.resolution={args.resolution}",
        f"source.bucket_step={args.step}", f"ray.num_actors={args.actors}", "progress=false",
    ]  # fmt: skip
    runs: dict[str, list] = {m: [] for m in MODES}
    samples = args.shards * args.per_shard
    with tempfile.TemporaryDirectory(prefix="bench-buckets-") as tmp:
        for r in range(args.repeats):
            for mode, extra in MODES.items():
                out = Path(tmp) / f"{mode}-{r}"
                cmd = [sys.executable, "-m", "pipeline.precompute", *common, *extra,
                       f"output.dir={out}"]  # fmt: skip
                res = run_measured(cmd, Path(tmp) / f"{mode}-{r}.log", cwd=ROOT)
                if res["exit_code"] != 0:
                    print((Path(tmp) / f"{mode}-{r}.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                manifest = json.loads((out / "_manifest.json").read_text())
                runs[mode].append({
                    "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
                    "others_cpu_util": res["others_cpu_util"],
                    "samples_per_s": samples / res["wall_s"],
                    "records": manifest["totals"]["records"],
                })  # fmt: skip
                if mode == "bucketed" and r == 0:
                    shares = kept_shares(out)
                    table = [[*b["size"], b["records"], b["files"]] for b in manifest["buckets"]]
    result = {
        "command": "python -m jobs.bench.buckets " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "samples": samples,
        "config": common,
        "modes": {
            m: {
                "median_wall_s": statistics.median(x["wall_s"] for x in v),
                "median_samples_per_s": statistics.median(x["samples_per_s"] for x in v),
                "runs": v,
            }
            for m, v in runs.items()
        },
        "pixels_kept": {m: summary(x) for m, x in shares.items()},
        "bucket_table": {"columns": ["H", "W", "records", "files"], "rows": table},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
