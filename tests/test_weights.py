"""Model weights come from exactly the bytes that were hashed (pipeline/encode/weights.py): a
weights file replaced while a job runs cannot reach the model, and a damaged one is refused on the
driver in one line (exit 2) before Ray starts."""

from __future__ import annotations

import hashlib
import shutil

import fsspec
import numpy as np
import pytest
import torch
from fixtures.runner import run_python
from shards import write_array_shard
from test_encoder import make_vae, pixel_arrays, vae_cfg

from pipeline.encode import encoder
from pipeline.encode.encode_stage import EncodeStage, load_vae
from pipeline.encode.encoder import EncoderError, describe_encoder
from pipeline.encode.weights import WeightsError, check_safetensors, load_state_dict
from pipeline.read.source import Sample
from pipeline.run.stage import Batch

diffusers = pytest.importorskip("diffusers")


def _meta(make_cfg, folder):
    cfg = vae_cfg(make_cfg, folder, "source=arrays", "source.urls=x.tar", "output.dir=o",
                  "encoder.latent=mean")  # fmt: skip
    return {**describe_encoder(cfg).describe(), "input_shape": [3, 16, 16]}


def _stage(meta) -> EncodeStage:
    stage = EncodeStage(meta)
    stage.setup(torch.device("cpu"))
    return stage


def _encode(stage, arrays):
    batch = [Sample(k, i, a) for i, (k, a) in enumerate(arrays.items())]
    out = stage.process(Batch("s", batch))
    assert not out.rejects
    return np.stack([s.array for s in out.samples])


def test_loaded_model_equals_diffusers_from_pretrained(tmp_path, make_cfg):
    """The in-memory load builds the same model, parameter for parameter, as diffusers'
    from_pretrained of the same folder: the records of existing configs stay bit-identical."""
    folder = make_vae(tmp_path / "vae", seed=3)
    meta = _meta(make_cfg, folder)
    ours = load_vae(str(folder), meta, "float32", torch.device("cpu"))
    ref = diffusers.AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    theirs = {k: v for k, v in ref.state_dict().items() if k in ours.state_dict()}
    assert set(ours.state_dict()) == set(theirs) and len(theirs) > 10
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    half = load_vae(str(folder), meta, "float16", torch.device("cpu"))
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_weights_replaced_after_load_do_not_reach_the_records(tmp_path, make_cfg):
    """`cp other/weights vae/weights` while the job runs (same inode, rewritten in place): the
    actor's model keeps the hashed weights, so its latents are those of the weights the
    metadata names, not of the new file (a memory-mapped load would read the new bytes)."""
    folder = make_vae(tmp_path / "vae", seed=0)
    other = make_vae(tmp_path / "other", seed=1)
    meta = _meta(make_cfg, folder)
    arrays = pixel_arrays(3, seed=5)
    first = _stage(meta)
    before = _encode(first, arrays)
    target = folder / encoder.WEIGHTS_NAME
    with open(other / encoder.WEIGHTS_NAME, "rb") as src, open(target, "r+b") as dst:
        shutil.copyfileobj(src, dst)  # what cp does: the same file, overwritten
        dst.truncate()
    assert (
        hashlib.sha256(target.read_bytes()).hexdigest()
        != meta["weights_sha256"][encoder.WEIGHTS_NAME]
    )
    after = _encode(first, arrays)
    np.testing.assert_array_equal(after, before)
    fresh = _stage(_meta(make_cfg, other))
    assert not np.array_equal(_encode(fresh, arrays), before)  # the weights do matter
    # an actor that starts after the replacement refuses to load, naming the file
    with pytest.raises(EncoderError, match=rf"{encoder.WEIGHTS_NAME}: sha256 .* changed since"):
        _stage(meta)


def test_load_state_dict_reads_the_hashed_bytes_only(tmp_path):
    import safetensors.torch

    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.arange(6.0)}, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    state = load_state_dict(str(tmp_path), {"m.safetensors": sha})
    assert torch.equal(state["w"], torch.arange(6.0))
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(WeightsError, match="m.safetensors: sha256"):
        load_state_dict(str(tmp_path), {"m.safetensors": sha})


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b[: len(b) // 2], "cut short"),
        (lambda b: b + b"xx", "padded"),
        (lambda b: b"\x10" + b"\0" * 7 + b"not json at all!", "header"),
        (lambda b: b"abc", "not a valid safetensors file"),
    ],
)
def test_check_safetensors_names_a_damaged_file(tmp_path, damage, words):
    import safetensors.torch

    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(100), "b": torch.ones(3)}, path)
    fs = fsspec.filesystem("file")
    check_safetensors(fs, str(path))  # a whole file passes
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match=words) as info:
        check_safetensors(fs, str(path))
    assert str(path) in str(info.value)


def test_vae_cut_in_half_is_refused_on_the_driver_in_one_line(tmp_path):
    """exit 2, one line naming the file, before Ray starts (no actor, no traceback)."""
    folder = make_vae(tmp_path / "vae")
    weights = folder / encoder.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_array_shard(tmp_path / "a.tar", 2, shape=(3, 16, 16))
    res = run_python(
        "-m", "pipeline.precompute", "source=arrays", "encoder=vae", f"encoder.model={folder}",
        f"source.urls={tmp_path}/a.tar", f"output.dir={tmp_path}/out", "progress=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(weights) in errors[0] and "cut short" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "Ray" not in res.stderr + res.stdout, res.stderr
