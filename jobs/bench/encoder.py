"""The encoder (``encoder=vae``) on the CPU: images/s per actor, and decode vs encode.

``python -m jobs.bench.encoder [--quick] [--workdir bench-out] [--out FILE.json]``

With one torch thread (one CPU per actor, the ``local`` default), on the benchmark's photo
shards (:func:`jobs.bench.measure.dataset`), at 64 px and 256 px:

* **in-process split** (no Ray): per image, the decode (tar read, JPEG/PNG decode, resize:
  :func:`pipeline.read.source.iter_shard` with :class:`~pipeline.read.decoders.ImageDecoder`), the
  VAE encode (:class:`pipeline.encode.encode_stage.EncodeStage`), the noise stage (keyed draws, x_t,
  posterior: :func:`pipeline.run.stages.compute_records`, ``latent=sample``) and the Parquet encode
  of the records; best of ``--repeats``;
* **end to end**: ``python -m pipeline.precompute ... encoder=vae ray.num_actors=1`` as a process
  (spawn to exit) on the same shard, and the actor's own time for the shard (the manifest's
  ``seconds``): images/s per actor with and without start-up.

VAEs with random weights (no download), saved with ``save_pretrained`` into
``<workdir>/models``: ``tiny`` (the tests' architecture, 8/16 channels, downsampling 2) at 64 px,
``tiny-f8`` (8/16/16/16 channels, downsampling 8) at 256 px -- the tiny one would attend over
128 x 128 latent positions there, which costs ~1 s per image -- and, in-process only,
``sd`` (the Stable Diffusion VAE's architecture: 128/256/512/512 channels, downsampling 8, 34 M
encoder parameters) with its FLOPs per image counted by ``torch.utils.flop_counter``: the figure
the GPU estimates of docs/gpu.md start from. The tiny VAE's numbers measure the pipeline around
the model, not a real model's cost.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import ROOT, brace_url, dataset, machine

# resolution -> (photo crops, VAE): at 256 px the tiny VAE (downsampling 2) would attend over
# 128 x 128 = 16384 latent positions (quadratic: ~1 s per image here), so 256 px uses tiny-f8
PHOTOS = {
    64: ({"min_crop": 96, "max_crop": 320}, "tiny"),
    256: ({"min_crop": 256, "max_crop": 768}, "tiny-f8"),
}
TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
    layers_per_block=1,
)
TINY_F8 = {**TINY, "block_out_channels": (8, 16, 16, 16),
           "down_block_types": ("DownEncoderBlock2D",) * 4,
           "up_block_types": ("UpDecoderBlock2D",) * 4}  # fmt: skip
MODELS = {"tiny": TINY, "tiny-f8": TINY_F8}
SD = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)


def tiny_vae(models: Path, name: str = "tiny") -> Path:
    """A tiny random VAE of :data:`MODELS` in ``models/<name>`` (built once)."""
    folder = models / name
    if not (folder / "config.json").exists():
        import torch
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(**MODELS[name]).save_pretrained(folder)
    return folder


def overrides(work: Path) -> list[str]:
    """The precompute overrides of the benchmark's encoder scenario (``jobs.bench.run``)."""
    return ["encoder=vae", f"encoder.model={tiny_vae(work / 'models')}"]


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def split(url: str, vae: Path, resolution: int, repeats: int, batch: int = 64) -> dict:
    """Seconds per image of each stage on one thread (see the module docstring)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipeline.encode.encode_stage import EncodeStage
    from pipeline.encode.encoder import describe_encoder, latent_shape
    from pipeline.noising.noise import KeyedNoise
    from pipeline.noising.schedule import make_schedule
    from pipeline.output.records import build_table, record_schema, writer_options
    from pipeline.read.decoders import ImageDecoder
    from pipeline.read.source import Sample, iter_shard
    from pipeline.run.config import compose
    from pipeline.run.stage import Batch
    from pipeline.run.stages import RecordOptions, compute_records

    torch.set_num_threads(1)
    cfg = compose(["encoder=vae", f"encoder.model={vae}", f"source.urls={url}", "output.dir=x",
                   f"source.resolution={resolution}"])  # fmt: skip
    ident = describe_encoder(cfg).describe()
    shape = latent_shape(describe_encoder(cfg).config, [3, resolution, resolution])
    meta = {**ident, "input_shape": [3, resolution, resolution]}

    def decode():
        return [s for s in iter_shard(url, ImageDecoder(resolution)) if isinstance(s, Sample)]

    t_decode, samples = _best(decode, repeats)
    n = len(samples)
    t0 = time.perf_counter()
    stage = EncodeStage(meta)
    stage.setup(torch.device("cpu"))
    t_load = time.perf_counter() - t0

    def encode():
        out = []
        for i in range(0, n, batch):
            out += stage.process(Batch("s", samples[i : i + batch])).samples
        return out

    t_encode, latents = _best(encode, repeats)
    schedule, noise = make_schedule("linear", 1000), KeyedNoise(0, 1000)

    def records():
        return [
            compute_records(
                schedule,
                noise,
                "s",
                latents[i : i + batch],
                device=torch.device("cpu"),
                options=RecordOptions("float16", latent="sample"),
            )  # fmt: skip
            for i in range(0, n, batch)
        ]

    t_noise, cols = _best(records, repeats)
    schema = record_schema(shape, "float16", False)

    def parquet():
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, schema, **writer_options(schema, "zstd", "none")) as w:
            for c in cols:
                w.write_table(build_table(schema, c))
        return buf.tell()

    t_parquet, size = _best(parquet, repeats)
    per = {k: v / n for k, v in [("decode", t_decode), ("encode", t_encode),
                                 ("noise", t_noise), ("parquet", t_parquet)]}  # fmt: skip
    total = sum(per.values())
    return {
        "vae": Path(vae).name,
        "resolution": resolution,
        "images": n,
        "latent_shape": shape,
        "vae_load_s": round(t_load, 3),
        "ms_per_image": {k: round(v * 1e3, 3) for k, v in per.items()},
        "share": {k: round(v / total, 3) for k, v in per.items()},
        "images_per_s_per_cpu": round(1 / total, 1),
        "parquet_bytes_per_image": round(size / n),
        "pixels_std": float(np.std(np.stack([s.array for s in samples[:16]]))),
    }


def sd_encoder_cost(resolutions=(256, 512), timed: int = 256) -> dict:
    """FLOPs per image of the SD VAE's encoder (random weights) and one CPU thread's time."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD).eval()
    vae.decoder = None
    params = sum(p.numel() for p in vae.parameters())
    out = {"encoder_parameters": params, "gflop_per_image": {}}
    with torch.inference_mode():
        for r in resolutions:
            with FlopCounterMode(display=False) as fc:
                vae.encode(torch.zeros(1, 3, r, r))
            out["gflop_per_image"][r] = round(fc.get_total_flops() / 1e9, 1)
        x = torch.zeros(1, 3, timed, timed)
        vae.encode(x)  # warm-up
        t, _ = _best(lambda: vae.encode(x), 2)
    out[f"cpu_1_thread_s_per_image_{timed}px"] = round(t, 2)
    return out


def end_to_end(urls: list[str], vae: Path | None, resolution: int, work: Path) -> dict:
    """``pipeline.precompute`` with one actor: wall time (spawn to exit) and the actor's time."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="enc-run-"))
    cmd = [sys.executable, "-m", "pipeline.precompute", f"source.urls={brace_url(urls)}",
           f"source.resolution={resolution}", f"output.dir={out}", "ray.num_actors=1",
           "progress=false"]  # fmt: skip
    if vae is not None:
        cmd += ["encoder=vae", f"encoder.model={vae}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    samples = manifest["totals"]["samples"]
    actor = sum(e["seconds"] for e in manifest["shards"].values())
    return {
        "encoder": vae.name if vae else "none",
        "resolution": resolution,
        "samples": samples,
        "wall_s": round(wall, 2),
        "actor_s": round(actor, 2),
        "images_per_s_wall": round(samples / wall, 1),
        "images_per_s_per_actor": round(samples / actor, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.encoder", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="100 images, 1 repeat")
    p.add_argument("--workdir", default=str(ROOT / "bench-out"))
    p.add_argument("--out", default=None, help="results JSON (default <workdir>/encoder.json)")
    p.add_argument("--repeats", type=int, default=None, help="best of (default 3, quick 1)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end runs")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    n, repeats = (100, 1) if a.quick else (500, a.repeats or 3)
    res = {"command": "python -m jobs.bench.encoder " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
           "split": [], "end_to_end": []}  # fmt: skip
    for r, (crops, name) in PHOTOS.items():
        vae = tiny_vae(work / "models", name)
        (url,) = dataset(work / "data", "photos", 1, n, **crops)
        row = split(url, vae, r, repeats)
        res["split"].append(row)
        print(f"[encoder] {r} px: ms/image {row['ms_per_image']} -> "
              f"{row['images_per_s_per_cpu']} images/s per CPU", flush=True)  # fmt: skip
        if not a.no_e2e:
            for model in (vae, None):
                e = end_to_end([url], model, r, work)
                res["end_to_end"].append(e)
                print(f"[encoder] {r} px end to end, encoder={e['encoder']}: "
                      f"{e['images_per_s_per_actor']} images/s per actor (wall {e['wall_s']} s)",
                      flush=True)  # fmt: skip
    res["sd_encoder"] = sd_encoder_cost()
    print(f"[encoder] SD VAE encoder: {res['sd_encoder']}", flush=True)
    out = Path(a.out) if a.out else work / "encoder.json"
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"[encoder] results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
