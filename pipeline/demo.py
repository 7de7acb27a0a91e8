"""``make demo``: real photos through the precompute, the validation and a brief training run.

Photos -> WebDataset shards -> precompute (embedded Ray) -> validation (report.html) -> the
example trainer (``jobs/train``) for a few steps, whose model draws ``samples.png``.
Each step prints a line with its expected time before it starts and its time when done.

The photos are scikit-image's sample images (astronaut, coffee, chelsea, rocket, ...), which
ship inside the package: no download. Each sample is a random crop (seeded) of one of them,
encoded as JPEG, or PNG for the ones with an alpha channel, so the shards hold RGB, grayscale
and RGBA images of different sizes, as a real dataset does. Each sample also carries a ``.cls``
label (the photo's index in :data:`PHOTOS`: which photo the crop came from) and a ``.txt``
caption (the photo's name), kept in the records as the ``cls`` and ``txt`` columns.
"""

from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

PHOTOS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel", "hubble_deep_field",
    "immunohistochemistry", "logo", "moon", "retina", "rocket", "clock", "grass", "gravel", "brick",
)  # fmt: skip


def load_photos() -> list[np.ndarray]:
    """scikit-image's bundled sample photos as uint8 arrays ([H, W], [H, W, 3] or [H, W, 4])."""
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]


def write_photo_shards(
    out_dir: str | Path,
    num_shards: int,
    per_shard: int,
    seed: int = 0,
    min_crop: int = 96,
    max_crop: int = 320,
    prefix: str = "photos",
    labels: bool = True,
) -> str:
    """Write ``num_shards`` tar shards of ``per_shard`` random photo crops; returns the brace
    URL. With ``labels`` each crop also has ``.cls`` (which photo it came from) and ``.txt``
    (the photo's name); the benchmark's shards hold the image alone, as its floor and peer
    read them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    rng = np.random.default_rng(seed)
    width = max(len(str(num_shards - 1)), 4)
    for s in range(num_shards):
        with wds.TarWriter(str(out_dir / f"{prefix}-{s:0{width}d}.tar")) as sink:
            for i in range(per_shard):
                label = int(rng.integers(len(photos)))
                photo = photos[label]
                h, w = photo.shape[:2]
                ch, cw = (int(rng.integers(min(min_crop, d), min(max_crop, d) + 1)) for d in (h, w))
                y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
                crop = photo[y : y + ch, x : x + cw]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                image = Image.fromarray(np.ascontiguousarray(crop))
                buf = io.BytesIO()
                if image.mode == "RGBA":
                    image.save(buf, format="PNG")
                    ext = "png"
                else:
                    image.save(buf, format="JPEG", quality=90)
                    ext = "jpg"
                sample = {"__key__": f"{prefix}{s:0{width}d}_{i:06d}", ext: buf.getvalue()}
                if labels:
                    sample["cls"] = str(label).encode()  # which photo the crop came from
                    sample["txt"] = PHOTOS[label].replace("_", " ").encode()
                sink.write(sample)
    return str(out_dir / f"{prefix}-{{{0:0{width}d}..{num_shards - 1:0{width}d}}}.tar")


class _Steps:
    """``[demo i/n] what (expected time)`` before each step, ``done in S s`` after it."""

    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, 0.0

    def start(self, what: str, expected: str) -> None:
        self.i += 1
        print(f"[demo {self.i}/{self.total}] {what} ({expected} on 2 CPU cores)", flush=True)
        self.t0 = time.perf_counter()

    def done(self) -> None:
        print(f"[demo {self.i}/{self.total}] done in {time.perf_counter() - self.t0:.0f} s")


def example_trainer() -> Path | None:
    """``jobs/train_example.py`` of the repository this package runs from (None when the package
    is installed from a wheel, which has no ``jobs/``)."""
    path = Path(__file__).resolve().parent.parent / "jobs" / "train_example.py"
    return path if path.is_file() else None


def train_briefly(data: Path, out: Path, steps: int, samples: int) -> int:
    """Run the example trainer for ``steps`` steps and ``samples`` samples; its exit code.

    It runs as ``python -m jobs.train`` in a process of its own, in the repository root: ``jobs``
    is not installed, and from the root ``-m`` imports it exactly as a user's launch does (no
    import machinery, no ``sys.path`` change in this process); its torch threads and matplotlib
    backend stay out of the demo's process. Its lines go straight to this process's stdout."""
    argv = ["--data", str(data), "--out", str(out), "--steps", str(steps)]
    cmd = [sys.executable, "-m", "jobs.train", *argv, "--samples", str(samples)]
    sys.stdout.flush()  # the demo's lines before the trainer's
    return subprocess.run(cmd, cwd=example_trainer().parent.parent).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dir", default="demo", help="where shards, records and the report go")
    parser.add_argument("--shards", type=int, default=4, help="WebDataset shards to write")
    parser.add_argument("--per-shard", type=int, default=96, help="photo crops per shard")
    parser.add_argument("--resolution", type=int, default=64, help="source.resolution")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=100,
        help="steps of the example trainer at the end (0: no training, no samples.png)",
    )
    parser.add_argument(
        "--samples", type=int, default=8, help="samples the trained model draws into samples.png"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the precompute")
    args = parser.parse_args(argv)

    from pipeline.precompute import format_summary, run
    from pipeline.run.config import compose
    from pipeline.validate import run_validation

    trainer = example_trainer() if args.train_steps > 0 else None
    steps = _Steps(4 if trainer else 3)
    root = Path(args.dir).resolve()
    steps.start(f"writing {args.shards} shards of {args.per_shard} photo crops", "about 5 s")
    urls = write_photo_shards(root / "shards", args.shards, args.per_shard)
    print(f"[demo] shards: {urls}")
    steps.done()
    out = root / "records"
    cfg = compose(
        [
            "source=images",
            f"source.urls={urls}",
            f"source.resolution={args.resolution}",
            f"output.dir={out}",
            "schedule=cosine",
            "sampling.draws_per_sample=2",
            "output.overwrite=true",
            *args.overrides,
        ]
    )
    steps.start("precompute on an embedded Ray: decode, noise, write Parquet", "about 30 s")
    manifest = run(cfg)
    print(format_summary(manifest))
    steps.done()
    steps.start("validation of every record, plots and report.html", "about 30 s")
    code = run_validation(str(out))
    steps.done()
    python = shlex.quote(sys.executable)  # the venv's python: bare `python` may be another one
    train = root / "train"
    report = out / "validation" / "report.html"
    pictures = [f"[demo] report:  {report} (every plot embedded: open it in a browser)"]
    if trainer is not None:
        steps.start(
            f"example trainer, {args.train_steps} steps, then {args.samples} samples by "
            "ancestral sampling over every timestep",
            "1-2 min",
        )
        code = max(code, train_briefly(out, train, args.train_steps, args.samples))
        steps.done()
        if args.samples > 0:
            pictures.append(
                f"[demo] samples: {train / 'samples.png'} (a {args.train_steps}-step model: "
                "textures, not yet photos)"
            )
    elif args.train_steps > 0:
        print("[demo] no jobs/train_example.py beside this package (a wheel install): no training")
    print(f"[demo] records: {out}")
    print(*pictures, sep="\n")
    trainer_path = trainer or "jobs/train_example.py"
    print(
        f"[demo] next: {python} {trainer_path} --data {out} --out {train} --steps 1000\n"
        f"[demo]       {python} -m pipeline.validate {out}"
    )
    return max(manifest["exit_code"], code)


if __name__ == "__main__":
    sys.exit(main())
