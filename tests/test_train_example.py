"""jobs/train_example.py: the denoiser learns from precomputed records; the KL term is right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.dataset import PrecomputedDataset
from pipeline.diffusion import q_posterior, q_sample
from pipeline.schedule import make_schedule

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "train_example.py"


@pytest.fixture(scope="module")
def te():
    """The example script, imported as a module from its path (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(te, tmp_path_factory):
    """768 records of 1x8x8 blobs, linear T=100, float32, 2 files of 64-row groups."""
    root = tmp_path_factory.mktemp("tiny") / "records"
    te.make_synthetic_records(
        root, 768, shape=(1, 8, 8), num_timesteps=100, dtype="float32", files=2, rows_per_group=64
    )
    return root


def test_synthetic_records_are_a_valid_process(te, tiny):
    ds = PrecomputedDataset(tiny, shuffle=False)
    assert ds.num_records == 768 and ds.metadata["shape"] == [1, 8, 8]
    sched = ds.schedule()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=64)))
    ab = torch.tensor(sched.alphas_cumprod)[batch["t"]].float()
    assert torch.allclose(batch["alpha_bar"], ab)
    assert 0.5 < batch["epsilon"].pow(2).mean() < 1.5


def test_model_mean_of_true_noise_is_the_posterior_mean(te):
    sched = make_schedule("cosine", 50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(16, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, 50, (16,), generator=g)
    x_t = q_sample(sched, x0, t, eps)
    mean, var, _ = q_posterior(sched, x0, x_t, t)
    kl = te.PosteriorKL(sched)
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
def test_training_beats_the_zero_predictor(te, tiny, tmp_path):
    before = torch.get_num_threads()
    m = te.train(tiny, steps=60, out=tmp_path / "run", batch_size=32, lr=3e-3, width=16,
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
    assert "L_(t-1) KL" in te.report(m)


def test_cli(te, tiny, tmp_path, capsys):
    code = te.main(["--data", str(tiny), "--steps", "3", "--out", str(tmp_path / "cli"),
                    "--workers", "0", "--batch-size", "16", "--width", "8", "--threads", "1"])  # fmt: skip
    assert code in (0, 1)  # 3 steps need not beat the zero predictor yet
    out = capsys.readouterr().out
    assert "zero predictor" in out and (tmp_path / "cli" / "loss.png").exists()
    with pytest.raises(SystemExit):
        te.main(["--data", str(tmp_path / "missing"), "--steps", "3"])
    assert "does not exist" in capsys.readouterr().err
