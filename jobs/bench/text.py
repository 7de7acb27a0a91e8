"""Text encoders (``text=...``) on the CPU: captions/s per actor, bytes per sample of each column,
and the storage and FLOP arithmetic of the real encoders.

``python -m jobs.bench.text [--quick] [--workdir bench-out] [--out FILE.json]``

* **in-process, one torch thread** (one CPU per actor, the ``local`` default): each kind
  (``clip``, ``t5``, ``sdxl``, ``sd3``, ``flux``) with the tiny random encoders of
  :mod:`jobs.bench.textmodels` (what the tests use; no download),
  :class:`pipeline.encode.text_encode. TextStage` embedding batches of 64 samples whose captions are
  all distinct (random word sequences of 3-40 words: no cache hit, some truncated), best of
  ``--repeats``: captions/s, and with every caption repeated 8 times in a shard (class-label-like
  data: the per-shard cache). Model loading (verified bytes) is timed apart. And the tiny T5 given
  the attention mask at ``max_length=256``: every caption padded to 256 against
  ``length_bucket=16``.
* **end to end**: the pipeline (embedded Ray, one actor, one CPU) on the same arrays shards with
  ``text=none`` and ``text=clip``: the actor's own seconds per shard (the markers' ``seconds``),
  so the text stage's cost inside an actor; and the bytes per sample of each column of the text
  tables written (Parquet column chunks, uncompressed as written) against the records' bytes.
* **real encoders, arithmetic** (no weights: the models are built on torch's ``meta`` device from
  their published configs): parameters, bytes of the weights in bfloat16, FLOPs per caption
  (``torch.utils.flop_counter``) of CLIP-L, OpenCLIP bigG and T5-XXL's encoder; and the bytes per
  sample of the columns each preset stores (:func:`pipeline.encode.text.text_columns`, float16)
  against the latent of its image size (4x64x64, 4x128x128, 16x128x128 in float16).

The tiny encoders' numbers measure the pipeline around the model (tokenisation, cache, columns,
Parquet), not a real encoder's cost; the FLOPs are what docs/gpu.md's GPU estimates start from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .measure import ROOT, machine

KINDS = ("clip", "t5", "sdxl", "sd3", "flux")
BATCH = 64  # samples per worker batch (the config's batch_size default)
TINY_LENGTHS = {"clip": 16, "t5": 24}  # the tiny tokenizers' max lengths (model_max_length)

# Published configs of the real encoders (transformers config fields).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, vocab_size=49408,
              projection_dim=1280, hidden_act="gelu")  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
# preset -> [(name, hidden size, pooled size, max_length, outputs)] as pipeline/conf/text/*.yaml
REAL_PRESETS = {
    "clip (CLIP-L)": [("clip", 768, 768, 77, ["last", "pooled"])],
    "t5 (T5-XXL, 256)": [("t5", 4096, 0, 256, ["last"])],
    "sdxl": [("clip_l", 768, 768, 77, ["penultimate"]),
             ("clip_g", 1280, 1280, 77, ["penultimate", "pooled"])],
    "sd3": [("clip_l", 768, 768, 77, ["penultimate", "pooled"]),
            ("clip_g", 1280, 1280, 77, ["penultimate", "pooled"]),
            ("t5", 4096, 0, 256, ["last"])],
    "flux": [("clip_l", 768, 768, 77, ["pooled"]), ("t5", 4096, 0, 512, ["last"])],
}  # fmt: skip
# the latent each preset's model is trained on at its native size: (C, H, W), float16
LATENTS = {"clip (CLIP-L)": (4, 64, 64), "t5 (T5-XXL, 256)": (4, 64, 64), "sdxl": (4, 128, 128),
           "sd3": (16, 128, 128), "flux": (16, 128, 128)}  # fmt: skip


def tiny_model(models: Path, kind: str) -> Path:
    """The tiny encoder folder (or pipeline root) of ``kind`` (built once)."""
    from . import textmodels

    folder = models / f"text-{kind}"
    if not folder.exists():
        make = {"clip": textmodels.make_clip, "t5": textmodels.make_t5,
                "sdxl": textmodels.make_sdxl_root, "sd3": textmodels.make_sd3_root,
                "flux": textmodels.make_flux_root}[kind]  # fmt: skip
        make(folder)
    return folder


def length_overrides(kind: str) -> list[str]:
    """max_length overrides fitting the tiny tokenizers (16 CLIP positions, 24 for T5)."""
    from pipeline.run.config import compose

    encs = compose(["source.urls=x", "output.dir=x", f"text={kind}", "text.model=x"]).text.encoders
    return [f"text.encoders.{i}.max_length={TINY_LENGTHS['t5' if e.name == 't5' else 'clip']}"
            for i, e in enumerate(encs)]  # fmt: skip


def captions(n: int, seed: int = 0, repeat: int = 1) -> list[str]:
    """``n`` captions of 3-40 words of the tiny vocabulary; ``repeat``: each distinct caption
    occurs that many times (shuffled)."""
    import numpy as np

    from .textmodels import WORDS

    rng = np.random.default_rng(seed)
    distinct = [" ".join(rng.choice(WORDS, rng.integers(3, 41))) for _ in range(-(-n // repeat))]
    out = [c for c in distinct for _ in range(repeat)][:n]
    rng.shuffle(out)
    return out


class _Sample:
    def __init__(self, i: int, caption: str):
        self.key, self.index, self.cond = f"k{i:06d}", i, {"txt": caption}


def in_process(models: Path, kind: str, n: int, repeats: int, extra: tuple = ()) -> dict:
    """Captions/s of :class:`TextStage` on one thread (module docstring); ``extra``: more
    overrides (they replace the tiny max_length ones)."""
    import torch

    from pipeline.encode.text import describe_text
    from pipeline.encode.text_encode import TextStage
    from pipeline.run.config import compose

    torch.set_num_threads(1)
    lengths = [] if extra else length_overrides(kind)
    cfg = compose(["source.urls=x", "output.dir=x", f"text={kind}",
                   f"text.model={tiny_model(models, kind)}", *lengths, *extra])  # fmt: skip
    meta = describe_text(cfg)
    t0 = time.perf_counter()
    stage = TextStage(meta)
    stage.setup(torch.device("cpu"))
    load = time.perf_counter() - t0
    out = {"load_s": load, "batch_size": meta["batch_size"], "captions": n}
    for label, repeat in (("distinct", 1), ("repeated_x8", 8)):
        samples = [_Sample(i, c) for i, c in enumerate(captions(n, repeat=repeat))]
        best = float("inf")
        for _ in range(repeats):
            stage.start("bench")
            before = {e.meta["name"]: e.positions for e in stage.encoders}
            t0 = time.perf_counter()
            for lo in range(0, n, BATCH):
                stage.embed(samples[lo : lo + BATCH])
            best = min(best, time.perf_counter() - t0)
        stats = stage.stats()
        # token positions computed per caption of the shard (rows x padded length of the passes)
        positions = {e.meta["name"]: (e.positions - before[e.meta["name"]]) / n
                     for e in stage.encoders}  # fmt: skip
        out[label] = {"seconds": best, "captions_per_s": n / best, "encoded": stats["encoded"],
                      "truncated": stats["truncated"],
                      "positions_per_caption": positions}  # fmt: skip
    return out


def length_buckets(models: Path, n: int, repeats: int) -> dict:
    """The tiny T5 given the attention mask at max_length 256, every caption padded to 256
    against ``length_bucket=16``: captions/s and token positions computed."""
    base = ("text.encoders.0.max_length=256", "text.encoders.0.attention_mask=true")
    return {f"bucket_{b}": in_process(models, "t5", n, repeats,
                                      (*base, f"text.encoders.0.length_bucket={b}"))
            for b in (0, 16)}  # fmt: skip


def column_bytes(out_dir: Path) -> dict:
    """Bytes per sample of each column of the text tables (Parquet column chunks as written),
    and of the records (per record and per sample) of a finished output directory."""
    import pyarrow.parquet as pq

    def per_column(files):
        sizes, rows = {}, 0
        for f in files:
            meta = pq.read_metadata(f)
            rows += meta.num_rows
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    name = col.path_in_schema.split(".")[0]
                    sizes[name] = sizes.get(name, 0) + col.total_compressed_size
        return {k: v / max(rows, 1) for k, v in sizes.items()}, rows

    text_files = sorted(p for p in (out_dir / "_text").glob("*.parquet") if p.name[0] != "_")
    text, samples = per_column(text_files)
    records, n_records = per_column(sorted(out_dir.glob("*.parquet")))
    return {
        "samples": samples,
        "records": n_records,
        "text_columns_bytes_per_sample": text,
        "text_file_bytes_per_sample": sum(p.stat().st_size for p in text_files) / max(samples, 1),
        "records_bytes_per_record": sum(records.values()),
        "records_columns_bytes_per_record": records,
    }


def end_to_end(work: Path, models: Path, shards: int, per_shard: int, repeats: int) -> dict:
    """The pipeline on ``shards`` arrays shards with captions, text=none vs text=clip (one
    actor, one CPU, embedded Ray; alternated, best of ``repeats`` each): the actor's seconds
    (sum over shards) and the stored bytes."""
    import ray

    from pipeline.precompute import run
    from pipeline.run.config import compose

    urls = captioned_shards(work, shards, per_shard)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)  # fmt: skip
    out: dict = {}
    clip = ["text=clip", f"text.model={tiny_model(models, 'clip')}", *length_overrides("clip")]
    try:
        for kind in ("none", "clip") * repeats:  # alternated: both see the same machine state
            out_dir = work / f"text-e2e-{kind}"
            if out_dir.exists():
                import shutil

                shutil.rmtree(out_dir)
            cfg = compose(["progress=false", "source=arrays", f"source.urls=[{','.join(urls)}]",
                           f"output.dir={out_dir}", "ray.num_actors=1", "source.keep=[txt]",
                           *([] if kind == "none" else clip)])  # fmt: skip
            t0 = time.perf_counter()
            manifest = run(cfg)
            wall = time.perf_counter() - t0
            actor = sum(s["seconds"] for s in manifest["shards"].values())
            samples = manifest["totals"]["samples"]
            if kind in out and out[kind]["actor_s"] <= actor:
                continue  # best of the repeats
            out[kind] = {"wall_s": wall, "actor_s": actor, "samples": samples,
                         "samples_per_s_actor": samples / actor}  # fmt: skip
            if kind != "none":
                out[kind]["bytes"] = column_bytes(out_dir)
                out[kind]["text"] = [s.get("text") for s in manifest["shards"].values()]
    finally:
        ray.shutdown()
    return out


def captioned_shards(work: Path, shards: int, per_shard: int) -> list[str]:
    """Arrays shards (4x32x32 float32 latents) with a .txt caption per sample (distinct)."""
    import io
    import tarfile

    import numpy as np

    urls = []
    for s in range(shards):
        path = work / "text-shards" / f"cap-{per_shard}-{s}.tar"
        urls.append(str(path))
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(s)
        caps = captions(per_shard, seed=100 + s)
        with tarfile.open(path, "w") as tar:
            for i, c in enumerate(caps):
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((4, 32, 32)).astype("f4"))
                for name, data in ((f"{s}_{i:06d}.npy", buf.getvalue()),
                                   (f"{s}_{i:06d}.txt", c.encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return urls


def real_encoders() -> dict:
    """Parameters, bfloat16 weight bytes and FLOPs per caption of the real encoders, built on
    the meta device (no memory, no weights) and counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = {}
    for name, cls, config, length in (
        ("CLIP-L (77 tokens)", CLIPTextModelWithProjection, CLIPTextConfig(**CLIP_L), 77),
        ("OpenCLIP bigG (77 tokens)", CLIPTextModelWithProjection, CLIPTextConfig(**CLIP_G), 77),
        ("T5-XXL encoder (256 tokens)", T5EncoderModel, T5Config(**T5_XXL), 256),
        ("T5-XXL encoder (512 tokens)", T5EncoderModel, T5Config(**T5_XXL), 512),
    ):
        with torch.device("meta"):
            model = cls(config).eval()
            ids = torch.zeros((1, length), dtype=torch.long)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(ids, output_hidden_states=True)
        params = sum(p.numel() for p in model.parameters())
        out[name] = {"parameters": params, "bf16_weight_bytes": 2 * params,
                     "flops_per_caption": counter.get_total_flops()}  # fmt: skip
    return out


def storage() -> dict:
    """Bytes per sample of each preset's columns in float16 (pipeline.encode.text.text_columns) and
    of the latent of its native image size, and their ratio."""
    import numpy as np

    from pipeline.encode.text import text_columns

    out = {}
    for preset, encs in REAL_PRESETS.items():
        meta = {"encoders": [{"name": n, "hidden_size": h, "pooled_size": p, "max_length": L,
                              "output": o} for n, h, p, L, o in encs]}  # fmt: skip
        cols = {}
        for col, dtype, shape in text_columns(meta):
            if shape is None:
                continue
            item = 2 if dtype == "store" else 1  # float16 tensors, int8 masks
            cols[col] = {"shape": list(shape), "bytes": int(np.prod(shape)) * item}
        latent = LATENTS[preset]
        latent_bytes = int(np.prod(latent)) * 2
        total = sum(c["bytes"] for c in cols.values())
        out[preset] = {"columns": cols, "bytes_per_sample": total, "latent": list(latent),
                       "latent_bytes": latent_bytes,
                       "ratio_to_latent": total / latent_bytes}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer captions and shards")
    p.add_argument("--workdir", default=str(ROOT / "bench-out"), help="models, shards, outputs")
    p.add_argument("--out", default=str(ROOT / "jobs/bench/results/text.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end pipeline runs")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    n = 128 if args.quick else 512
    result = {"command": "python -m jobs.bench.text" + (" --quick" if args.quick else ""),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}  # fmt: skip
    result["in_process"] = {k: in_process(models, k, n, args.repeats) for k in KINDS}
    for k, r in result["in_process"].items():
        print(f"{k:5s}: {r['distinct']['captions_per_s']:7.1f} captions/s distinct, "
              f"{r['repeated_x8']['captions_per_s']:7.1f} with each caption 8x; "
              f"load {r['load_s']:.2f} s")  # fmt: skip
    result["length_buckets"] = length_buckets(models, n, args.repeats)
    for k, r in result["length_buckets"].items():
        d = r["distinct"]
        print(f"t5 masked, max_length 256, {k}: {d['captions_per_s']:.1f} captions/s distinct, "
              f"{d['positions_per_caption']['t5']:.1f} positions per caption")  # fmt: skip
    if not args.no_e2e:
        shards, per = (2, 128) if args.quick else (4, 512)
        result["end_to_end"] = end_to_end(work, models, shards, per, args.repeats)
        for k, r in result["end_to_end"].items():
            print(f"end to end text={k}: {r['samples_per_s_actor']:.1f} samples/s per actor "
                  f"({r['samples']} samples, actor {r['actor_s']:.2f} s)")  # fmt: skip
        b = result["end_to_end"]["clip"]["bytes"]
        print(f"tiny clip text table: {b['text_file_bytes_per_sample']:.0f} B/sample "
              f"(records {b['records_bytes_per_record']:.0f} B/record)")  # fmt: skip
        for col, v in sorted(b["text_columns_bytes_per_sample"].items()):
            print(f"  {col:14s} {v:8.1f} B/sample")
    result["real_encoders"] = real_encoders()
    for k, r in result["real_encoders"].items():
        print(f"{k:28s} {r['parameters'] / 1e6:7.1f} M params, "
              f"{r['bf16_weight_bytes'] / 2**30:5.2f} GiB bf16, "
              f"{r['flops_per_caption'] / 1e9:8.1f} GFLOP/caption")  # fmt: skip
    result["storage"] = storage()
    for k, r in result["storage"].items():
        print(f"{k:18s} {r['bytes_per_sample'] / 1024:8.1f} KiB/sample text vs latent "
              f"{'x'.join(map(str, r['latent']))} {r['latent_bytes'] / 1024:6.1f} KiB: "
              f"{r['ratio_to_latent']:.2f}x")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
