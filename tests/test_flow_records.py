"""Records of both families, record by record, against an independent float64 computation.

The grids and coefficients are rebuilt here from the papers' formulas (not from
pipeline.noising.process): DDPM from the betas (Ho et al. 2020), rectified flow from diffusers'
FlowMatchEulerDiscreteScheduler training grid and Flux's calculate_shift/time_shift, the
posterior by conditioning the joint Gaussian (x_s, x_t) given x_0."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.pins import check_description_pin
from shards import write_array_shard

from pipeline.output import records
from pipeline.precompute import run
from pipeline.run.config import compose

pytestmark = pytest.mark.usefixtures("ray_session")
U32 = 2.0**-24


def _read(out):
    tables = [pq.read_table(p) for p in sorted(out.glob("*.parquet"))]
    assert tables
    cols = {}
    for name in tables[0].schema.names:
        parts = [t.column(name) for t in tables]
        if records.is_tensor(tables[0].schema.field(name).type):
            cols[name] = np.concatenate([records.tensor_to_numpy(p) for p in parts])
        elif name != "key":
            cols[name] = np.concatenate([p.to_numpy() for p in parts])
    return tables[0].schema, cols


def _close(stored, want, scale, ulps=6):
    """|stored - want| within ``ulps`` float32 roundoffs of the magnitudes involved."""
    stored = np.asarray(stored, np.float64)
    tol = ulps * U32 * np.maximum(scale, np.abs(want)) + 1e-30
    bad = np.abs(stored - want) > tol
    assert not bad.any(), f"{bad.sum()} values off, worst {np.max(np.abs(stored - want) / tol)}"


def _run(tmp_path, make_cfg, *overrides, shape=(3, 8, 8)):
    write_array_shard(tmp_path / "a-0.tar", 6, shape=shape, seed=1, key_prefix="a")
    write_array_shard(tmp_path / "a-1.tar", 5, shape=shape, seed=2, key_prefix="b")
    cfg = make_cfg(
        "source=arrays", f"source.urls={tmp_path}/a-{{0..1}}.tar", f"output.dir={tmp_path}/o",
        "output.dtype=float32", "output.store_x0=true", "sampling.draws_per_sample=4", *overrides,
    )  # fmt: skip
    assert run(cfg)["exit_code"] == 0
    return _read(tmp_path / "o")


def _flow_grid(T, shift):
    s = np.arange(1, T + 1, dtype=np.float64) / T
    return shift * s / (1 + (shift - 1) * s)


def _posterior(a_t, s_t, a_s, s_s):
    """q(x_s | x_t, x_0) from the joint Gaussian: Cov(x_s, x_t | x_0) = (a_t/a_s) s_s^2."""
    cov = np.where(a_s > 0, a_t / np.where(a_s > 0, a_s, 1), 0) * s_s**2
    k = cov / s_t**2
    return a_s - k * a_t, k, s_s**2 - k * cov  # coef x_0, coef x_t, variance


FLOW_SHIFT3 = ["schedule.shift=3.0", "sampling.timesteps=logit_normal"]
# sha256 of the process description of each job's files and manifest (tests/fixtures/pins.py:
# tmp paths and the NumPy version normalised, each checked first; every other field as
# written), computed by the code at commit 098a8ff. A change to any field fails the test that
# pins it.
DESCRIPTION_PINS = {
    "flow-shift3": "82f4a4ff55db37771ef00a6fa7136fede477805a770e047d919ea728255a8e6c",
    "flow-dynamic-shift": "fbfae34613abb96182fbc3ba0e1cbb6fb82f6bc20af9ab462d61dc85658410d2",
    "flow-stratified": "23f29fd97d50811c72f34725eb411c7a301c81fef2542a28481a8d103d1c77b6",
    "ddpm-v": "92fc1b87cd8dbcc7d63e5b31347d39594363acc73cd9e867603355d8b88655dc",
}


@pytest.fixture(scope="module")
def flow_shift3(tmp_path_factory, ray_session):
    """One flow job (shift 3, logit-normal t), made once for the float64 check and the loader
    and Hugging Face export test: (output dir, schema, columns)."""
    root = tmp_path_factory.mktemp("flow-shift3")
    schema, cols = _run(root, lambda *o: compose(["progress=false", *o]), "schedule=flow",
                        *FLOW_SHIFT3)  # fmt: skip
    return root / "o", schema, cols


@pytest.mark.parametrize(
    "overrides,shift,pin",
    [
        (FLOW_SHIFT3, 3.0, "flow-shift3"),
        (["schedule.dynamic_shift=true", "sampling.timesteps=mode"], None, "flow-dynamic-shift"),
        (["sampling.timesteps=stratified"], 1.0, "flow-stratified"),
    ],
)
def test_flow_records_against_float64(tmp_path, make_cfg, request, overrides, shift, pin):
    if overrides == FLOW_SHIFT3:
        out, schema, c = request.getfixturevalue("flow_shift3")
    else:
        schema, c = _run(tmp_path, make_cfg, "schedule=flow", *overrides)
        out = tmp_path / "o"
    check_description_pin(out, DESCRIPTION_PINS[pin], {"tmp": out.parent})
    meta = records.process_metadata(schema)
    T = 1000
    if shift is None:  # Flux: mu linear in (H/2)(W/2) = 16 tokens, then exp(mu)
        n = (8 // 2) * (8 // 2)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (n - 256)
        assert meta["grid"]["seq_len"] == n and math.isclose(meta["grid"]["mu"], mu, rel_tol=1e-12)
        shift = math.exp(mu)
    grid = _flow_grid(T, shift)
    assert schema.field("t").type == pa.float32() and "alpha_bar" not in schema.names
    assert meta["schedule"]["family"] == "flow" and meta["noise"]["family"] == "flow"
    k = np.searchsorted(grid.astype(np.float32), c["sigma"])  # every sigma is a grid point
    assert (grid[k].astype(np.float32) == c["sigma"]).all()
    assert (c["t"] == (grid[k] * T).astype(np.float32)).all()
    sig, x0, eps = grid[k][:, None, None, None], c["x_0"].astype(np.float64), c["epsilon"]
    a = 1 - sig
    _close(c["x_t"], a * x0 + sig * eps, a * np.abs(x0) + sig * np.abs(eps))
    _close(c["velocity"], eps - x0, np.abs(eps) + np.abs(x0), ulps=2)
    snr = ((1 - grid) / grid) ** 2
    _close(c["snr"], snr[k], 0, ulps=2)
    prev = np.concatenate([[0.0], grid[:-1]])  # the point before the first is the data
    c1, c2, var = _posterior(1 - grid, grid, 1 - prev, prev)
    _close(c["posterior_variance"], var[k], 0, ulps=2)
    first = k == 0
    assert (c["posterior_variance"][first] == 0).all()
    logv = np.log(np.concatenate([var[1:2], var[1:]]))
    _close(c["posterior_log_variance"], logv[k], 0, ulps=2)
    xt = c["x_t"].astype(np.float64)  # the posterior uses the unrounded float32 x_t
    c1, c2 = c1[k][:, None, None, None], c2[k][:, None, None, None]
    _close(c["posterior_mean"], c1 * x0 + c2 * xt, np.abs(c1 * x0) + np.abs(c2 * xt), ulps=12)
    at_one = c["sigma"] == 1.0  # x_T is eps exactly
    assert (c["x_t"][at_one] == c["epsilon"][at_one]).all()


def test_ddpm_records_with_v_against_float64(tmp_path, make_cfg):
    schema, c = _run(tmp_path, make_cfg, "schedule=linear", "output.targets=[v]")
    assert records.process_metadata(schema)["targets"] == ["v"]
    check_description_pin(tmp_path / "o", DESCRIPTION_PINS["ddpm-v"], {"tmp": tmp_path})
    assert schema.field("t").type == pa.int32() and "velocity" not in schema.names
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    t = c["t"].astype(np.int64)
    a, s = np.sqrt(ab)[t][:, None, None, None], np.sqrt(1 - ab)[t][:, None, None, None]
    x0, eps = c["x_0"].astype(np.float64), c["epsilon"]
    _close(c["x_t"], a * x0 + s * eps, a * np.abs(x0) + s * np.abs(eps))
    _close(c["v"], a * eps - s * x0, a * np.abs(eps) + s * np.abs(x0))
    _close(c["snr"], (ab / (1 - ab))[t], 0, ulps=2)
    _close(c["alpha_bar"], ab[t], 0, ulps=1)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    c1, c2, var = _posterior(np.sqrt(ab), np.sqrt(1 - ab), np.sqrt(ab_prev), np.sqrt(1 - ab_prev))
    _close(c["posterior_variance"], var[t], 0, ulps=2)
    c1, c2 = c1[t][:, None, None, None], c2[t][:, None, None, None]
    xt = c["x_t"].astype(np.float64)
    _close(c["posterior_mean"], c1 * x0 + c2 * xt, np.abs(c1 * x0) + np.abs(c2 * xt), ulps=12)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["schedule=linear", "output.targets=[velocity]"], "output.targets"),
        (["schedule=flow", "output.targets=[v]"], "output.targets"),
        (["schedule=cosine", "sampling.timesteps=logit_normal"], "sampling.timesteps"),
        (["schedule=flow", "schedule.dynamic_shift=true", "source.shape=[3,7,8]"],
         "schedule.patch_size"),
    ],
)  # fmt: skip
def test_undefined_targets_and_shapes_exit_2_naming_the_key(tmp_path, overrides, key):
    import subprocess
    import sys

    write_array_shard(tmp_path / "a-0.tar", 2, shape=(3, 7, 8))
    args = ["source=arrays", f"source.urls={tmp_path}/a-0.tar", f"output.dir={tmp_path}/o"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.precompute", *args, *overrides],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr + proc.stdout


def test_loader_and_hf_export_carry_the_flow_columns_with_their_types(tmp_path, flow_shift3):
    """PrecomputedDataset yields flow's t as float32 sigma * T (not truncated to an int), sigma,
    snr and velocity; the Hugging Face export types them from the registry."""
    pytest.importorskip("datasets")
    import torch

    from pipeline.consume.dataset import PrecomputedDataset
    from pipeline.consume.hf import to_hf_dataset

    out, schema, c = flow_shift3
    ds = PrecomputedDataset(out, shuffle=False)
    r = next(iter(ds))
    assert r["t"].dtype == torch.float32 and r["sigma"].dtype == torch.float32
    assert r["velocity"].shape == (3, 8, 8) and r["snr"].dtype == torch.float32
    assert float(r["t"]) == float(c["t"][0]) and float(r["t"]) != int(float(r["t"]))
    assert ds.process().family == "flow" and ds.process().sigma[-1] == 1.0
    hf = to_hf_dataset(out, ["t", "sigma", "snr", "velocity"],
                       cache_dir=str(tmp_path / "hf"))  # fmt: skip
    f = hf.features
    assert f["t"].dtype == "float32" and f["sigma"].dtype == "float32"
    assert f["snr"].dtype == "float32" and f["velocity"].shape == (3, 8, 8)
    row = hf.with_format("numpy")[0]
    np.testing.assert_array_equal(row["velocity"], c["velocity"][0])
    assert row["t"] == c["t"][0]
