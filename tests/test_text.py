"""Text embeddings (``text=clip|t5|sdxl|sd3|flux``): tiny random CLIP/T5 encoders saved into
tmp_path.

One run (a module fixture, K = 4 draws, two shards with repeated and absent captions) serves the
storage, loader and identity tests; the embeddings are compared with an independent transformers
computation (exact in float32), and the sdxl, sd3 and flux presets with the ``encode_prompt`` of
diffusers' StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline built from the
tiny text encoders and tokenizers (no transformer, VAE or scheduler: encode_prompt uses none).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.pins import check_description_pin
from shards import npy_bytes, write_tar

from jobs.bench.textmodels import make_clip, make_flux_root, make_sd3_root, make_sdxl_root, make_t5
from pipeline.consume.dataset import PrecomputedDataset
from pipeline.consume.recordsdir import RecordsDir
from pipeline.encode import text
from pipeline.output.manifest import OutputDir
from pipeline.output.text_store import TEXT_DIR, UNCOND
from pipeline.precompute import JobError, run

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red cat", "a blue dog on the sea", None, "a red cat",
            " ".join(["small"] * 30), "the sky"]  # fmt: skip
K = 4
# sha256 of the process description of each job's files and manifest (tests/fixtures/pins.py:
# tmp paths and the NumPy version normalised, and the tiny encoders' file hashes and so the
# config hash, each checked first; every other field as written), computed by the code at
# commit 098a8ff. A change to any field fails the test that pins it.
DESCRIPTION_PINS = {
    "clip": "246b9dcb70f1650d985991b785cc4492eb9254ce0164e669b82962e7ff5b861d",
    "sd3": "a44f96e2fb55423a41510aff7fcd7b2f1a0cdc6cb798c4ff2a7678d1796e02f4",
}


def write_captioned(path, seed: int, captions=CAPTIONS) -> dict[str, str | None]:
    rng = np.random.default_rng(seed)
    members, out = [], {}
    for i, cap in enumerate(captions):
        key = f"s{seed}_{i:03d}"
        members.append((f"{key}.npy", npy_bytes(rng.standard_normal((2, 4, 4)).astype("f4"))))
        if cap is not None:
            members.append((f"{key}.txt", cap.encode()))
        out[key] = cap
    write_tar(path, members)
    return out


def reference(folder, captions, output="last", max_length=16, tokenizer=None):
    """Independent transformers computation of one encoder's outputs (float32)."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer or folder)
    arch = transformers.AutoConfig.from_pretrained(folder).architectures[0]
    model = getattr(transformers, arch).from_pretrained(folder).eval()
    ids = tok(["" if c is None else c for c in captions], padding="max_length",
              max_length=max_length, truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return {"last": out.last_hidden_state, "penultimate": out.hidden_states[-2],
            "pooled": getattr(out, "pooler_output", None)}[output].numpy()  # fmt: skip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, clip_dir, ray_session):
    from pipeline.run.config import compose

    root = tmp_path_factory.mktemp("textrun")
    caps = {**write_captioned(root / "a-0.tar", 0), **write_captioned(root / "a-1.tar", 1)}
    cfg = compose([
        "progress=false", "source=arrays", f"source.urls=[{root}/a-0.tar,{root}/a-1.tar]",
        f"output.dir={root}/out", "output.dtype=float32", f"sampling.draws_per_sample={K}",
        "text=clip", f"text.model={clip_dir}", "text.encoders.0.max_length=16", "ray.num_actors=1",
    ])  # fmt: skip
    report = run(cfg)
    return root / "out", caps, report, cfg


def test_the_process_description_is_pinned(clip_run, clip_dir):
    """The description of clip_run's files and manifest (DESCRIPTION_PINS);
    test_sd3_preset_end_to_end pins three encoders'."""
    out, _, _, cfg = clip_run
    check_description_pin(out, DESCRIPTION_PINS["clip"], {"tmp": out.parent, "clip": clip_dir}, cfg)


def test_config_problems_are_named(make_cfg, clip_dir):
    base = ["source.urls=x.tar", "output.dir=o", "text=clip", f"text.model={clip_dir}"]
    cfg = make_cfg(*base, "source.keep=[cls]")
    assert any("text.caption_key" in k for k, _ in text.problems(cfg))
    cfg = make_cfg(*base, "text.encoders.0.output=[last,penultimate]")
    assert any("pick one" in m for _, m in text.problems(cfg))
    assert text.problems(make_cfg(*base)) == []
    t5 = make_cfg("source.urls=x.tar", "output.dir=o", "text=t5", f"text.model={clip_dir}",
                  "text.encoders.0.max_length=16")  # fmt: skip
    d = text.describe_text(t5)  # a CLIP folder with the t5 preset: its class is recorded
    assert d["encoders"][0]["class"] == "transformers.CLIPTextModel"


def test_embeddings_match_transformers_exactly_once_per_sample(clip_run, clip_dir):
    out, caps, report, _ = clip_run
    ds = PrecomputedDataset(out, shuffle=False)
    seen: dict[str, list] = {}
    for rec in ds:
        seen.setdefault(rec["key"], []).append(rec)
    assert sorted(seen) == sorted(caps) and all(len(v) == K for v in seen.values())
    keys = sorted(caps)
    want_h = reference(clip_dir, [caps[k] for k in keys])
    want_p = reference(clip_dir, [caps[k] for k in keys], "pooled")
    for i, k in enumerate(keys):
        for rec in seen[k]:  # every draw carries its sample's embedding, bit-equal (float32)
            assert np.array_equal(rec["clip_hidden"].numpy(), want_h[i])
            assert np.array_equal(rec["clip_pooled"].numpy(), want_p[i])
            assert bool(rec["caption_null"]) == (caps[k] is None)
    # stored once per sample: the text tables have one row per sample, not per draw
    o = OutputDir(str(out))
    rows = sum(pq.read_metadata(o.path(n)).num_rows for n in o.list(TEXT_DIR) if "_uncond" not in n)
    assert rows == len(caps) and ds.num_records == K * len(caps)
    # absent caption = the empty prompt's embedding, also stored once as the unconditional one
    unc = ds.unconditional()
    null_key = next(k for k in keys if caps[k] is None)
    assert np.array_equal(unc["clip_hidden"].numpy(), seen[null_key][0]["clip_hidden"].numpy())
    assert np.array_equal(unc["clip_hidden"].numpy(), reference(clip_dir, [""])[0])


def test_hf_dataset_and_export_carry_the_text_columns(clip_run, tmp_path):
    """to_hf_dataset and export_hf_parquet join each record's text embedding columns from
    _text/ (they used to lack them): equal to the loader's record by record, read back by
    datasets with their shapes (hidden Array2D [L, D]; pooled and mask fixed-length lists)."""
    datasets = pytest.importorskip("datasets")
    from pipeline.consume.hf import export_hf_parquet, to_hf_dataset

    out = clip_run[0]
    want = {(r["key"], int(r["draw"])): r for r in PrecomputedDataset(out, shuffle=False)}
    cols = ["caption_null", "clip_hidden", "clip_pooled", "clip_mask"]
    L, D = want[next(iter(want))]["clip_hidden"].shape

    def same(rows) -> None:
        assert len(rows["key"]) == len(want) == 2 * 6 * K
        for i, (key, draw) in enumerate(zip(rows["key"], rows["draw"])):
            rec = want[(key, int(draw))]
            for c in cols:
                assert np.array_equal(np.asarray(rows[c][i]), rec[c].numpy()), (key, c)

    ds = to_hf_dataset(out, cache_dir=str(tmp_path / "hf"))
    assert ds.column_names[-4:] == cols
    assert ds.features["clip_hidden"] == datasets.Array2D(shape=(L, D), dtype="float32")
    assert ds.features["clip_mask"] == datasets.List(datasets.Value("int8"), length=L)
    same(ds.with_format("numpy")[:])
    sub = to_hf_dataset(out, columns=["key", "draw", "clip_pooled"], cache_dir=str(tmp_path / "hf"))
    assert sub.column_names == ["key", "draw", "clip_pooled"]  # the join's index not added
    written = export_hf_parquet(out, tmp_path / "export")
    assert written == ["a-0.parquet", "a-1.parquet"]
    back = datasets.load_dataset("parquet", data_files=f"{tmp_path}/export/*.parquet",
                                 split="train", cache_dir=str(tmp_path / "hf2"))  # fmt: skip
    assert back.features == ds.features
    same(back.with_format("numpy")[:])


def test_truncation_and_dedup_are_counted(clip_run):
    out, caps, report, _ = clip_run
    o = OutputDir(str(out))
    stats = [o.read_json(f"_shards/{s}.json")["text"] for s in ("a-0", "a-1")]
    for s in stats:  # 6 captions, 5 distinct ("a red cat" twice), one absent, one of 32 tokens
        assert s["captions"] == 6 and s["encoded"] == 5 and s["null"] == 1
        assert s["truncated"]["clip"] == [1, 32 - 16]


def test_loader_exactly_once_over_ranks_and_workers(clip_run, clip_dir):
    out, caps, _, _ = clip_run
    got = []
    for rank in range(2):
        ds = PrecomputedDataset(out, columns=["key", "draw", "clip_pooled"], rank=rank,
                                world_size=2, seed=3)  # fmt: skip
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        got += [(r["key"], r["draw"], r["clip_pooled"]) for r in loader]
    assert sorted((k, d) for k, d, _ in got) == sorted((k, d) for k in caps for d in range(K))
    keys = sorted(caps)
    want = dict(zip(keys, reference(clip_dir, [caps[k] for k in keys], "pooled")))
    for k, _, p in got:  # every draw carries its own sample's embedding
        assert np.array_equal(p.numpy(), want[k]), k
    batched = PrecomputedDataset(out, columns=["key", "clip_hidden", "clip_mask"], batch_size=5,
                                 dtype=torch.float16)  # fmt: skip
    b = next(iter(batched))
    assert b["clip_hidden"].dtype == torch.float16 and b["clip_mask"].dtype == torch.int8


def test_other_tokenizer_or_encoder_refused(clip_run, clip_dir, tmp_path):
    """Another tokenizer (one value of tokenizer_config.json changed) into the output dir: the
    command line exits 2 before Ray starts, naming both; the directory is left as it was. Other
    weights: refused too."""
    import os
    import subprocess
    import sys

    out, _, _, cfg = clip_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = shutil.copytree(clip_dir, tmp_path / "clip2")
    tok = other / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace('"model_max_length": 16', '"model_max_length": 17'))
    args = ["progress=false", "source=arrays", f"source.urls=[{','.join(cfg.source.urls)}]",
            f"output.dir={out}", "output.dtype=float32", f"sampling.draws_per_sample={K}",
            "text=clip", f"text.model={other}", "text.encoders.0.max_length=16"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HYDRA_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    res = subprocess.run([sys.executable, "-m", "pipeline.precompute", *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "holds records of another config" in res.stderr and "text: clip" in res.stderr
    assert "tokenizer" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    weights = shutil.copytree(clip_dir, tmp_path / "clip3")
    make_clip(weights, seed=5)  # same shapes, other values
    cfg2 = cfg.copy()
    cfg2.text.model = str(weights)
    with pytest.raises(JobError, match="text: clip"):
        run(cfg2)
    assert OutputDir(str(out)).exists(UNCOND)


def _change_one_value(path) -> None:
    """Scale one stored clip_hidden value in place: the file keeps its size (no compression)."""
    from pipeline.output.records import tensor_to_numpy

    value = tensor_to_numpy(pq.read_table(path, columns=["clip_hidden"]).column(0))[0, 1, 2]
    data = bytearray(path.read_bytes())
    at = data.find(np.float32(value).tobytes())
    assert at > 0
    data[at : at + 4] = np.float32(value * 1.5).tobytes()
    path.write_bytes(bytes(data))


def test_text_tables_are_under_the_commit_checksums(clip_run, tmp_path):
    """A text table changed in place (same size), one deleted and one of no shard: the
    validator's completeness names each; resume redoes exactly the two shards whose tables
    differ from their markers and the tables come back bit-equal."""
    from pipeline.validate import load_config
    from pipeline.validate import run as validate

    out, _, _, cfg = clip_run
    d = shutil.copytree(out, tmp_path / "d")
    o = OutputDir(str(d))
    marker = o.read_json("_shards/a-0.json")
    side = marker["side_files"]["_text/a-0.parquet"]
    assert side["checksum"] == o.checksum("_text/a-0.parquet")
    assert side["bytes"] == o.size("_text/a-0.parquet")
    original = {n: (d / n).read_bytes() for n in ("_text/a-0.parquet", "_text/a-1.parquet")}
    _change_one_value(d / "_text/a-0.parquet")
    (d / "_text/a-1.parquet").unlink()
    shutil.copy(d / "_text/a-0.parquet", d / "_text/zz.parquet")
    report = validate(load_config([f"output.dir={d}", "plots=false", "progress=false",
                                   "executor=local", "workers=1", "text_recheck=0"]))  # fmt: skip
    check = next(c for c in report["checks"] if c["name"] == "completeness")
    items = {i["quantity"]: i for i in check["detail"]["items"]}
    assert not check["passed"]
    changed = items["files changed since their commit"]
    assert changed["value"] == 1 and "_text/a-0.parquet" in changed["examples"][0]
    assert "checksum" in changed["examples"][0]
    missing = items["missing files"]
    assert missing["value"] == 1 and "_text/a-1.parquet" in missing["examples"][0]
    stray = items["files not in the manifest"]
    assert stray["value"] == 1 and "_text/zz.parquet" in stray["examples"][0]
    # resume: both shards redone (their tables fail their markers), the tables are as before
    (d / "_text/zz.parquet").unlink()
    cfg2 = cfg.copy()
    cfg2.output.dir = str(d)
    rerun = run(cfg2)
    assert rerun["exit_code"] == 0
    for name, data in original.items():
        assert (d / name).read_bytes() == data, name
    o = OutputDir(str(d))
    for sid in ("a-0", "a-1"):
        side = o.read_json(f"_shards/{sid}.json")["side_files"][f"_text/{sid}.parquet"]
        assert side["checksum"] == o.checksum(f"_text/{sid}.parquet")


def _flip_one_bit(path) -> None:
    """Flip the lowest bit of one stored clip_hidden value in place (a relative change of
    ~1e-7: the file keeps its size and parses, the value is within any re-encoding tolerance)."""
    from pipeline.output.records import tensor_to_numpy

    value = tensor_to_numpy(pq.read_table(path, columns=["clip_hidden"]).column(0))[0, 1, 2]
    data = bytearray(path.read_bytes())
    at = data.find(np.float32(value).tobytes())
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_empty_prompt_table_is_under_the_manifest_checksum(clip_run, tmp_path, caplog):
    """_text/_uncond.parquet belongs to no shard (every actor writes it at setup when absent):
    its size and sha256 are the manifest's side_files. One bit flipped in one of its values
    fails the validator's completeness, naming it; resume removes it and starts an actor for it
    (no shard is left to do), which writes it again bit-equal, and the manifest records it."""
    import logging

    from pipeline.validate import load_config
    from pipeline.validate import run as validate

    out, _, _, cfg = clip_run
    d = shutil.copytree(out, tmp_path / "d")
    o = OutputDir(str(d))
    entry = {"bytes": o.size(UNCOND), "checksum": o.checksum(UNCOND)}
    assert o.read_json("_manifest.json")["side_files"] == {UNCOND: entry}
    original = (d / UNCOND).read_bytes()
    _flip_one_bit(d / UNCOND)
    assert (d / UNCOND).stat().st_size == entry["bytes"]
    report = validate(load_config([f"output.dir={d}", "plots=false", "progress=false",
                                   "executor=local", "workers=1", "text_recheck=0"]))  # fmt: skip
    check = next(c for c in report["checks"] if c["name"] == "completeness")
    bad = {i["quantity"]: i for i in check["detail"]["items"] if not i["passed"]}
    assert set(bad) == {"files changed since their commit"}
    (example,) = bad["files changed since their commit"]["examples"]
    assert example.startswith(f"{d}/{UNCOND}: ") and "the manifest's side_files" in example
    cfg2 = cfg.copy()
    cfg2.output.dir = str(d)
    with caplog.at_level(logging.WARNING, logger="pipeline.output.resume"):
        rerun = run(cfg2)
    assert rerun["exit_code"] == 0 and rerun["resumed_samples"] == rerun["totals"]["samples"]
    assert any(f"{d}/{UNCOND} is written again" in r.getMessage() for r in caplog.records)
    assert (d / UNCOND).read_bytes() == original
    assert o.read_json("_manifest.json")["side_files"] == {UNCOND: entry}


class _Sample:
    def __init__(self, i, caption):
        self.key, self.index, self.cond = f"k{i}", i, {"txt": caption}


def stage_outputs(make_cfg, preset: str, root, *overrides: str):
    """(the preset's assembled tensors for PROMPTS, and for the empty prompt) from TextStage."""
    from pipeline.encode.text_encode import TextStage

    # text.batch_size=2 = len(PROMPTS): the forward passes have diffusers' batch shape, so the
    # GEMMs round alike and float32 results are bit-equal
    cfg = make_cfg("source.urls=x.tar", "output.dir=o", "output.dtype=float32", f"text={preset}",
                   f"text.model={root}", "text.batch_size=2", *overrides)  # fmt: skip
    stage = TextStage(text.describe_text(cfg))
    stage.setup(torch.device("cpu"))
    cols, bad, _ = stage.embed([_Sample(i, c) for i, c in enumerate(PROMPTS)])
    assert not bad

    def assemble(cols, lead=()):
        emb = {k: torch.from_numpy(np.asarray(v)[lead]) for k, v in cols.items()
               if k.endswith(("_hidden", "_pooled"))}  # fmt: skip
        return text.assemble(preset, emb)

    return assemble(cols), assemble(stage.uncond_columns(), 0)


PROMPTS = ["a red cat", "a photo of a large tree in the dark"]


def test_sdxl_preset_matches_diffusers_encode_prompt(tmp_path, make_cfg):
    diffusers = pytest.importorskip("diffusers")
    root = make_sdxl_root(tmp_path / "sdxl")
    got, _ = stage_outputs(make_cfg, "sdxl", root, "text.encoders.0.max_length=16",
                           "text.encoders.1.max_length=16")  # fmt: skip
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder"),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(
            root / "text_encoder_2"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2"),
    )  # fmt: skip
    with torch.no_grad():  # as the pipeline's __call__ runs it (@torch.no_grad())
        pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu",
                                              do_classifier_free_guidance=False)  # fmt: skip
    assert got["prompt_embeds"].shape == (2, 16, 32 + 40)
    assert torch.equal(got["prompt_embeds"], pe)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)


def test_sd3_preset_matches_diffusers_encode_prompt(tmp_path, make_cfg):
    """prompt_embeds [B, 16 + 24, 80] (CLIP-L and CLIP-G penultimate states concatenated, zero
    padded to T5's width, then T5's last states), pooled_prompt_embeds [B, 24 + 28] (both
    projections), and the negative (empty prompt) pair against the stored unconditional row:
    all bit-equal in float32."""
    diffusers = pytest.importorskip("diffusers")
    root = make_sd3_root(tmp_path / "sd3")
    got, unc = stage_outputs(
        make_cfg,
        "sd3",
        root,
        "text.encoders.0.max_length=16",
        "text.encoders.1.max_length=16",
        "text.encoders.2.max_length=24",
    )
    load = transformers.AutoTokenizer.from_pretrained
    proj = transformers.CLIPTextModelWithProjection.from_pretrained
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=proj(root / "text_encoder"), tokenizer=load(root / "tokenizer"),
        text_encoder_2=proj(root / "text_encoder_2"), tokenizer_2=load(root / "tokenizer_2"),
        text_encoder_3=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_3"),
        tokenizer_3=load(root / "tokenizer_3"),
    )  # fmt: skip
    with torch.no_grad():  # as the pipeline's __call__ runs it (@torch.no_grad())
        pe, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
            max_sequence_length=24,
        )  # fmt: skip
    assert got["prompt_embeds"].shape == (2, 16 + 24, 80) == pe.shape
    assert got["pooled_prompt_embeds"].shape == (2, 24 + 28) == pooled.shape
    assert torch.equal(got["prompt_embeds"], pe)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)
    assert torch.count_nonzero(got["prompt_embeds"][:, :16, 72:]) == 0  # the zero padding
    # the stored unconditional embedding is the pipeline's negative prompt "" (CFG)
    assert torch.equal(unc["prompt_embeds"], neg[0])
    assert torch.equal(unc["pooled_prompt_embeds"], neg_pooled[0])


def test_flux_preset_matches_diffusers_encode_prompt(tmp_path, make_cfg):
    """prompt_embeds = T5's last states [B, 24, 48], pooled_prompt_embeds = CLIPTextModel's
    pooler output [B, 32]: bit-equal in float32."""
    diffusers = pytest.importorskip("diffusers")
    root = make_flux_root(tmp_path / "flux")
    got, _ = stage_outputs(make_cfg, "flux", root, "text.encoders.0.max_length=16",
                           "text.encoders.1.max_length=24")  # fmt: skip
    load = transformers.AutoTokenizer.from_pretrained
    pipe = diffusers.FluxPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=load(root / "tokenizer"),
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=load(root / "tokenizer_2"),
    )  # fmt: skip
    with torch.no_grad():  # as the pipeline's __call__ runs it (@torch.no_grad())
        pe, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=24)
    assert got["prompt_embeds"].shape == (2, 24, 48) == pe.shape
    assert got["pooled_prompt_embeds"].shape == (2, 32) == pooled.shape
    assert torch.equal(got["prompt_embeds"], pe)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)


def test_t5_encoder_matches_transformers(tmp_path, make_cfg):
    from pipeline.encode.text_encode import TextStage

    folder = make_t5(tmp_path / "t5")
    cfg = make_cfg("source.urls=x.tar", "output.dir=o", "output.dtype=float32", "text=t5",
                   f"text.model={folder}", "text.encoders.0.max_length=24")  # fmt: skip
    stage = TextStage(text.describe_text(cfg))
    stage.setup(torch.device("cpu"))
    caps = ["a red cat", None, "boat on the sea"]
    cols, _, _ = stage.embed([_Sample(i, c) for i, c in enumerate(caps)])
    assert np.array_equal(cols["t5_hidden"], reference(folder, caps, max_length=24))
    assert cols["t5_mask"][0].sum() == 4  # 3 words + EOS; padded positions kept (no mask passed)


def test_text_check_passes_and_catches_defects(clip_run, tmp_path):
    from pipeline.validate.checks.text import check_text

    out, caps, _, _ = clip_run
    copy = shutil.copytree(out, tmp_path / "copy")
    o = OutputDir(str(copy))
    meta = PrecomputedDataset(copy).metadata
    good = check_text(o, meta, ["a-0", "a-1"], recheck=4)
    assert good["passed"], good["problems"]
    f = good["figures"]
    assert f["samples"] == 12 and f["null_captions"] == 2 and f["distinct_captions"] == 5
    assert f["same_caption_mismatches"] == 0
    assert f["truncated"]["clip"] == {"captions": 2, "mean_tokens_cut": 16.0}
    assert f["recheck"]["max_relative_error"]["clip_hidden"] == 0.0  # float32, same device
    # a planted defect: one sample's embedding scaled in one shard's table
    name = o.path("_text/a-0.parquet")  # the first seen of each caption: re-encoded too
    table = pq.read_table(name)
    hidden = table.column("clip_hidden")
    from pipeline.output.records import tensor_array, tensor_to_numpy

    values = tensor_to_numpy(hidden).copy()
    values[0] *= 1.01
    table = table.set_column(table.schema.get_field_index("clip_hidden"), "clip_hidden",
                             tensor_array(values, hidden.type))  # fmt: skip
    pq.write_table(table, name)
    bad = check_text(o, meta, ["a-0", "a-1"], recheck=16)
    assert not bad["passed"]
    assert any("embeddings differ between" in p for p in bad["problems"])
    assert any("not this encoder's output" in p for p in bad["problems"])


def test_validator_runs_the_text_check(clip_run):
    from pipeline.validate import load_config
    from pipeline.validate import run as validate

    out = clip_run[0]
    report = validate(load_config([f"output.dir={out}", "plots=false", "progress=false",
                                   "executor=local", "workers=1", "text_recheck=2"]))  # fmt: skip
    check = next(c for c in report["checks"] if c["name"] == "text")
    assert check["passed"] and check["detail"]["null_captions"] == 2
    assert check["detail"]["recheck"]["captions"] == 2


# -- jobs/train --cond text (the example trainer) ------------------------------------------------

TRAIN_CAPTIONS = ["a red cat", "a blue dog", "a green bird", "a small tree", "a large house",
                  "a dark car", "a bright boat", "a man running"]  # fmt: skip


def write_text_blobs(path, seed: int, n: int) -> None:
    """n samples 1x4x4 whose intensity is fixed by their caption (one of 8, the level of
    jobs.train.synthetic.palette), times 0.5 + 0.5 x a random blob; 10% have no caption."""
    from jobs.train.synthetic import palette

    rng = np.random.default_rng(seed)
    levels = palette(len(TRAIN_CAPTIONS), 1)[:, 0]
    yy, xx = np.meshgrid(np.linspace(-1, 1, 4), np.linspace(-1, 1, 4), indexing="ij")
    members = []
    for i in range(n):
        k = int(rng.integers(len(TRAIN_CAPTIONS)))
        c = rng.uniform(-0.6, 0.6, 2)
        blob = np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / rng.uniform(0.2, 0.5) ** 2)
        x0 = (levels[k] * (0.5 + 0.5 * blob))[None].astype("f4")
        key = f"b{seed}_{i:05d}"
        members.append((f"{key}.npy", npy_bytes(x0)))
        if rng.random() >= 0.1:
            members.append((f"{key}.txt", TRAIN_CAPTIONS[k].encode()))
    write_tar(path, members)


@pytest.mark.slow
def test_train_example_cond_text(clip_dir, ray_session, tmp_path):
    """--cond text on records of the tiny CLIP where the caption determines the image: the
    held-out MSE given the caption's embedding is below that given the empty prompt's (same
    records, x_t, t, eps), by more than 2 standard errors; the null condition the model was
    trained with (caption dropout) is the stored unconditional embedding."""
    from jobs.train.checkpoint import load_checkpoint
    from jobs.train.data import text_column
    from jobs.train.loop import train
    from jobs.train.report import report
    from jobs.train.synthetic import make_synthetic_records
    from pipeline.run.config import compose

    for s in range(2):
        write_text_blobs(tmp_path / f"b-{s}.tar", s, 512)
    cfg = compose([
        "progress=false", "source=arrays", f"source.urls=[{tmp_path}/b-0.tar,{tmp_path}/b-1.tar]",
        f"output.dir={tmp_path}/out", "output.dtype=float32", "schedule.num_timesteps=100",
        "text=clip", f"text.model={clip_dir}", "text.encoders.0.max_length=16",
        "ray.num_actors=1",
    ])  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    m = train(tmp_path / "out", steps=60, out=tmp_path / "run", batch_size=64, lr=1e-2,
                 width=16, workers=0, quiet=True, threads=1, cond="text", samples=4)  # fmt: skip
    e = m["eval"]
    assert m["cond"]["embedding"] == "clip_pooled" and m["holdout"] == 0.1
    assert e["mse"] < e["zero_mse"]
    assert e["mse"] < e["mse_null"], (e["mse"], e["mse_null"])
    assert e["mse_gap"] > 2 * e["mse_gap_se"], e
    assert "given the empty prompt" in report(m)
    model, config = load_checkpoint(tmp_path / "run" / "model.safetensors")
    unc = PrecomputedDataset(tmp_path / "out").unconditional()["clip_pooled"]
    assert config["text_dim"] == 32 and torch.equal(model.null_text, unc.float())
    make_synthetic_records(tmp_path / "plain", 64, shape=(1, 4, 4), num_timesteps=100, files=1)
    with pytest.raises(ValueError, match="no text embeddings"):
        text_column(RecordsDir(tmp_path / "plain"))


def test_bench_storage_arithmetic_and_tiny_throughput(tmp_path):
    """jobs/bench/text.py: the per-sample bytes of the real presets follow from the column
    declaration (CLIP-L 77x768 float16 = 118272 B, T5-XXL 256x4096 = 2 MiB), and the in-process
    scenario encodes every distinct caption once."""
    from jobs.bench import text as bench

    st = bench.storage()
    clip = st["clip (CLIP-L)"]["columns"]
    assert clip["clip_hidden"] == {"shape": [77, 768], "bytes": 77 * 768 * 2}
    assert clip["clip_mask"]["bytes"] == 77 and clip["clip_pooled"]["bytes"] == 768 * 2
    t5 = st["t5 (T5-XXL, 256)"]
    assert t5["columns"]["t5_hidden"]["bytes"] == 256 * 4096 * 2 == 2 << 20
    assert t5["latent_bytes"] == 4 * 64 * 64 * 2 and t5["ratio_to_latent"] > 64
    assert set(st["sd3"]["columns"]) == {"clip_l_hidden", "clip_l_pooled", "clip_l_mask",
                                         "clip_g_hidden", "clip_g_pooled", "clip_g_mask",
                                         "t5_hidden", "t5_mask"}  # fmt: skip
    r = bench.in_process(tmp_path, "clip", 64, repeats=1)
    assert r["distinct"]["encoded"] == 64 and r["repeated_x8"]["encoded"] == 8
    assert r["distinct"]["captions_per_s"] > 0


def test_length_buckets_with_the_attention_mask(tmp_path, make_cfg):
    """T5 given the mask, length_bucket=8, max_length=24: captions are grouped by their padded
    length (8, 16 or 24 tokens) and the positions computed drop accordingly; every stored
    position below the bucket equals transformers' full-length masked computation (float32
    rounding), those beyond are zeros; a caption's bytes do not depend on its neighbours; the
    option is refused without the mask."""
    from pipeline.encode.text_encode import TextStage

    folder = make_t5(tmp_path / "t5")
    base = ["source.urls=x.tar", "output.dir=o", "output.dtype=float32", "text=t5",
            f"text.model={folder}", "text.encoders.0.max_length=24",
            "text.batch_size=4"]  # fmt: skip
    cfg = make_cfg(*base, "text.encoders.0.attention_mask=true", "text.encoders.0.length_bucket=8")
    meta = text.describe_text(cfg)
    assert meta["encoders"][0]["length_bucket"] == 8
    plain = text.describe_text(make_cfg(*base, "text.encoders.0.attention_mask=true"))
    assert "length_bucket" not in plain["encoders"][0]  # unset: the identity is unchanged
    caps = ["a red cat", " ".join(["small"] * 10), "boat on the sea", " ".join(["sky"] * 30)]
    stage = TextStage(meta)
    stage.setup(torch.device("cpu"))
    cols, _, _ = stage.embed([_Sample(i, c) for i, c in enumerate(caps)])
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.T5EncoderModel.from_pretrained(folder).eval()
    t = tok(caps, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = model(t.input_ids, attention_mask=t.attention_mask).last_hidden_state.numpy()
    got = cols["t5_hidden"]
    for i, n in enumerate([4, 11, 5, 31]):  # tokens incl. EOS; bucket = ceil to 8, <= 24
        b = min(-(-n // 8) * 8, 24)
        np.testing.assert_allclose(got[i, :b], want[i, :b], rtol=1e-5, atol=1e-5)
        assert not got[i, b:].any() and cols["t5_mask"][i].sum() == min(n, 24)
    enc = stage.encoders[0]
    before = enc.positions
    stage.start("other")
    alone = stage.embed([_Sample(0, caps[0])])[0]
    assert enc.positions - before == 4 * 8  # one pass of 4 rows x 8 tokens, not 24
    assert np.array_equal(alone["t5_hidden"][0], got[0])  # the same bytes with other neighbours
    bad = make_cfg(*base, "text.encoders.0.length_bucket=8")
    assert any("needs attention_mask" in m for _, m in text.problems(bad))


def test_a_non_finite_embedding_is_a_reject_with_its_reason(tmp_path, make_cfg):
    """A CLIP whose final layer norm is scaled by 1e6 overflows float16 storage: each sample
    becomes a reject naming the columns and the fix; with on_error=fail the first one raises."""
    from pipeline.encode.text_encode import TextStage
    from pipeline.read.source import Sample, SampleError
    from pipeline.run.stage import Batch

    folder = make_clip(tmp_path / "clip")
    model = transformers.CLIPTextModel.from_pretrained(folder)
    norm = next(p for n, p in model.named_parameters() if n.endswith("final_layer_norm.weight"))
    with torch.no_grad():
        norm.mul_(1e6)
    model.save_pretrained(folder, safe_serialization=True)
    cfg = make_cfg("source.urls=x.tar", "output.dir=o", "output.dtype=float16", "text=clip",
                   f"text.model={folder}", "text.encoders.0.max_length=16")  # fmt: skip
    meta = text.describe_text(cfg)
    samples = [Sample(f"k{i}", i, np.zeros((1, 2, 2), "f4"), cond={"txt": c})
               for i, c in enumerate(["a red cat", None])]  # fmt: skip
    stage = TextStage(meta)
    stage.setup(torch.device("cpu"))
    out = stage.process(Batch("s", samples))
    assert len(out) == 0 and [r["key"] for r in out.rejects] == ["k0", "k1"]
    assert "text embedding not finite (clip_hidden" in out.rejects[0]["reason"]
    assert "float32" in out.rejects[0]["reason"]
    strict = TextStage(meta, on_error="fail")
    strict.setup(torch.device("cpu"))
    with pytest.raises(SampleError, match="not finite"):
        strict.process(Batch("s", samples))


def test_sd3_preset_end_to_end(tmp_path, ray_session):
    """text=sd3 through the pipeline (three encoders, 16 + 16 + 24 tokens, K = 2): the loader's
    columns assemble into exactly what the in-process stage computes for the same captions
    (itself bit-equal to diffusers above), and the validator's text check passes."""
    from pipeline.encode.text_encode import TextStage
    from pipeline.run.config import compose
    from pipeline.validate import load_config
    from pipeline.validate import run as validate

    root = make_sd3_root(tmp_path / "sd3")
    caps = write_captioned(tmp_path / "a-0.tar", 0)
    lengths = ["text.encoders.0.max_length=16", "text.encoders.1.max_length=16",
               "text.encoders.2.max_length=24"]  # fmt: skip
    cfg = compose(["progress=false", "source=arrays", f"source.urls=[{tmp_path}/a-0.tar]",
                   f"output.dir={tmp_path}/out", "output.dtype=float32",
                   "sampling.draws_per_sample=2", "text=sd3", f"text.model={root}",
                   "ray.num_actors=1", *lengths])  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    check_description_pin(tmp_path / "out", DESCRIPTION_PINS["sd3"], {"tmp": tmp_path}, cfg)
    names = ["clip_l_hidden", "clip_l_pooled", "clip_g_hidden", "clip_g_pooled", "t5_hidden"]
    ds = PrecomputedDataset(tmp_path / "out", columns=["key", *names], shuffle=False)
    recs = list(ds)
    assert len(recs) == 2 * len(caps)
    stage = TextStage(text.describe_text(cfg))
    stage.setup(torch.device("cpu"))
    keys = sorted(caps)
    cols, _, _ = stage.embed([_Sample(i, caps[k]) for i, k in enumerate(keys)])
    want = text.assemble("sd3", {n: torch.from_numpy(cols[n]) for n in names})
    for r in recs:
        i = keys.index(r["key"])
        got = text.assemble("sd3", {n: r[n] for n in names})
        assert got["prompt_embeds"].shape == (16 + 24, 80)
        assert torch.equal(got["prompt_embeds"], want["prompt_embeds"][i])
        assert torch.equal(got["pooled_prompt_embeds"], want["pooled_prompt_embeds"][i])
    report = validate(load_config([f"output.dir={tmp_path}/out", "plots=false",
                                   "progress=false", "executor=local", "workers=1",
                                   "text_recheck=3"]))  # fmt: skip
    check = {c["name"]: c for c in report["checks"]}
    assert check["text"]["passed"] and check["completeness"]["passed"], check["text"]
