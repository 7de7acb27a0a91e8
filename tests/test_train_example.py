"""jobs/train, the example trainer: the denoiser learns from precomputed records; the KL term is
right; it launches as jobs/train_example.py and with python -m."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train.checkpoint import load_checkpoint, save_checkpoint
from jobs.train.cli import main
from jobs.train.data import KeySplit, is_held_out, scan_records
from jobs.train.evaluation import PosteriorKL
from jobs.train.loop import train
from jobs.train.model import TinyDenoiser
from jobs.train.report import report
from jobs.train.sampling import ancestral_sample, sample_grid
from jobs.train.synthetic import make_synthetic_records, palette
from pipeline.consume.dataset import PrecomputedDataset
from pipeline.noising.diffusion import q_posterior, q_sample
from pipeline.noising.schedule import make_schedule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """768 records of 1x8x8 blobs, linear T=100, float32, 2 files of 64-row groups."""
    root = tmp_path_factory.mktemp("tiny") / "records"
    make_synthetic_records(
        root, 768, shape=(1, 8, 8), num_timesteps=100, dtype="float32", files=2, rows_per_group=64
    )
    return root


def test_synthetic_records_are_a_valid_process(tiny):
    ds = PrecomputedDataset(tiny, shuffle=False)
    assert ds.num_records == 768 and ds.metadata["shape"] == [1, 8, 8]
    sched = ds.schedule()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=64)))
    ab = torch.tensor(sched.alphas_cumprod)[batch["t"]].float()
    assert torch.allclose(batch["alpha_bar"], ab)
    assert 0.5 < batch["epsilon"].pow(2).mean() < 1.5


def test_model_mean_of_true_noise_is_the_posterior_mean():
    sched = make_schedule("cosine", 50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(16, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, 50, (16,), generator=g)
    x_t = q_sample(sched, x0, t, eps)
    mean, var, _ = q_posterior(sched, x0, x_t, t)
    kl = PosteriorKL(sched)
    torch.testing.assert_close(kl.model_mean(x_t, t, eps), mean, rtol=1e-9, atol=1e-9)
    batch = {"t": t, "x_t": x_t, "posterior_mean": mean, "posterior_variance": var.reshape(-1)}
    total, count = kl(batch, eps)
    assert count == 16 and abs(total.item()) < 1e-12
    total0, _ = kl(batch, torch.zeros_like(eps))
    assert total0.item() > 0
    # t = 0 (posterior variance 0) is the decoder term, not a KL: left out.
    t0 = {**batch, "t": torch.zeros_like(t), "posterior_variance": torch.zeros(16)}
    assert kl(t0, eps)[1] == 0


@pytest.mark.slow
def test_training_beats_the_zero_predictor(tiny, tmp_path):
    before = torch.get_num_threads()
    m = train(tiny, steps=60, out=tmp_path / "run", batch_size=32, lr=3e-3, width=16,
                 workers=0, quiet=True, threads=1, eval_batches=4)  # fmt: skip
    assert len(m["losses"]) == 60 and m["epochs"] >= 2  # 768 records = 24 batches per epoch
    assert 0.8 < m["final_zero_loss"] < 1.2
    assert m["final_loss"] < 0.5 * m["final_zero_loss"], m["final_loss"]
    e = m["eval"]
    assert e["mse"] < e["zero_mse"]
    assert e["kl_true_eps"] < 1e-6 <= e["kl_zero"]  # stored posterior agrees with the schedule
    assert np.isfinite(e["kl"]) and e["kl_records"] > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert torch.get_num_threads() == before  # threads=1 held only while training
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final_loss"] == m["final_loss"]
    assert "L_(t-1) KL" in report(m)


def test_cli(tiny, tmp_path, capsys):
    code = main(["--data", str(tiny), "--steps", "3", "--out", str(tmp_path / "cli"),
                    "--workers", "0", "--batch-size", "16", "--width", "8",
                    "--threads", "1"])  # fmt: skip
    assert code in (0, 1)  # 3 steps need not beat the zero predictor yet
    out = capsys.readouterr().out
    assert "zero predictor" in out and (tmp_path / "cli" / "loss.png").exists()
    assert "samples.png" in out and (tmp_path / "cli" / "samples.png").exists()
    assert (tmp_path / "cli" / "model.safetensors").exists()
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["samples"]["n"] == 16 and metrics["samples"]["finite"]
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "missing"), "--steps", "3"])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "launch",
    [
        ["jobs/train_example.py"],  # run from another directory: jobs/ is sys.path[0]
        ["-m", "jobs.train_example"],
        ["-m", "jobs.train"],
    ],
)
def test_every_documented_launch_runs_the_trainer(launch, tmp_path):
    """Each way the docs launch the trainer reaches its command line: the file from any working
    directory (Python puts jobs/ first on sys.path: the package imports as ``train``), -m from
    the repository root."""
    file = launch[0].endswith(".py")
    cmd = [sys.executable, str(ROOT / launch[0]) if file else launch[0], *launch[1:], "--help"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's pipeline, as if installed
    r = subprocess.run(cmd, cwd=tmp_path if file else ROOT, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "train a small denoiser on precomputed records" in out and "--make-synthetic N" in out
    prog = {"jobs/train_example.py": "train_example.py", "jobs.train_example": "train_example.py"}
    assert out.startswith(f"usage: {prog.get(launch[-1], 'python -m jobs.train')} ")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 300)" in out and "(default: train-example)" in out
    assert "(default: 16)" in out and "(default: None)" not in out


class _Oracle(torch.nn.Module):
    """The exact eps predictor of a data distribution that is the single point ``x0``."""

    def __init__(self, sched, x0):
        super().__init__()
        self.sched, self.x0, self.shape, self.num_classes = sched, x0, tuple(x0.shape), 0

    def forward(self, x, t, y=None):
        ab = torch.tensor(self.sched.alphas_cumprod)[t].view(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()).float()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ancestral_sampling_reaches_the_data(name):
    """With the exact noise predictor of a one-point distribution, every sample lands on it."""
    sched = make_schedule(name, 50)
    x0 = torch.linspace(-0.8, 0.8, 2 * 4 * 4, dtype=torch.float64).view(2, 4, 4)
    out = ancestral_sample(_Oracle(sched, x0), sched, 6, seed=1)
    assert out.shape == (6, 2, 4, 4)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=0)
    # A wrong predictor (zeros) does not: the test can fail.
    zero = _Oracle(sched, x0)
    zero.forward = lambda x, t, y=None: torch.zeros_like(x)
    assert (ancestral_sample(zero, sched, 6, seed=1) - x0).abs().max() > 0.1


def test_checkpoint_round_trip(tiny, tmp_path):
    ds = PrecomputedDataset(tiny, shuffle=False)
    model = TinyDenoiser(ds.description.shape, 100, width=8, num_classes=3)
    torch.nn.init.normal_(model.label.weight)
    save_checkpoint(model, tmp_path / "m.safetensors", ds.description)
    loaded, config = load_checkpoint(tmp_path / "m.safetensors")
    assert config["num_classes"] == 3 and config["schedule"] == ds.description.schedule
    assert config["shape"] == [1, 8, 8]
    # the public JSON dict (.metadata) still works, and writes the same file
    save_checkpoint(model, tmp_path / "d.safetensors", ds.metadata)
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 50, 99]), torch.tensor([0, 1, 2, -1])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    grid = sample_grid(torch.randn(5, 1, 8, 8), pixels=True)
    assert grid.shape == (2 * 10, 3 * 10, 3) and 0 <= grid.min() and grid.max() <= 1


# -- class-conditional training (--cond cls) ----------------------------------------------------


def _labelled(root, informative=True, n=1024, null_labels=0.1):
    """n records of 1x4x4 blobs in 8 fixed intensities with a cls column (10% null)."""
    make_synthetic_records(root, n, shape=(1, 4, 4), num_timesteps=100, dtype="float32",
                              files=2, rows_per_group=64, classes=8, informative=informative,
                              null_labels=null_labels)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return _labelled(tmp_path_factory.mktemp("labelled") / "records")


def test_synthetic_labels_are_record_columns(labelled):
    import pyarrow as pa

    from pipeline.consume.dataset import RecordsDir
    from pipeline.read.conditioning import Conditioning, spec_of

    rdir = RecordsDir(labelled)
    assert rdir.schema.field("cls").type == pa.int64() and rdir.schema.field("cls").nullable
    assert rdir.metadata["conditioning"] == Conditioning(["cls"]).describe()
    assert spec_of(rdir.metadata).columns == ("cls",)
    ds = PrecomputedDataset(labelled, columns=["x_t", "epsilon", "alpha_bar", "cls", "key"],
                            shuffle=False)  # fmt: skip
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1024)))
    y = batch["cls"]
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(-1, 8))
    assert 0.05 < (y == -1).float().mean() < 0.15  # null labels read as -1
    # The label is the blob's intensity: x_0 = palette[cls] * (0.5 + 0.5 blob), blob in [0, 1].
    ab = batch["alpha_bar"].view(-1, 1, 1, 1)
    x0 = (batch["x_t"] - (1 - ab).sqrt() * batch["epsilon"]) / ab.sqrt()
    ok = (ab.view(-1) > 0.5) & (y >= 0)
    colour = torch.from_numpy(palette(8, 1)).float()[y[ok]].view(-1, 1, 1, 1)
    ratio = (x0[ok] / colour).flatten(1)
    assert ok.sum() > 100 and ratio.min() > 0.5 - 1e-3 and ratio.max() < 1 + 1e-3
    scan = scan_records(rdir, "cls", 0.1)
    assert scan["max_label"] == 7 and scan["null_labels"] == int((y == -1).sum())
    assert sum(scan["class_counts"].values()) + scan["null_labels"] == 1024
    # The held-out split is by key: disjoint, complete, and the size the scan counted.
    held = [is_held_out(k, 0.1) for k in batch["key"]]
    assert sum(held) == scan["held_out"] and 50 < sum(held) < 160
    split = {h: {r["key"] for r in KeySplit(ds, 0.1, held_out=h)} for h in (True, False)}
    assert len(split[True]) == sum(held) and not split[True] & split[False]
    assert split[True] | split[False] == set(batch["key"])


def test_class_embedding_and_null_label():
    model = TinyDenoiser((1, 4, 4), 100, width=8, num_classes=3)
    assert model.label.num_embeddings == 4 and model.null_label == 3
    assert model.labels(torch.tensor([-1, 0, 2]), 3).tolist() == [3, 0, 2]
    assert model.labels(None, 2).tolist() == [3, 3]
    with pytest.raises(ValueError, match="num_classes"):
        model.labels(torch.tensor([3]), 1)
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([1, 50, 99])
    # Zero-initialised: the untrained conditional model is the unconditional one.
    torch.testing.assert_close(model(x, t, torch.tensor([0, 1, 2])), model(x, t))
    with torch.no_grad():
        model.label.weight.normal_()
    assert not torch.allclose(model(x, t, torch.tensor([0, 1, 2])), model(x, t))
    torch.testing.assert_close(model(x, t, torch.tensor([-1, -1, -1])), model(x, t))


@pytest.mark.slow
def test_conditional_training_uses_an_informative_label(labelled, tmp_path):
    """60 steps: given the true label the held-out MSE is below the null label's (same records,
    t and eps); with labels drawn independently of the blobs (the control) the gap vanishes."""
    kw = dict(steps=60, batch_size=64, lr=1e-2, width=16, workers=0, quiet=True, threads=1,
              cond="cls")  # fmt: skip
    m = train(labelled, out=tmp_path / "run", **kw)
    e, c = m["eval"], m["cond"]
    assert c["num_classes"] == 8 and c["p_uncond"] == 0.1 and c["null_labels"] > 50
    assert m["holdout"] == 0.1 and e["records"] == m["held_out_records"] > 50
    assert e["mse"] < e["zero_mse"]
    assert e["mse"] < e["mse_null"], (e["mse"], e["mse_null"])
    assert e["mse_gap"] > 2 * e["mse_gap_se"], e  # not a fluke of the held-out records
    assert len(m["curve"]["steps"]) == len(m["curve"]["mse_null"]) > 10
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["eval"]["mse_null"] == e["mse_null"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert "given the null label" in report(m)

    control = _labelled(tmp_path / "control", informative=False)
    mc = train(control, **kw)
    assert abs(mc["eval"]["mse_gap"]) < 0.5 * e["mse_gap"], (mc["eval"], e)


def test_cli_cond(tiny, labelled, tmp_path, capsys):
    data = tmp_path / "synth"
    code = main(["--data", str(data), "--make-synthetic", "128", "--cond", "cls",
                    "--steps", "3", "--out", str(tmp_path / "cli"), "--workers", "0",
                    "--batch-size", "16", "--width", "8", "--threads", "1"])  # fmt: skip
    assert code in (0, 1)
    out = capsys.readouterr().out
    assert "4 classes + the null label" in out and "given the null label" in out
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["cond"]["num_classes"] == 4 and "mse_null" in saved["eval"]
    for argv, message in (
        (["--data", str(tiny), "--cond", "cls"], "no conditioning column 'cls'"),
        (["--data", str(labelled), "--cond", "cls", "--num-classes", "5"], "holds label 7"),
        (["--data", str(labelled), "--p-uncond", "0.2"], "add --cond"),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--steps", "1", "--out", str(tmp_path / "err")])
        assert message in capsys.readouterr().err


# -- objectives: v on DDPM records with output.targets=[v], flow on schedule=flow records --------


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_session):
    """Records made by the real precompute from 16x16 noise images: flow (shift 3,
    logit_normal) and DDPM with the v target (T=100)."""
    from shards import write_image_shard

    from pipeline.precompute import run
    from pipeline.run.config import compose

    root = tmp_path_factory.mktemp("objectives")
    for i in range(2):
        write_image_shard(root / f"i-{i}.tar", 96, size=(16, 16), seed=5 + i, key_prefix=f"i{i}_")
    jobs = {
        "flow": ["schedule=flow", "schedule.shift=3.0", "sampling.timesteps=logit_normal"],
        "v": ["schedule.num_timesteps=100", "output.targets=[v]"],
    }
    for name, args in jobs.items():
        src = ["source=images", "source.resolution=16", f"source.urls={root}/i-{{0..1}}.tar"]
        cfg = compose(["progress=false", f"output.dir={root / name}", "ray.num_actors=1", *src,
                       "sampling.draws_per_sample=2", *args])  # fmt: skip
        assert run(cfg)["exit_code"] == 0
    return {k: root / k for k in jobs}


@pytest.mark.parametrize("objective", ["flow", "v"])
def test_each_objective_trains_on_its_target_and_reports_held_out_loss(made, tmp_path, objective):
    m = train(made[objective], steps=150, batch_size=32, quiet=True, holdout=0.25, samples=4,
                 out=tmp_path / "o", objective=objective, threads=1)  # fmt: skip
    target = {"flow": "velocity", "v": "v"}[objective]
    assert m["objective"] == objective and m["target"] == target
    e = m["eval"]
    assert e["records"] > 0 and e["mse"] < 0.95 * e["zero_mse"], e  # held-out records
    assert e["kl_true_eps"] < 0.1 * e["kl_zero"]  # the true target implies the stored posterior
    assert m["samples"]["finite"] and (tmp_path / "o" / "samples.png").exists()
    assert f"eval MSE ({objective})" in report(m)
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["target"] == target


def test_an_objective_the_records_do_not_hold_is_refused(made, tiny):
    with pytest.raises(ValueError, match=r"output\.targets=\[v\]"):
        train(tiny, steps=1, objective="v", quiet=True, samples=0)
    with pytest.raises(ValueError, match="schedule=flow"):
        train(made["v"], steps=1, objective="flow", quiet=True, samples=0)
