"""The VAE encode stage on the actor (pipeline/encode/encode_stage.py): latents of a batch, samples
whose latent is not finite rejected with the remedy, conditioning carried through, one device's
latents equal to another's to rounding. Helpers and the tiny VAE: test_encoder.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoder import make_vae, pixel_arrays, vae_cfg

from pipeline.encode.encode_stage import EncodeStage, Latent
from pipeline.encode.encoder import describe_encoder
from pipeline.read.source import Sample, SampleError
from pipeline.run.stage import Batch

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae(tmp_path_factory.mktemp("models") / "vae")


def _stage(make_cfg, vae_dir, *overrides, device: str = "cpu", **kw) -> EncodeStage:
    cfg = vae_cfg(make_cfg, vae_dir, "source=arrays", "source.urls=x.tar", "output.dir=o",
                  *overrides)  # fmt: skip
    stage = EncodeStage({**describe_encoder(cfg).describe(), "input_shape": [3, 16, 16]}, **kw)
    stage.setup(torch.device(device))
    return stage


def test_latents_keep_each_samples_conditioning_and_extras(vae_dir, make_cfg):
    """The worker never re-attaches conditioning: the stage's Latent samples carry it."""
    stage = _stage(make_cfg, vae_dir, "encoder.latent=mean")
    x = pixel_arrays(5, seed=2)
    samples = [Sample(k, i, a, cond={"cls": i, "txt": f"c{i}"}) for i, (k, a) in
               enumerate(x.items())]  # fmt: skip
    batch = Batch("s", samples, extras={"n": np.arange(5)})
    out = stage.process(batch)
    assert all(isinstance(s, Latent) for s in out.samples) and not out.rejects
    assert [s.cond for s in out.samples] == [s.cond for s in samples]
    assert [(s.key, s.index) for s in out.samples] == [(s.key, s.index) for s in samples]
    assert out.extras["n"].tolist() == [0, 1, 2, 3, 4]
    assert out.samples[0].array.shape == out.samples[0].std.shape == (4, 8, 8)


def test_on_error_fail_stops_at_the_first_nonfinite_latent(vae_dir, make_cfg):
    stage = _stage(make_cfg, vae_dir, "encoder.latent=mean", on_error="fail")
    x = pixel_arrays(3, seed=4)
    batch = [Sample(k, i, a * (1e30 if i == 1 else 1)) for i, (k, a) in enumerate(x.items())]
    with pytest.raises(SampleError, match="latent not finite") as info:
        stage.process(Batch("s-1", batch))
    assert info.value.key == batch[1].key and "shard s-1" in str(info.value)


def test_half_precision_overflow_is_rejected_naming_the_remedy(vae_dir, make_cfg):
    """float16 on the CPU: pixel values beyond 65504 overflow; most of the batch -> the reason
    names encoder.dtype=float32."""
    stage = _stage(make_cfg, vae_dir, "encoder.dtype=float16", "encoder.latent=mean")
    x = pixel_arrays(4, seed=3)
    batch = [Sample(k, i, a * (1e5 if i else 1)) for i, (k, a) in enumerate(x.items())]
    out = stage.process(Batch("s-0", batch))
    latents, rejects = out.samples, out.rejects
    assert [s.key for s in latents] == [batch[0].key]
    assert [r["key"] for r in rejects] == [s.key for s in batch[1:]]
    assert all("encoder.dtype=float32" in r["reason"] for r in rejects), rejects[0]
    assert "3 of 4 samples of its batch overflowed in float16" in rejects[0]["reason"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_latents_equal_cpu_latents_to_rounding(vae_dir, make_cfg):
    batch = [Sample(k, i, a) for i, (k, a) in enumerate(pixel_arrays(6, seed=5).items())]
    latents = []
    for device in ("cpu", "cuda:0"):
        stage = _stage(make_cfg, vae_dir, device=device)
        latents.append(stage.process(Batch("s", batch)).samples)
    for a, b in zip(*latents):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.std, b.std, rtol=1e-4, atol=1e-5)
