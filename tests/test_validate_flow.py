"""pipeline.validate on rectified-flow records: clean runs pass, the five planted flow defects of
issue 19 are caught. Defects are planted as in tests/test_validate.py: the Parquet files are
rewritten consistently (every column derived from the altered values recomputed, the metadata and
commit markers left claiming the configured process), with ``max_consistency_records=0`` so that
the statistics and the record-by-record arithmetic must find them without the keyed regeneration.

Datasets: 4 shards x 48 arrays [4, 8, 8] x 2 draws, schedule=flow shift 3, logit_normal."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from shards import write_array_shard
from test_validate import _copy, _drop_x0, _failed, _read, _recommit, _validate, _write

from pipeline.noising.diffusion import q_posterior, q_sample, velocity
from pipeline.noising.noise import KeyedNoise
from pipeline.noising.process import flow
from pipeline.output import records
from pipeline.precompute import run as precompute
from pipeline.run.config import compose

pytestmark = pytest.mark.usefixtures("ray_session")
FLOW = ["schedule=flow", "schedule.shift=3.0", "sampling.timesteps=logit_normal"]


def _build(root, name, *overrides, shards=4, n=48, process=FLOW):
    src = root / f"{name}-src"
    src.mkdir()
    for i in range(shards):
        write_array_shard(src / f"sh-{i}.tar", n, shape=(4, 8, 8), seed=i, key_prefix=f"k{i}_")
    cfg = compose(
        ["progress=false", "source=arrays", f"source.urls={src}/sh-{{0..{shards - 1}}}.tar",
         f"output.dir={root / name}", "sampling.draws_per_sample=2", "output.rows_per_group=40",
         "ray.num_actors=1", *process, *overrides]
    )  # fmt: skip
    assert precompute(cfg)["exit_code"] == 0
    return root / name


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """a: the dataset defects are planted in; u: a coarse grid (T = 20, uniform t), many
    records at sigma = 1."""
    root = tmp_path_factory.mktemp("validate_flow")
    return {
        "a": _build(root, "a", "seed=3", "output.store_x0=true"),
        "u": _build(root, "u", "seed=4", "schedule.num_timesteps=20", "sampling.timesteps=uniform",
                    shards=2),
    }  # fmt: skip


@pytest.fixture
def base(datasets):
    return datasets["a"]


def _refresh(cols, proc, k):
    """Recompute every derived column of flow records at grid indices ``k`` of ``proc`` as the
    worker does (float32 arithmetic, then the stored dtype)."""
    out = torch.float16 if cols["x_t"].dtype == np.float16 else torch.float32
    x0 = torch.from_numpy(cols["x_0"].astype(np.float32))
    eps = torch.from_numpy(cols["epsilon"].astype(np.float32))
    kt = torch.from_numpy(k)
    x_t = q_sample(proc, x0, kt, eps)
    mean, _, _ = q_posterior(proc, x0, x_t, kt, out_dtype=out)
    cols.update(
        t=proc.t_column(k),
        sigma=proc.sigma[k].astype(np.float32),
        x_t=x_t.to(out).numpy(),
        posterior_mean=mean.numpy(),
        posterior_variance=proc.posterior_variance[k].astype(np.float32),
        posterior_log_variance=proc.posterior_log_variance_clipped[k].astype(np.float32),
        snr=proc.snr[k].astype(np.float32),
        velocity=velocity(x0, eps, out_dtype=out).numpy(),
    )


def _plant(root, shards, fn):
    """Apply fn(cols, proc, shard) to the named shards (proc: the file's own process, k its
    records' grid indices in cols["k"]), rewrite them, re-commit (size and checksum)."""
    for shard in shards:
        path = root / f"{shard}.parquet"
        schema, cols = _read(path)
        proc = records.process_from_metadata(records.process_metadata(schema))
        cols["k"] = proc.grid_index(cols["t"])
        assert (cols["k"] >= 0).all()
        fn(cols, proc, shard)
        del cols["k"]
        _write(path, schema, cols)
        _recommit(root, shard)
    return root


ALL = ["sh-0", "sh-1", "sh-2", "sh-3"]


def _swap_weights(cols, proc, shard):
    """x_t = sigma x_0 + (1 - sigma) eps: the two weights swapped."""
    swapped = flow(proc.num_timesteps, shift=3.0)
    object.__setattr__(swapped, "alpha", proc.sigma)
    object.__setattr__(swapped, "sigma", proc.alpha)
    x0 = torch.from_numpy(cols["x_0"].astype(np.float32))
    eps = torch.from_numpy(cols["epsilon"].astype(np.float32))
    x_t = q_sample(swapped, x0, torch.from_numpy(cols["k"]), eps)
    out = torch.from_numpy(cols["x_t"]).dtype
    mean, _, _ = q_posterior(proc, x0, x_t, torch.from_numpy(cols["k"]), out_dtype=out)
    cols.update(x_t=x_t.to(out).numpy(), posterior_mean=mean.numpy())


def _shift_twice(cols, proc, shard):
    """The shift applied to the already shifted grid: shift 3 twice is shift 9."""
    _refresh(cols, flow(proc.num_timesteps, shift=9.0), cols["k"])


def _velocity_sign(cols, proc, shard):
    cols["velocity"] = -cols["velocity"]


def _uniform_sigma(cols, proc, shard):
    """sigma drawn with the uniform sampler from the same keyed bits."""
    noise = KeyedNoise(3, proc.num_timesteps, draws=2, sampler="uniform", family="flow")
    d = noise.digests(shard, list(dict.fromkeys(cols["key"])))
    k = noise.timesteps(d, shard, sorted(set(cols["index"].tolist())))
    _refresh(cols, proc, k.astype(np.int64))


def _other_shift(cols, proc, shard):
    """This shard's writer used shift 1 (as if its config had been another)."""
    _refresh(cols, flow(proc.num_timesteps, shift=1.0), cols["k"])


def test_clean_flow_dataset_passes_with_and_without_x0(base, tmp_path):
    report, checks = _validate(base)
    assert report["exit_code"] == 0, _failed(checks)
    consistency = checks["record_consistency"]["detail"]["items"]
    checked = {i["quantity"].split(":")[0] for i in consistency if i.get("checked")}
    assert {"x_t", "posterior_mean", "velocity", "sigma", "snr"} <= checked
    assert report["summary"]["schedule"]["family"] == "flow"
    d = _drop_x0(_copy(base, tmp_path / "d"))
    report, checks = _validate(d)
    assert report["exit_code"] == 0, _failed(checks)


def test_x_T_is_eps_exactly_at_sigma_1(datasets, tmp_path):
    report, checks = _validate(datasets["u"])
    assert report["exit_code"] == 0, _failed(checks)
    exact = checks["convergence"]["detail"]["exact_terminal"]
    assert exact[0] >= 5 and exact[1] == 0  # records at sigma = 1, x_T == eps for every one

    def nudge(cols, proc, shard):  # one x_T value one float16 step away from its eps
        i = int(np.flatnonzero(cols["k"] == proc.num_timesteps - 1)[0])
        cols["x_t"][i, 0, 0, 0] = np.nextafter(cols["x_t"][i, 0, 0, 0], np.float16(9))

    d = _plant(_copy(datasets["u"], tmp_path / "d"), ["sh-0"], nudge)
    _, checks = _validate(d)
    assert _failed(checks) == {"convergence"}
    item = next(i for i in checks["convergence"]["detail"]["items"] if not i["passed"])
    assert item["quantity"] == "x_T != eps (bytes)" and item["value"] == 1


# DDPM's words: alpha_bar (ab) and the 0-based t; a flow report has sigma and t = sigma * T
DDPM_WORDS = re.compile(r"alpha_bar|\bab\b|1-ab|0-based")


def _report_texts(path, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """Validate ``path`` with plots; (report, {where: text}) of report.md, report.html (its
    embedded PNGs left out), every note and failed item's text and every plot's texts (titles,
    axis labels, tick labels)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from pipeline import validate

    texts, savefig = {}, Figure.savefig

    def spy(fig, *args, **kwargs):
        found = " | ".join(t.get_text() for t in fig.findobj(Text) if t.get_text())
        texts[f"plot {len(texts)}: {found[:60]}"] = found
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    cfg = validate.load_config([f"output.dir={path}", "progress=false",
                                f"output.report_dir={tmp_path / 'rep'}"])  # fmt: skip
    report = validate.run(cfg)
    texts["report.md"] = (tmp_path / "rep" / "report.md").read_text()
    html = (tmp_path / "rep" / "report.html").read_text()
    texts["report.html"] = re.sub(r'src="data:image/png;base64,[^"]*"', "", html)
    for c in report["checks"]:
        texts[f"notes of {c['name']}"] = json.dumps(c["detail"].get("notes", []))
        texts[f"items of {c['name']}"] = json.dumps(
            [[i.get("where"), i.get("quantity"), i.get("message")] for i in c["detail"]["items"]]
        )
    return report, texts


def test_a_flow_report_speaks_of_sigma_not_alpha_bar(datasets, tmp_path, monkeypatch):
    """The report of a flow dataset without stored x_0 (every note about the reconstruction of
    x_0 shows) states the process in flow's terms: x_t = (1 - sigma) x_0 + sigma eps,
    reconstruction where (1 - sigma)^2 is large enough, the per-t-bin table's mean sigma, the
    terminal figures' sigma_T, the plots' grid index i (t = sigma_i T), the strip's t = sigma T
    as the records carry it; no alpha_bar, ab or 0-based t anywhere (the report used DDPM's
    words for both families; a DDPM report is unchanged: tests/test_report.py)."""
    report, texts = _report_texts(datasets["u"], tmp_path, monkeypatch)
    assert report["exit_code"] == 0
    assert len([k for k in texts if k.startswith("plot")]) >= 5
    for where, text in texts.items():
        assert not DDPM_WORDS.search(text), (where, DDPM_WORDS.findall(text), text[:3000])
    md = texts["report.md"]
    assert "x_t = (1 - sigma) x_0 + sigma eps is NOT checkable" in md
    assert "(E[x_t eps] = sigma)" in md and "where (1 - sigma)^2 >= 0.1" in md
    assert "| t range | records | sigma | Var(x_t) |" in md
    assert "Terminal figures (last grid point, t = sigma_T T = 20): sigma_T = 1," in md
    assert report["terminal"] == {"sigma_T": 1.0, "mean_shift": 0.0, "variance_ratio": 1.0,
                                  "snr_T": 0.0}  # fmt: skip
    rows = next(c for c in report["checks"] if c["name"] == "variance_preservation")
    assert all("alpha_bar" not in r and 0 < r["sigma"] <= 1 for r in rows["detail"]["per_bin"])
    strip = next(t for k, t in texts.items() if "noising strip" in t)
    proc = flow(20, shift=3.0)
    first = f"t={str(np.float32(proc.timesteps[0]))} (sigma={proc.sigma[0]:.2g})"
    assert first == "t=2.7272727 (sigma=0.14)" and first in strip  # the first grid point
    assert "t=20.0 (sigma=1)" in strip


def test_flow_t_bins_are_labelled_by_the_t_the_records_carry(datasets):
    """A flow dataset's t-bins are labelled by t = sigma_i T (float32, as stored) of their
    first and last grid points, not by grid index: counting the records whose stored t lies in
    a bin's [t_lo, t_hi] gives the bin's record count, for every bin of the per-bin table, and
    every per-bin item (variance_preservation, noise_independence, convergence) names its bin
    by that label."""
    import pyarrow.parquet as pq

    path = datasets["u"]
    report, checks = _validate(path)
    t = np.concatenate(
        [
            pq.read_table(f, columns=["t"]).column(0).to_numpy()
            for f in sorted(path.glob("*.parquet"))
        ]
    )
    assert t.dtype == np.float32
    rows = checks["variance_preservation"]["detail"]["per_bin"]
    assert len(rows) >= 3
    labels = set()
    for r in rows:
        lo, hi = np.float32(r["t_lo"]), np.float32(r["t_hi"])
        assert (lo, hi) == (r["t_lo"], r["t_hi"])  # exact float32 values, as stored
        assert r["label"] == f"t in [{str(lo)}, {str(hi)}]" and r["grid_hi"] > r["grid_lo"]
        assert int(((t >= lo) & (t <= hi)).sum()) == r["records"], r
        labels.add(r["label"])
    bands = checks["variance_preservation"]["detail"]["bands"]
    assert {b["label"] for b in bands} == labels
    for name in ("variance_preservation", "noise_independence", "convergence"):
        wheres = {i["where"] for i in checks[name]["detail"]["items"]}
        binned = [w for w in wheres if w.startswith(("t in", "grid"))]  # label[, channel]
        assert binned and all(re.match(r"t in \[\d+\.\d*, \d+\.\d*\](,|$)", w) for w in binned)
    window = checks["convergence"]["detail"]["window"]
    assert window["t_hi"] == 20.0 and window["label"].endswith(", 20.0]")
    assert report["summary"]["t_bins"][-1] == 20  # the plan's edges stay grid indices


@pytest.mark.parametrize("store_x0", [True, False])
def test_weights_swapped(base, tmp_path, store_x0):
    d = _plant(_copy(base, tmp_path / "d"), ALL, _swap_weights)
    if not store_x0:
        _drop_x0(d)
    _, checks = _validate(d)
    assert "variance_preservation" in _failed(checks)
    bad = [i for i in checks["variance_preservation"]["detail"]["items"] if not i["passed"]]
    assert any(i["quantity"] == "E[x_t eps] - sigma" for i in bad)
    if store_x0:
        assert "record_consistency" in _failed(checks)


def test_shift_applied_twice(base, tmp_path):
    d = _plant(_copy(base, tmp_path / "d"), ALL, _shift_twice)
    _, checks = _validate(d)
    assert "record_consistency" in _failed(checks)
    off = next(
        i for i in checks["record_consistency"]["detail"]["items"]
        if i["quantity"] == "records with t out of range values"
    )  # fmt: skip
    assert off["value"] >= 0.95 * 4 * 48 * 2  # sigma * T off the configured grid (a few coincide)


@pytest.mark.parametrize("store_x0", [True, False])
def test_velocity_sign_flipped(base, tmp_path, store_x0):
    d = _plant(_copy(base, tmp_path / "d"), ["sh-2"], _velocity_sign)
    if not store_x0:
        _drop_x0(d)
    _, checks = _validate(d)
    assert _failed(checks) == {"record_consistency"}
    item = next(
        i for i in checks["record_consistency"]["detail"]["items"]
        if i["quantity"].startswith("velocity")
    )  # fmt: skip
    assert item["value"] == 2 * 48 and item["checked"] == 4 * 2 * 48
    assert item["worst"]["shard"] == "sh-2"


def test_uniform_sigma_when_logit_normal_configured(base, tmp_path):
    d = _plant(_copy(base, tmp_path / "d"), ALL, _uniform_sigma)
    _, checks = _validate(d)
    assert _failed(checks) == {"timestep_distribution"}
    # and the keyed regeneration names it record by record when asked
    _, checks = _validate(d, "max_consistency_records=200")
    assert "keyed_noise" in _failed(checks)


def test_one_shard_with_another_shift(base, tmp_path):
    d = _plant(_copy(base, tmp_path / "d"), ["sh-1"], _other_shift)
    _, checks = _validate(d)
    assert "record_consistency" in _failed(checks)
    bad = {
        i["where"] for i in checks["timestep_distribution"]["detail"]["items"] if not i["passed"]
    }
    assert bad <= {"shard sh-1", "overall"}


# Seeds of the no-false-alarm sweep: 8 cover each density with and without dynamic shift (and
# both x_0 storages); FLOW_FALSE_ALARM_SEEDS=20 runs the longer sweep docs/flow.md reports.
SWEEP_SEEDS = int(os.environ.get("FLOW_FALSE_ALARM_SEEDS", "8"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SWEEP_SEEDS))
def test_clean_flow_runs_have_no_false_alarm(tmp_path, seed):
    """Clean small datasets (2 shards x 24 samples x 2 draws), the densities, dynamic shift and
    x_0 storage varied by seed (every combination within 8 seeds): every check passes."""
    extra = [
        f"seed={100 + seed}",
        f"sampling.timesteps={('logit_normal', 'mode', 'uniform', 'stratified')[seed % 4]}",
        f"output.store_x0={'true' if seed % 2 else 'false'}",
        *(["schedule.dynamic_shift=true"] if seed // 4 % 2 == 1 else []),
    ]
    d = _build(tmp_path, "c", *extra, shards=2, n=24)
    report, checks = _validate(d, "max_consistency_records=50")
    assert report["exit_code"] == 0, {k: checks[k]["detail"]["items"] for k in _failed(checks)}


def test_dynamic_shift_follows_each_bucket_files_shape(tmp_path):
    """Aspect-ratio buckets + Flux's dynamic shift: each file's grid is its own shape's (seq_len
    = (H/2)(W/2) of its latent-free image shape), its records' sigma lie on that grid, and the
    validator rebuilds the grid per file and passes."""
    import pyarrow.parquet as pq
    from test_bucket_output import BUCKETS, bucket_shards

    urls = bucket_shards(tmp_path, n_shards=2, n=12)
    cfg = compose(["progress=false", urls, f"output.dir={tmp_path}/o", *BUCKETS, "schedule=flow",
                   "schedule.dynamic_shift=true", "sampling.draws_per_sample=2",
                   "output.store_x0=true"])  # fmt: skip
    assert precompute(cfg)["exit_code"] == 0
    seen = {}
    for path in sorted((tmp_path / "o").glob("*.parquet")):
        schema = pq.read_schema(path)
        meta, shape = records.process_metadata(schema), records.file_shape(schema)
        n = (shape[1] // 2) * (shape[2] // 2)
        assert meta["grid"]["seq_len"] == n
        proc = records.process_from_metadata(meta, shape)
        sigma = pq.read_table(path, columns=["sigma"]).column(0).to_numpy()
        k = proc.grid_index(pq.read_table(path, columns=["t"]).column(0).to_numpy())
        assert (k >= 0).all() and (proc.sigma[k].astype(np.float32) == sigma).all()
        seen[n] = meta["grid"]["mu"]
    assert len(seen) >= 2 and len(set(seen.values())) == len(seen)  # one mu per shape
    report, checks = _validate(tmp_path / "o")
    assert report["exit_code"] == 0, _failed(checks)
    # one grid per shape: a bin's t differs between files, so bins are named by grid points
    vp = checks["variance_preservation"]["detail"]
    assert vp["per_bin"] and all(
        r["label"] == f"grid points [{r['grid_lo']}, {r['grid_hi']})" and "t_lo" not in r
        for r in vp["per_bin"]
    )
    assert any("each sample shape (bucket) has its own grid" in n for n in vp["notes"])


@pytest.mark.parametrize("store_x0", [True, False])
def test_ddpm_v_target_checked_record_by_record(tmp_path, store_x0):
    """DDPM with output.targets=[v]: a clean dataset passes with every v checked (from x_0, or
    by sigma x_t + alpha v = eps without it); v with its sign flipped in one shard fails."""
    x0 = "true" if store_x0 else "false"
    d = _build(tmp_path, "v", "output.targets=[v]", f"output.store_x0={x0}", shards=2,
               process=["schedule=cosine", "schedule.num_timesteps=100"])  # fmt: skip
    report, checks = _validate(d)
    assert report["exit_code"] == 0, _failed(checks)
    item = next(
        i for i in checks["record_consistency"]["detail"]["items"] if i["quantity"].startswith("v:")
    )  # fmt: skip
    assert item["checked"] == 2 * 48 * 2 and item["value"] == 0

    def flip(cols, proc, shard):
        cols["v"] = -cols["v"]

    _plant(d, ["sh-1"], flip)
    _, checks = _validate(d)
    assert _failed(checks) == {"record_consistency"}
