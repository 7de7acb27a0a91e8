"""``make demo``: real photos -> WebDataset shards -> precompute (embedded Ray) -> validation.

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
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dir", default="demo", help="where shards, records and the report go")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the precompute")
    args = parser.parse_args(argv)

    from .config import compose
    from .precompute import format_summary, run
    from .validate import run_validation

    root = Path(args.dir).resolve()
    urls = write_photo_shards(root / "shards", args.shards, args.per_shard)
    print(f"[demo] wrote {args.shards} shards of {args.per_shard} photo crops: {urls}")
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
    manifest = run(cfg)
    print(format_summary(manifest))
    code = run_validation(str(out))
    print(f"[demo] records: {out}")
    print(f"[demo] validation report: {out / 'validation' / 'report.md'} (plots beside it)")
    print(f"[demo] next: python jobs/train_example.py --data {out} --out {root / 'train'}")
    return max(manifest["exit_code"], code)


if __name__ == "__main__":
    sys.exit(main())
