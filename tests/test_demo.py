"""pipeline.demo: a line per step, the pictures at the end, hints that use this interpreter."""

from __future__ import annotations

import shlex
import sys

import pytest

from pipeline import demo


def test_demo_ends_in_pictures_with_the_venv_python(tmp_path, capsys, ray_session):
    pytest.importorskip("skimage")
    pytest.importorskip("safetensors")
    code = demo.main(
        [
            "--dir", str(tmp_path / "d"), "--shards", "1", "--per-shard", "20",
            "--resolution", "16", "--train-steps", "3", "--samples", "2",
            "schedule.num_timesteps=20",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code in (0, 1)  # 3 steps may not beat the zero predictor; the pictures exist anyway
    for i, what in enumerate(["writing", "precompute", "validation", "example trainer"], 1):
        assert f"[demo {i}/4] {what}" in out and f"[demo {i}/4] done in " in out
    report = tmp_path / "d" / "records" / "validation" / "report.html"
    samples = tmp_path / "d" / "train" / "samples.png"
    assert report.stat().st_size > 10_000 and samples.stat().st_size > 1_000
    assert f"[demo] report:  {report}" in out and f"[demo] samples: {samples}" in out
    python = shlex.quote(sys.executable)
    assert f"[demo] next: {python} " in out and f"{python} -m pipeline.validate " in out
    assert "next: python " not in out


def test_demo_without_training_has_three_steps(tmp_path, capsys, ray_session):
    pytest.importorskip("skimage")
    code = demo.main(
        [
            "--dir", str(tmp_path / "d"), "--shards", "1", "--per-shard", "8",
            "--resolution", "16", "--train-steps", "0", "schedule.num_timesteps=20",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "[demo 3/3] done in " in out and "[demo 4/" not in out
    assert not (tmp_path / "d" / "train").exists()
