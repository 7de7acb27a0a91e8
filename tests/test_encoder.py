"""Latent records (``encoder=vae``): a tiny random diffusers AutoencoderKL saved into tmp_path.

No network, no GPU: the VAE has two blocks (downsampling factor 2, so nothing may assume 8),
8/16 channels and 4 latent channels; its config sets scaling_factor=0.5 and shift_factor=0.1 so
that both are read from config.json and applied. Ray runs share the session's local Ray (2 CPUs,
2 fake GPUs); the runs are module fixtures reused by several tests (each run's actors import
diffusers, which costs seconds).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.records import read_records
from fixtures.runner import run_python
from shards import npy_bytes, write_image_shard, write_tar

from jobs.bench import encoder as bench_encoder
from pipeline.encode import encoder, modelfiles
from pipeline.encode.encoder import EncoderError, describe_encoder, latent_shape
from pipeline.noising.noise import KeyedNoise
from pipeline.output import records
from pipeline.output.manifest import OutputDir
from pipeline.precompute import JobError, dataset_metadata, run, sample_shape
from pipeline.read.decoders import ImageDecoder
from pipeline.read.source import iter_shard
from pipeline.run.config import config_hash, process_config

diffusers = pytest.importorskip("diffusers")

SCALE, SHIFT = 0.5, 0.1
TINY = {**bench_encoder.TINY, "scaling_factor": SCALE, "shift_factor": SHIFT}  # the bench's VAE
HUGE = 1e30  # a finite pixel value whose GroupNorm variance overflows float32: NaN latent


def make_vae(folder, seed: int = 0, safe: bool = True, **kw):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**{**TINY, **kw})
    vae.save_pretrained(folder, safe_serialization=safe)
    return folder


def load_vae(folder):
    return diffusers.AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae(tmp_path_factory.mktemp("models") / "vae")


def pixel_arrays(n: int, seed: int, shape=(3, 16, 16)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"k{seed}_{i:04d}": rng.uniform(-1, 1, shape).astype(np.float32) for i in range(n)}


def write_pixels(path, arrays: dict[str, np.ndarray]) -> None:
    write_tar(path, [(f"{k}.npy", npy_bytes(a)) for k, a in arrays.items()])


def vae_cfg(make_cfg, vae_dir, *overrides):
    return make_cfg("encoder=vae", f"encoder.model={vae_dir}", *overrides)


# -- identity, shape, refusal of unsafe folders (no Ray) -----------------------------------------


def test_latent_shape_comes_from_the_config_never_8():
    tiny = {"in_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16]}
    assert latent_shape(tiny, [3, 32, 32]) == [4, 16, 16]
    sd = {"in_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512]}
    assert latent_shape(sd, [3, 256, 256]) == [4, 32, 32]
    flux = {**sd, "latent_channels": 16}
    assert latent_shape(flux, [3, 512, 512]) == [16, 64, 64]
    with pytest.raises(EncoderError, match=r"3-channel input .* source gives 1 channels"):
        latent_shape(tiny, [1, 32, 32])
    with pytest.raises(EncoderError, match="not a multiple of the VAE's downsampling factor 8"):
        latent_shape(sd, [3, 100, 100])


def test_identity_hashes_config_and_weights(vae_dir, make_cfg):
    cfg = vae_cfg(make_cfg, vae_dir, "source.urls=x.tar", "output.dir=o", "source.resolution=32")
    d = describe_encoder(cfg).describe()
    weights = (vae_dir / encoder.WEIGHTS_NAME).read_bytes()
    assert d["weights_sha256"] == {encoder.WEIGHTS_NAME: hashlib.sha256(weights).hexdigest()}
    assert d["config_sha256"] == hashlib.sha256((vae_dir / "config.json").read_bytes()).hexdigest()
    assert (d["scaling_factor"], d["shift_factor"]) == (SCALE, SHIFT)  # from config.json
    assert d["class"] == "diffusers.AutoencoderKL" and d["location"] == "local"
    assert d["downsampling_factor"] == 2 and d["latent_channels"] == 4
    assert d["input"] == {"kind": "images", "resolution": 32, "crop": "center"}
    assert sample_shape(cfg, []) == [4, 16, 16]
    # an override wins over config.json, and changes the config hash
    other = vae_cfg(make_cfg, vae_dir, "source.urls=x.tar", "output.dir=o", "source.resolution=32",
                    "encoder.scaling_factor=0.18215")  # fmt: skip
    assert describe_encoder(other).scaling_factor == 0.18215
    assert config_hash(other) != config_hash(cfg)
    # the same files in another folder are the same model: same hash (the path is recorded)
    copy = shutil.copytree(vae_dir, vae_dir.parent / "copy-of-vae")
    moved = vae_cfg(make_cfg, copy, "source.urls=x.tar", "output.dir=o", "source.resolution=32")
    assert config_hash(moved) == config_hash(cfg)
    assert process_config(moved)["encoder"]["folder"] == str(copy)
    # the default (no encoder) config hash has no encoder entry: old datasets keep their hash
    assert "encoder" not in process_config(make_cfg("source.urls=x.tar", "output.dir=o"))


def test_pickled_weights_only_are_refused(tmp_path, make_cfg):
    folder = make_vae(tmp_path / "bin-vae", safe=False)
    assert (folder / "diffusion_pytorch_model.bin").exists()
    cfg = vae_cfg(make_cfg, folder, f"source.urls={tmp_path}/x.tar", f"output.dir={tmp_path}/o")
    with pytest.raises(EncoderError, match=r"diffusion_pytorch_model\.bin: pickled weights are "):
        run(cfg)
    with pytest.raises(EncoderError, match="save_pretrained"):  # the fix
        describe_encoder(cfg)


def test_folder_problems_are_named(tmp_path, make_cfg, vae_dir):
    def cfg(model, *more):
        return vae_cfg(make_cfg, model, "source.urls=x.tar", "output.dir=o", *more)

    with pytest.raises(EncoderError, match="no such folder, and not a Hugging Face Hub id"):
        describe_encoder(cfg(tmp_path / "nope"))
    pipe = tmp_path / "pipe"
    shutil.copytree(vae_dir, pipe / "vae")
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(EncoderError, match="set encoder.subfolder=vae"):
        describe_encoder(cfg(pipe))
    assert describe_encoder(cfg(pipe, "encoder.subfolder=vae")).folder.folder == str(pipe / "vae")
    with pytest.raises(ValueError, match="source.normalize"):
        run(cfg(vae_dir, "source.normalize=false"))
    with pytest.raises(ValueError, match="encoder.dtype"):
        run(cfg(vae_dir, "encoder.dtype=float64"))


def test_missing_diffusers_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name)
    )
    with pytest.raises(EncoderError, match=r"pip install diffusion-precompute\[vae\]"):
        encoder.require_diffusers()


def test_hub_id_resolves_through_snapshot_download(tmp_path, monkeypatch, vae_dir, make_cfg):
    """No network here: snapshot_download is replaced by a fake Hub cache snapshot."""
    import huggingface_hub

    calls = []
    snapshot = tmp_path / "hub" / "snapshots" / "0123abcd"
    shutil.copytree(vae_dir, snapshot / "vae")

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    modelfiles.hub_snapshot.cache_clear()
    try:
        cfg = make_cfg("encoder=vae", "encoder.model=acme/tiny-sd", "encoder.subfolder=vae",
                       "encoder.revision=main", "source.urls=x.tar", "output.dir=o")  # fmt: skip
        d = describe_encoder(cfg).describe()
        assert d["location"] == "hub" and d["resolved_revision"] == "0123abcd"
        assert d["folder"] == str(snapshot / "vae") and d["subfolder"] == "vae"
        repo, rev, patterns = calls[0]
        assert (repo, rev) == ("acme/tiny-sd", "main")
        assert "vae/config.json" in patterns and not any(p.endswith(".bin") for p in patterns)
        # an actor fetches the driver's commit, not the branch
        assert encoder.fetch_model(d) == str(snapshot / "vae")
        assert calls[-1][1] == "0123abcd"
    finally:
        modelfiles.hub_snapshot.cache_clear()


# -- records (Ray) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arrays_job(ray_session, tmp_path_factory, vae_dir):
    """3 shards of [3, 16, 16] pixel arrays (one sample of shard 0 makes a NaN latent), sampled
    latents, K=2, latent_mean/std stored, float32, one actor, batch_size=2."""
    from pipeline.run.config import compose

    tmp = tmp_path_factory.mktemp("arrays-job")
    inputs = {}
    for s in range(3):
        arrays = pixel_arrays(5 if s else 6, seed=s)
        if s == 0:
            arrays["k0_bad"] = np.full((3, 16, 16), HUGE, np.float32)
        write_pixels(tmp / f"lat-{s:02d}.tar", arrays)
        inputs[f"lat-{s:02d}"] = arrays
    urls = f"{tmp}/lat-{{00..02}}.tar"
    common = ["progress=false", "source=arrays", f"source.urls={urls}", "encoder=vae",
              f"encoder.model={vae_dir}", "encoder.store_dist=true", "encoder.batch_size=4",
              "sampling.draws_per_sample=2", "output.dtype=float32", "output.store_x0=true",
              "seed=11"]  # fmt: skip
    cfg = compose([*common, f"output.dir={tmp}/out", "ray.num_actors=1", "batch_size=2"])
    manifest = run(cfg)
    return {"tmp": tmp, "inputs": inputs, "manifest": manifest, "common": common, "cfg": cfg}


def test_sampled_latents_are_the_keyed_draw(arrays_job, vae_dir):
    m, inputs = arrays_job["manifest"], arrays_job["inputs"]
    assert m["exit_code"] == 0, m["shards"]
    files = read_records(arrays_job["tmp"] / "out")
    vae = load_vae(vae_dir)
    noise = KeyedNoise(11, 1000, draws=2)
    for name, cols in files.items():
        shard = name.removesuffix(".parquet")
        keys = [k for k in inputs[shard] if k != "k0_bad"]
        assert list(cols["key"][::2]) == keys
        assert cols["x_0"].shape == (2 * len(keys), 4, 8, 8)  # latent shape, factor 2
        x = torch.from_numpy(np.stack([inputs[shard][k] for k in keys]))
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        mean = np.repeat(((dist.mean - SHIFT) * SCALE).numpy(), 2, axis=0)
        std = np.repeat((dist.std * SCALE).numpy(), 2, axis=0)
        np.testing.assert_allclose(cols["latent_mean"], mean, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(cols["latent_std"], std, rtol=1e-5, atol=2e-6)
        n = noise.latent_noise(shard, keys, (4, 8, 8))
        assert np.array_equal(cols["x_0"], cols["latent_mean"] + cols["latent_std"] * n)
        assert not np.array_equal(cols["x_0"][0], cols["x_0"][1])  # each draw its own latent
        t, eps = noise.draw(shard, keys, range(len(keys)), (4, 8, 8))
        assert np.array_equal(cols["epsilon"], eps) and np.array_equal(cols["t"], t)
        assert abs(np.corrcoef(eps.ravel(), n.ravel())[0, 1]) < 0.05  # independent streams


def test_nonfinite_latent_is_rejected_and_counted(arrays_job):
    m = arrays_job["manifest"]
    assert m["totals"]["rejected"] == 1 and m["shards"]["lat-00"]["rejected"] == 1
    assert m["totals"]["samples"] == 17 and m["totals"]["records"] == 2 * 16
    out = OutputDir(str(arrays_job["tmp"] / "out"))
    (row,) = out.read_jsonl("rejects.jsonl")
    assert row["key"] == "k0_bad" and row["shard"] == "lat-00"
    assert row["reason"].startswith("latent not finite") and "1e+30" in row["reason"]


def test_identity_is_in_every_file_and_the_manifest(arrays_job, vae_dir):
    m = arrays_job["manifest"]
    sha = hashlib.sha256((vae_dir / encoder.WEIGHTS_NAME).read_bytes()).hexdigest()
    assert m["process"]["encoder"]["weights_sha256"] == {encoder.WEIGHTS_NAME: sha}
    assert m["process_config"]["encoder"]["model"] == str(vae_dir)
    assert m["process"]["shape"] == [4, 8, 8]
    for path in sorted((arrays_job["tmp"] / "out").glob("*.parquet")):
        meta = records.process_metadata(pq.read_schema(path))
        enc = meta["encoder"]
        assert enc["weights_sha256"][encoder.WEIGHTS_NAME] == sha
        assert enc["input_shape"] == [3, 16, 16] and enc["latent"] == "sample"
        assert (enc["scaling_factor"], enc["shift_factor"], enc["dtype"]) == (
            SCALE,
            SHIFT,
            "float32",
        )
        assert meta["shape"] == [4, 8, 8]


def test_records_do_not_depend_on_actors_batch_size_or_gpu_pinning(arrays_job, make_cfg):
    """Two actors, each pinned to its own (fake) GPU, batch_size 5 instead of one actor with
    batch_size 2: the same records, bit for bit (torch sees no CUDA: both on the CPU)."""
    tmp = arrays_job["tmp"]
    m = run(
        make_cfg(
            *arrays_job["common"][1:],
            f"output.dir={tmp}/out2",
            "ray.num_actors=2",
            "batch_size=5",
            "ray.gpus_per_actor=1",
            "ray.cpus_per_actor=0.5",
        )  # fmt: skip
    )
    assert m["exit_code"] == 0 and m["config_hash"] == arrays_job["manifest"]["config_hash"]
    workers = {e["worker"]["pid"]: tuple(e["worker"]["gpu_ids"]) for e in m["shards"].values()}
    assert all(len(g) == 1 for g in workers.values())
    assert len(set(workers.values())) == len(workers), "two actors shared a GPU"
    assert {e["worker"]["device"] for e in m["shards"].values()} == {"cpu"}
    names = sorted(p.name for p in (tmp / "out").glob("*.parquet"))
    assert names == sorted(p.name for p in (tmp / "out2").glob("*.parquet")) and len(names) == 3
    for name in names:  # every column, nulls included (conditioning columns)
        assert pq.read_table(tmp / "out" / name).equals(pq.read_table(tmp / "out2" / name)), name


def test_another_vae_into_the_same_dir_is_refused_naming_both(
    arrays_job, tmp_path, make_cfg, vae_dir
):
    other = make_vae(tmp_path / "other-vae", seed=1)
    out = tmp_path / "out"
    shutil.copytree(arrays_job["tmp"] / "out", out)
    common = [c for c in arrays_job["common"][1:] if not c.startswith("encoder.model=")]
    with pytest.raises(JobError) as err:
        run(make_cfg(*common, f"encoder.model={other}", f"output.dir={out}"))
    msg = str(err.value)
    assert "holds records of another config" in msg and "output.overwrite=true" in msg
    old_sha = arrays_job["manifest"]["process"]["encoder"]["weights_sha256"][encoder.WEIGHTS_NAME]
    new_sha = hashlib.sha256((other / encoder.WEIGHTS_NAME).read_bytes()).hexdigest()
    assert f"encoder: {arrays_job['manifest']['process_config']['encoder']['model']}" in msg
    assert f"-> {other} (weights sha256 {new_sha[:12]}" in msg and old_sha[:12] in msg
    # the same model, retrained in place (other weights under the same name): refused too
    same_name = shutil.copytree(vae_dir, tmp_path / "vae2")
    run_cfg = make_cfg(*common, f"encoder.model={same_name}", f"output.dir={out}")
    assert config_hash(run_cfg) == arrays_job["manifest"]["config_hash"]
    shutil.copy(other / encoder.WEIGHTS_NAME, same_name / encoder.WEIGHTS_NAME)
    with pytest.raises(JobError, match="weights sha256"):
        run(make_cfg(*common, f"encoder.model={same_name}", f"output.dir={out}"))
    # no encoder into a latent dir: refused, naming the old model
    with pytest.raises(JobError, match="-> no encoder"):
        run(make_cfg(*[c for c in common if not c.startswith("encoder")], f"output.dir={out}"))


def test_channel_mismatch_is_a_clear_error(tmp_path, vae_dir, make_cfg):
    write_pixels(tmp_path / "two-00.tar", pixel_arrays(2, seed=0, shape=(2, 16, 16)))
    cfg = vae_cfg(make_cfg, vae_dir, "source=arrays", f"source.urls={tmp_path}/two-00.tar",
                  f"output.dir={tmp_path}/out")  # fmt: skip
    with pytest.raises(JobError, match=r"the VAE takes 3-channel input .* gives 2 channels"):
        run(cfg)


def test_images_mean_mode_matches_an_independent_encode(ray_session, tmp_path, vae_dir, make_cfg):
    write_image_shard(tmp_path / "img-00.tar", 5, size=(40, 30), fmt="jpg")
    cfg = vae_cfg(make_cfg, vae_dir, f"source.urls={tmp_path}/img-00.tar",
                  f"output.dir={tmp_path}/out", "source.resolution=32", "encoder.latent=mean",
                  "output.dtype=float32", "output.store_x0=true", "batch_size=3")  # fmt: skip
    m = run(cfg)
    assert m["exit_code"] == 0 and m["totals"]["records"] == 5
    cols = read_records(tmp_path / "out")["img-00.parquet"]
    assert cols["x_t"].shape == (5, 4, 16, 16) and "latent_mean" not in cols
    pixels = [s.array for s in iter_shard(f"{tmp_path}/img-00.tar", ImageDecoder(32))]
    with torch.no_grad():
        dist = load_vae(vae_dir).encode(torch.from_numpy(np.stack(pixels))).latent_dist
    np.testing.assert_allclose(cols["x_0"], (dist.mean - SHIFT) * SCALE, rtol=1e-5, atol=2e-6)
    meta = dataset_metadata(cfg, [4, 16, 16], m["config_hash"])
    assert meta.encoder["input_shape"] == [3, 32, 32]
    assert json.loads(json.dumps(meta.to_json())) == meta.to_json()  # as the Parquet footer needs


# -- validation: latent_scale ---------------------------------------------------------------------


def _figures(stds, means=None):
    """x0_figures-like figures: per channel, and the channels averaged (index C)."""
    means = means or [0.0] * len(stds)
    fig = {
        c: {"records": 100, "mean": m, "var": s * s} for c, (s, m) in enumerate(zip(stds, means))
    }
    fig[len(stds)] = {"records": 100, "mean": 0.0, "var": float(np.mean(np.square(stds)))}
    return fig


@pytest.mark.parametrize(
    "std, severity, words",
    [
        (1.0, "info", None),
        (5.5, "warning", "look unscaled"),
        (0.03, "warning", "scaled twice"),
    ],
)
def test_latent_scale_warns_naming_the_fix(std, severity, words):
    from pipeline.validate.checks.latent_scale import latent_scale_from_figures

    enc = {"scaling_factor": 0.5, "model": "m"}
    process = {"shape": [4, 8, 8], "encoder": enc, "store_x0": True}
    check = latent_scale_from_figures(_figures([std] * 4), process, "stored")
    if words:  # the std measured, the factor applied, the factor that gives std 1
        assert f"std(x_0) = {std:.4g} with factor 0.5 applied (encoder.scaling_factor)" in (
            check.summary
        ), check.summary
        assert f"encoder.scaling_factor={0.5 / std:.4g} would give std 1" in check.summary
        assert "scaling_factor=null" not in check.summary
    assert check.name == "latent_scale" and check.passed  # warnings only
    assert check.severity == severity and check.statistic == pytest.approx(std)
    assert [r["std"] for r in check.detail["per_channel"]] == pytest.approx([std] * 4)
    if words:
        assert words in check.summary and "encoder.scaling_factor" in check.summary
    arrays = latent_scale_from_figures(
        _figures([std] * 4), {"shape": [4, 8, 8], "source": {"kind": "arrays", "scale": 1.0}}, "s"
    )
    if words:
        assert "source.scale" in arrays.summary
    from pipeline.validate.checks.latent_scale import applies

    assert applies(process) and not applies({"source": {"kind": "images"}}, include_arrays=True)
    assert not applies({"source": {"kind": "arrays"}})  # the validator's default
    assert applies({"source": {"kind": "arrays"}}, include_arrays=True)


def test_latent_scale_on_real_records_matches_the_stored_x0(arrays_job):
    """The check on a scan of the encoder job's files: per-channel figures equal those of the
    stored x_0 column (no Ray: the shard scans run here)."""
    from pipeline.validate.checks.latent_scale import latent_scale
    from pipeline.validate.measures import DatasetStats
    from pipeline.validate.plan import ScanPlan, t_edges
    from pipeline.validate.scan import scan_shard

    m = arrays_job["manifest"]
    out = OutputDir(str(arrays_job["tmp"] / "out"))
    plan = ScanPlan(process=m["process"], edges=t_edges(1000, 10, 0.01), grid=False)
    ds = DatasetStats(plan, m["shards"])
    for ordinal, shard in enumerate(sorted(m["shards"])):
        ds.add(scan_shard(out, shard, plan), ordinal)
    (check,) = latent_scale(ds)
    x0 = np.concatenate([cols["x_0"] for cols in read_records(arrays_job["tmp"] / "out").values()])
    got = [r["std"] for r in check.detail["per_channel"]]
    np.testing.assert_allclose(got, x0.std(axis=(0, 2, 3)), rtol=1e-4)
    means = [r["mean"] for r in check.detail["per_channel"]]
    np.testing.assert_allclose(means, x0.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert check.detail["x0"] == "stored" and check.passed


# -- start-up cost and the benchmark scenario -----------------------------------------------------


def test_default_path_does_not_import_diffusers(tmp_path, vae_dir):
    """diffusers is imported only where a VAE is loaded (an actor's setup), not by the driver:
    neither for encoder=none nor to hash an encoder=vae model."""

    code = (
        "import sys\n"
        "import pipeline.precompute, pipeline.run.worker, pipeline.run.stages\n"
        "from pipeline.run.config import compose, config_hash\n"
        "config_hash(compose(['source.urls=x.tar', 'output.dir=o']))\n"
        f"config_hash(compose(['encoder=vae', 'encoder.model={vae_dir}', 'source.urls=x.tar',"
        " 'output.dir=o']))\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
        "assert 'safetensors' not in sys.modules, 'safetensors imported'\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_benchmark_has_an_encoder_scenario(tmp_path):
    from jobs.bench import encoder as bench_encoder
    from jobs.bench import run as bench

    (sc,) = [
        s for s in bench.plan(quick=True, repeats_headline=1, repeats=1) if s.group == "encoder"
    ]
    assert sc.systems == ("project",) and sc.name.startswith("vae-photos64")
    sc.overrides = tuple(bench_encoder.overrides(tmp_path))
    cmd = bench.command("project", sc, ["/d/shard-0000.tar"], tmp_path / "o")
    assert "encoder=vae" in cmd and f"encoder.model={tmp_path}/models/tiny" in cmd
    assert (tmp_path / "models" / "tiny" / "config.json").exists()


def test_validator_reports_latent_scale_for_latent_records(arrays_job):
    """pipeline.validate on the encoder job: every check runs on latent records and the report
    has latent_scale with the per-channel figures (the NaN sample is a counted reject)."""
    from pipeline import validate

    cfg = validate.load_config([f"output.dir={arrays_job['tmp'] / 'out'}", "progress=false",
                                "plots=false"])  # fmt: skip
    report = validate.run(cfg)
    checks = {c["name"]: c for c in report["checks"]}
    assert "latent_scale" in checks and len(checks["latent_scale"]["detail"]["per_channel"]) == 4
    failed = {n: c["summary"] for n, c in checks.items() if not c["passed"]}
    assert not failed, failed


def test_a_relative_path_that_looks_like_a_hub_id_names_both(tmp_path, make_cfg, monkeypatch):
    """``models/tinyvae`` (no such folder): the error says no local folder exists there and why
    the Hub id failed, with the offline fix (``hf download``, the CLI huggingface_hub ships)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = vae_cfg(make_cfg, "models/tinyvae", "source.urls=x.tar", "output.dir=o")
    with pytest.raises(EncoderError) as err:
        describe_encoder(cfg)
    msg = str(err.value)
    assert f"no such local folder ({tmp_path}/models/tinyvae)" in msg, msg
    assert "as a Hugging Face Hub id: " in msg and "(hf download models/tinyvae)" in msg, msg
    assert "huggingface-cli" not in msg
