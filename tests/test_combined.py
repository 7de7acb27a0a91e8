"""The combined path of a text-to-image latent model trained with rectified flow at many aspect
ratios: ``encoder=vae text=clip schedule=flow`` (Flux's dynamic shift, logit-normal timesteps)
``source.buckets=auto`` with random crop and flip, K=2 draws, on captioned images of varied
aspect ratios. The validator passes every check; each bucket file's records are recomputed here
independently (x_t = (1 - sigma) x_0 + sigma eps, velocity = eps - x_0, sigma on the dynamic-shift
grid of the file's own sequence length, micro-conditioning against the images' sizes, the text
embedding against transformers'); the loader batches by bucket with the text joined."""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shards import encode_image, random_image, write_tar

from jobs.bench.encoder import tiny_vae
from jobs.bench.textmodels import WORDS, make_clip
from pipeline import validate
from pipeline.consume.dataset import PrecomputedDataset
from pipeline.output import records
from pipeline.output.text_store import to_numpy
from pipeline.precompute import run
from pipeline.run.config import compose

pytestmark = pytest.mark.usefixtures("ray_session")

# (width, height): aspects 1/3 .. 3, a square, an odd size
SIZES = [(64, 32), (32, 64), (48, 48), (80, 40), (40, 72), (96, 32), (33, 47)]


def _shards(tmp, n_shards=2, n=8) -> str:
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        members = []
        for i in range(n):
            key = f"s{s}k{i:03d}"
            w, h = SIZES[(i + s) % len(SIZES)]
            members.append((f"{key}.png", encode_image(random_image((w, h), seed=100 * s + i))))
            if i % 4 != 3:  # every 4th sample without a caption: the empty prompt
                members.append((f"{key}.txt", " ".join(rng.choice(WORDS, 5)).encode()))
        write_tar(tmp / f"c-{s}.tar", members)
    return f"source.urls={tmp}/c-{{0..{n_shards - 1}}}.tar"


def _images(tmp) -> dict:
    """key -> ((height, width), caption or None) read back from the shards."""
    out: dict = {}
    for path in sorted(tmp.glob("c-*.tar")):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                size, cap = out.get(key, (None, None))
                if ext == "png":
                    size = Image.open(io.BytesIO(data)).size[::-1]
                else:
                    cap = data.decode()
                out[key] = (size, cap)
    return out


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combined")
    vae = tiny_vae(tmp / "models")  # latent factor 2, 4 channels
    clip = make_clip(tmp / "models" / "clip")
    cfg = compose([
        "progress=false", _shards(tmp), f"output.dir={tmp}/o", "source=images",
        "source.resolution=48", "source.buckets=auto", "source.bucket_step=8",
        "source.crop=random", "source.flip=random", "encoder=vae", f"encoder.model={vae}",
        "text=clip", f"text.model={clip}", "text.encoders.0.max_length=16",
        "schedule=flow", "schedule.dynamic_shift=true", "sampling.timesteps=logit_normal",
        "sampling.draws_per_sample=2", "output.store_x0=true", "ray.num_actors=1",
    ])  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    return tmp, tmp / "o", clip


def test_the_validator_passes_every_check(combined, tmp_path):
    _, out, _ = combined
    cfg = validate.load_config([f"output.dir={out}", "progress=false", "plots=false",
                                f"output.report_dir={tmp_path}/rep"])  # fmt: skip
    report = validate.run(cfg)
    checks = {c["name"]: c for c in report["checks"]}
    # latent_scale warns on a random VAE (std far from 1): a warning, not a failure
    failed = {n: c["summary"] for n, c in checks.items() if not c["passed"]}
    assert not failed, failed
    assert report["summary"]["records"] == 32
    assert checks["text"]["statistic"] == 0 and checks["completeness"]["statistic"] == 0
    # every bucket file's marker entry has its checksum: no "older version" note
    notes = checks["completeness"]["detail"]["notes"]
    assert not any("no checksum" in n for n in notes), notes


def test_records_recomputed_independently(combined):
    tmp, out, clip = combined
    images = _images(tmp)
    files = sorted(out.glob("c-*.*x*.parquet"))
    assert len({f.name.split(".")[1] for f in files}) >= 4  # several buckets
    seq_lens = set()
    text = to_numpy(pq.read_table(out / "_text" / "c-0.parquet"))
    for f in files:
        pf = pq.ParquetFile(f)
        t = pf.read()
        sch = records.process_metadata(pf.schema_arrow)["schedule"]
        T = sch["num_timesteps"]
        H, W = (int(v) for v in f.name.split(".")[1].split("x"))
        C, h, w = records.file_shape(pf.schema_arrow)
        assert (C, h, w) == (4, H // 2, W // 2)
        # Flux's dynamic shift at this file's sequence length (patch 2), computed here
        n = (h // 2) * (w // 2)
        seq_lens.add(n)
        mu = sch["base_shift"] + (sch["max_shift"] - sch["base_shift"]) * (
            n - sch["base_seq_len"]) / (sch["max_seq_len"] - sch["base_seq_len"])  # fmt: skip
        s = np.arange(1, T + 1) / T
        grid = math.exp(mu) * s / (1 + (math.exp(mu) - 1) * s)
        sigma = t["sigma"].to_numpy().astype(np.float64)
        assert np.abs(grid[np.abs(grid[None] - sigma[:, None]).argmin(1)] - sigma).max() < 1e-7
        np.testing.assert_allclose(t["t"].to_numpy(), sigma * T, rtol=1e-6)
        x0, eps, xt, vel = (records.tensor_to_numpy(t[c]).astype(np.float64)
                            for c in ("x_0", "epsilon", "x_t", "velocity"))  # fmt: skip
        sg = sigma[:, None, None, None]
        np.testing.assert_allclose(xt, (1 - sg) * x0 + sg * eps, atol=4e-3)  # float16 storage
        np.testing.assert_allclose(vel, eps - x0, atol=4e-3)
        for key, osz, crop, tsz in zip(t["key"].to_pylist(), t["original_size"].to_pylist(),
                                       t["crop_top_left"].to_pylist(),
                                       t["target_size"].to_pylist()):  # fmt: skip
            (ih, iw), _ = images[key]
            assert list(osz) == [ih, iw] and list(tsz) == [H, W]
            scale = max(H / ih, W / iw)  # resized to cover the bucket, then cropped
            rh, rw = round(ih * scale), round(iw * scale)
            assert 0 <= crop[0] <= rh - H and 0 <= crop[1] <= rw - W
    assert len(seq_lens) >= 3  # buckets of different sequence lengths, each its own grid
    # text: the stored embedding of each of shard c-0's samples is transformers' own output
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(clip)
    model = transformers.CLIPTextModel.from_pretrained(clip).eval()
    caps = {k: c for k, ((_, _), c) in images.items() if k.startswith("s0")}
    keys = sorted(caps)
    prompts = ["" if caps[k] is None else caps[k] for k in keys]
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        ref = model(ids).last_hidden_state.numpy()
    index_of = {}
    for f in files:
        if f.name.startswith("c-0."):
            tb = pq.read_table(f, columns=["key", "index"]).to_pydict()
            index_of.update(zip(tb["key"], tb["index"]))
    row_of = {i: r for r, i in enumerate(text["index"].tolist())}
    stored = text["clip_hidden"]
    for j, k in enumerate(keys):
        got = stored[row_of[index_of[k]]].astype(np.float64)
        np.testing.assert_allclose(got, ref[j], rtol=2e-3, atol=2e-3 * np.abs(ref[j]).max())
        assert text["caption_null"][row_of[index_of[k]]] == (caps[k] is None)


def test_the_loader_batches_by_bucket_with_the_text_joined(combined):
    _, out, _ = combined
    ds = PrecomputedDataset(out, batch_size=3, columns=["x_t", "target_size", "clip_hidden",
                                                        "caption_null", "key"])  # fmt: skip
    seen: Counter = Counter()
    for b in ds:
        assert all([s // 2 for s in ts] == list(b["x_t"].shape[-2:])
                   for ts in b["target_size"].tolist())  # fmt: skip
        assert b["clip_hidden"].shape == (len(b["key"]), 16, 32)
        seen.update(b["key"])
    assert sum(seen.values()) == 32 and set(seen.values()) == {2}  # K=2: each sample twice


def test_a_max_length_beyond_the_models_positions_is_refused_at_start(tmp_path, make_cfg):
    """CLIP has max_position_embeddings absolute positions: text.encoders.0.max_length=77 (the
    preset's) on a 16-position model failed every shard with transformers' traceback in
    rejects.jsonl; it is refused on the driver naming the key and the limit."""
    from pipeline.encode.text import TextError, describe_text

    clip = make_clip(tmp_path / "clip")  # 16 positions
    with pytest.raises(TextError, match=r"text.encoders.0.max_length=77: .* 16 position"):
        describe_text(make_cfg("text=clip", f"text.model={clip}", f"output.dir={tmp_path}/o"))
    ok = make_cfg("text=clip", f"text.model={clip}", f"output.dir={tmp_path}/o",
                  "text.encoders.0.max_length=16")  # fmt: skip
    assert describe_text(ok)["encoders"][0]["max_length"] == 16
