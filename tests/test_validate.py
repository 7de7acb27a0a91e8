"""pipeline.validate end to end: datasets built by the real precompute on tiny shards, then
defects planted by rewriting the Parquet files consistently (x_t, posterior and scalar columns
recomputed from the altered values), so that only the statistics can betray them.

Datasets: 4 shards x 48 images (16 x 16 RGB noise pictures, Var(x_0) = 1/3) x 2 draws, T = 100.
Most runs use ``max_consistency_records=0`` so that the statistical checks must catch the defects
without the exact keyed-noise regeneration (tested separately).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shards import (
    flip_an_x_t_sign,
    npy_bytes,
    write_array_shard,
    write_image_shard,
    write_tar,
)

from pipeline import validate
from pipeline.noising.diffusion import q_posterior, q_sample
from pipeline.output import records
from pipeline.output.manifest import MANIFEST, OutputDir
from pipeline.precompute import run as precompute
from pipeline.run.config import compose
from pipeline.validate import noisehash, report
from pipeline.validate.noisehash import SpillBuckets
from pipeline.validate.report import format_console, format_table
from pipeline.validate.verdict import Highlight, litem, verdict

pytestmark = pytest.mark.usefixtures("ray_session")
CHECKS = (
    "completeness", "record_consistency", "keyed_noise", "epsilon_moments", "epsilon_normality",
    "noise_independence", "variance_preservation", "convergence", "timestep_distribution",
    "conditioning",
)  # fmt: skip


def _build(root, name, *overrides, kind="images"):
    src = root / f"{name}-src"
    src.mkdir()
    for i in range(4):
        if kind == "images":
            write_image_shard(
                src / f"sh-{i}.tar", 48, size=(20, 16), seed=97 * i, key_prefix=f"k{i}_"
            )
        else:
            write_array_shard(src / f"sh-{i}.tar", 48, shape=(4, 8, 8), seed=i, key_prefix=f"k{i}_")
    source = ["source=images", "source.resolution=16"] if kind == "images" else ["source=arrays"]
    cfg = compose(
        ["progress=false", *source, f"source.urls={src}/sh-{{0..3}}.tar",
         f"output.dir={root / name}", "schedule.num_timesteps=100", "sampling.draws_per_sample=2",
         "output.rows_per_group=40", "ray.num_actors=1",
         *overrides]
    )  # fmt: skip
    assert precompute(cfg)["exit_code"] == 0
    return root / name


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Clean datasets: a (x_0 stored, defects are planted on copies of it), b, c (arrays)."""
    root = tmp_path_factory.mktemp("validate")
    return {
        "a": _build(root, "a", "seed=3", "output.store_x0=true"),
        "b": _build(root, "b", "seed=1", "schedule=cosine", "sampling.timesteps=stratified"),
        "c": _build(root, "c", "seed=2", "schedule=scaled_linear", "schedule.num_timesteps=1000",
                    "output.dtype=float32", "sampling.draws_per_sample=1", kind="arrays"),
    }  # fmt: skip


def _validate(path, *overrides):
    cfg = validate.load_config(
        [f"output.dir={path}", "progress=false", "plots=false", "max_consistency_records=0",
         *overrides]
    )  # fmt: skip
    report = validate.run(cfg)
    return report, {c["name"]: c for c in report["checks"]}


def _failed(checks: dict) -> set:
    return {name for name, c in checks.items() if not c["passed"]}


# -- planting defects ------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _read(path):
    pf = pq.ParquetFile(path)
    table = pf.read()
    cols = {}
    for f in table.schema:
        c = table.column(f.name)
        if isinstance(f.type, pa_tensor_type()):
            cols[f.name] = records.tensor_to_numpy(c).copy()
        elif f.name == "key":
            cols[f.name] = c.to_pylist()
        else:
            cols[f.name] = c.to_numpy().copy()
    return pf.schema_arrow, cols


def pa_tensor_type():
    import pyarrow as pa

    return pa.FixedShapeTensorType


def _write(path, schema, cols):
    pq.write_table(records.build_table(schema, cols), path, row_group_size=40)


def _refresh(cols, sched, eps32=None, t_xt=None):
    """Recompute everything derived from (x_0, t, eps) as the worker does (float32, then cast)."""
    out = torch.float16 if cols["x_t"].dtype == np.float16 else torch.float32
    x0 = torch.from_numpy(cols["x_0"].astype(np.float32))
    eps = torch.from_numpy(cols["epsilon"].astype(np.float32) if eps32 is None else eps32)
    t = torch.from_numpy(cols["t"].astype(np.int64))
    x_t = q_sample(sched, x0, t if t_xt is None else torch.from_numpy(t_xt), eps)
    mean, _, _ = q_posterior(sched, x0, x_t, t, out_dtype=out)
    tn = cols["t"].astype(np.int64)
    cols.update(
        x_t=x_t.to(out).numpy(),
        epsilon=eps.to(out).numpy(),
        posterior_mean=mean.numpy(),
        alpha_bar=sched.alphas_cumprod[tn].astype(np.float32),
        posterior_variance=sched.posterior_variance[tn].astype(np.float32),
        posterior_log_variance=sched.posterior_log_variance_clipped[tn].astype(np.float32),
        snr=sched.snr[tn].astype(np.float32),
    )


def _recommit(root, shard):
    """Record a rewritten file's size and checksum in its marker, as a writer that made the
    defect would have: the planted defect is then the only thing wrong."""
    out = OutputDir(str(root))
    marker = out.read_json(OutputDir.marker_name(shard))
    name = OutputDir.data_name(shard)
    marker.update(bytes=out.size(name), checksum=out.checksum(name))
    out.write_json(OutputDir.marker_name(shard), marker)


def _plant(root, shards, fn):
    """Apply fn(cols, sched, shard) to the named shards' files and rewrite them (re-committed)."""
    for shard in shards:
        path = root / f"{shard}.parquet"
        schema, cols = _read(path)
        sched = records.schedule_from_metadata(records.process_metadata(schema))
        fn(cols, sched, shard)
        _write(path, schema, cols)
        _recommit(root, shard)
    return root


def _drop_x0(root):
    """Turn a store_x0=true dataset into one without x_0 (files and manifest agree)."""
    out = OutputDir(str(root))
    for name in out.data_files():
        schema, cols = _read(out.path(name))
        meta = {**records.process_metadata(schema), "store_x0": False}
        cols.pop("x_0")
        new = records.record_schema(meta["shape"], meta["dtype"], False, meta)
        _write(out.path(name), new, cols)
        _recommit(root, name[: -len(".parquet")])
    manifest = out.read_json(MANIFEST)
    manifest["process"]["store_x0"] = False
    out.write_json(MANIFEST, manifest)
    return root


def _scale_noise(cols, sched, shard):
    _refresh(cols, sched, eps32=cols["epsilon"].astype(np.float32) * np.float32(1.05))


def _alpha_bar_of_next_t(cols, sched, shard):
    t = cols["t"].astype(np.int64)
    _refresh(cols, sched, t_xt=np.minimum(t + 1, sched.num_timesteps - 1))


def _skew_t(cols, sched, shard):
    """A sampler bug: t drawn over [0, T/2) instead of [0, T)."""
    u = np.random.default_rng(int(shard[-1])).random(len(cols["t"]))
    cols["t"] = np.floor(sched.num_timesteps // 2 * u).astype(np.int32)
    _refresh(cols, sched)


def _correlate_with_x0(cols, sched, shard, rho=0.05):
    x0 = cols["x_0"].astype(np.float64)
    z = (x0 - x0.mean(axis=(0, 2, 3), keepdims=True)) / x0.std(axis=(0, 2, 3), keepdims=True)
    eps = rho * z + np.sqrt(1 - rho**2) * cols["epsilon"].astype(np.float64)
    _refresh(cols, sched, eps32=eps.astype(np.float32))


# -- clean data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_clean_datasets_pass(base, name, tmp_path):
    report, checks = _validate(base[name], "max_consistency_records=300")
    assert report["exit_code"] == 0, {k: c["summary"] for k, c in checks.items() if not c["passed"]}
    assert set(checks) == set(CHECKS)
    assert checks["keyed_noise"]["detail"]["items"][0]["checked"] == min(
        300, report["summary"]["records"]
    )
    # scaled_linear keeps sqrt(alpha_bar_T) = 0.068 of x_0 at t = T-1: a warning, not a failure
    expect_warning = name == "c"
    assert (checks["convergence"]["severity"] == "warning") == expect_warning
    if expect_warning:
        assert "zero_terminal_snr=true" in checks["convergence"]["summary"]


# -- planted defects -------------------------------------------------------------------------


def test_a_top_bin_too_small_for_corr_says_so_not_that_x0_is_missing(base, tmp_path):
    """x_0 stored, but the top t-bin (t = 99 of 100) keeps 2 records (the others are moved to
    t = 98, x_t and posterior rebuilt): corr(x_T, x_0) is not checked, and the note gives that
    reason, not "x_0 not stored"."""
    kept = []

    def fewer_at_top(cols, sched, shard):
        top = np.flatnonzero(cols["t"] >= 99)
        keep = top[: max(0, 2 - len(kept))]
        kept.extend(keep)
        cols["t"][np.setdiff1d(top, keep)] = 98
        _refresh(cols, sched)

    d = _plant(_copy(base["a"], tmp_path / "d"), [f"sh-{i}" for i in range(4)], fewer_at_top)
    assert len(kept) == 2
    _, checks = _validate(d)
    notes = checks["convergence"]["detail"]["notes"]
    said = [t for t in notes if "corr(x_T, x_0) NOT checked" in t]
    assert said == ["corr(x_T, x_0) NOT checked: the top t-bin holds 2 of the 3 records it needs"]


def test_noise_scaled_in_one_shard(base, tmp_path):
    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-2"], _scale_noise)
    report, checks = _validate(d)
    assert report["exit_code"] == 1
    assert "epsilon_moments" in _failed(checks)
    bad = [i for i in checks["epsilon_moments"]["detail"]["items"] if not i["passed"]]
    assert any(i["where"] == "shard sh-2" and i["quantity"] == "var" for i in bad)
    assert not any(i["where"].startswith("shard sh-") and i["where"] != "shard sh-2" for i in bad)
    assert {"record_consistency", "completeness"}.isdisjoint(_failed(checks))


def test_noise_copied_between_shards(base, tmp_path):
    _, donor = _read(base["a"] / "sh-0.parquet")

    def copy_noise(cols, sched, shard):
        _refresh(cols, sched, eps32=donor["epsilon"].astype(np.float32))

    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-3"], copy_noise)
    report, checks = _validate(d)
    assert report["exit_code"] == 1
    assert "noise_independence" in _failed(checks)
    dup = checks["noise_independence"]["detail"]["items"][0]
    assert dup["value"] == 2 * 96 and ["sh-0", "sh-3"] in dup["examples"]
    assert {"epsilon_moments", "record_consistency"}.isdisjoint(_failed(checks))


@pytest.mark.parametrize("store_x0", [True, False])
def test_x_t_with_alpha_bar_of_next_t(base, tmp_path, store_x0):
    d = _plant(
        _copy(base["a"], tmp_path / "d"), ["sh-0", "sh-1", "sh-2", "sh-3"], _alpha_bar_of_next_t
    )
    if not store_x0:
        _drop_x0(d)
    report, checks = _validate(d)
    assert report["exit_code"] == 1
    if store_x0:  # checked record by record
        assert "record_consistency" in _failed(checks)
    else:  # only the statistics can tell: the noise enters x_t with the wrong coefficient
        assert {"variance_preservation", "noise_independence"} <= _failed(checks)
    assert {"epsilon_moments", "timestep_distribution"}.isdisjoint(_failed(checks))


def test_missing_shard_file(base, tmp_path):
    d = _copy(base["a"], tmp_path / "d")
    (d / "sh-1.parquet").unlink()
    report, checks = _validate(d)
    assert report["exit_code"] == 1 and _failed(checks) == {"completeness"}
    item = next(
        i for i in checks["completeness"]["detail"]["items"] if i["quantity"] == "missing files"
    )
    assert item["value"] == 1 and item["examples"][0].endswith("sh-1.parquet")


def test_corrupt_file_and_stray_file(base, tmp_path):
    d = _copy(base["a"], tmp_path / "d")
    shutil.copy(d / "sh-0.parquet", d / "old-run-7.parquet")  # a leftover a glob reader would take
    (d / "sh-2.parquet").write_bytes(b"PAR1 not really")
    report, checks = _validate(d)
    assert report["exit_code"] == 1 and _failed(checks) == {"completeness"}
    items = {i["quantity"]: i for i in checks["completeness"]["detail"]["items"]}
    assert items["unreadable files"]["value"] == 1
    assert items["files not in the manifest"]["examples"][0].endswith("old-run-7.parquet")
    assert report["summary"]["records"] == 3 * 96  # the other shards were validated


def test_timesteps_skewed_in_some_shards(base, tmp_path):
    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-1", "sh-3"], _skew_t)
    report, checks = _validate(d)
    assert report["exit_code"] == 1
    assert "timestep_distribution" in _failed(checks)
    bad = {
        i["where"] for i in checks["timestep_distribution"]["detail"]["items"] if not i["passed"]
    }
    assert {"shard sh-1", "shard sh-3"} <= bad and "shard sh-0" not in bad
    assert {"record_consistency", "epsilon_moments"}.isdisjoint(_failed(checks))


@pytest.mark.parametrize("store_x0", [True, False])
def test_noise_correlated_with_x0(base, tmp_path, store_x0):
    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-0"], _correlate_with_x0)
    if not store_x0:
        _drop_x0(d)
    report, checks = _validate(d)
    assert report["exit_code"] == 1
    assert "noise_independence" in _failed(checks)
    bad = [i for i in checks["noise_independence"]["detail"]["items"] if not i["passed"]]
    assert any(i["where"] == "shard sh-0" and i["quantity"] == "corr(eps, x_0)" for i in bad)
    lines = [x for x in format_console(report).splitlines() if x.startswith("  noise_indep")]
    assert sum("shard sh-0:" in x for x in lines) == 1, lines  # listed once
    assert "record_consistency" not in _failed(checks)


def test_keyed_noise_regeneration_catches_rewritten_noise(base, tmp_path):
    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-2"], _scale_noise)
    _, checks = _validate(d, "max_consistency_records=100")
    k = checks["keyed_noise"]
    assert not k["passed"]
    eps_item = next(i for i in k["detail"]["items"] if i["quantity"].startswith("eps"))
    assert 0 < eps_item["value"] <= eps_item["checked"] and eps_item["checked"] >= 100
    # the console names the damaged shard and its count
    report, _ = _validate(d, "max_consistency_records=100")
    lines = [x for x in format_console(report).splitlines() if x.startswith("  keyed_noise")]
    assert any(re.search(r"shard sh-2: .* = [1-9]\d* \(limit 0\)", x) for x in lines), lines


def test_a_check_with_zero_items_is_skip_not_pass(base):
    report, checks = _validate(base["a"])  # max_consistency_records=0: nothing regenerated
    k = checks["keyed_noise"]
    assert k["passed"] and k["detail"]["n_items"] == 0
    assert k["summary"].startswith("skipped: nothing to check (skipped: max_consistency_records")
    (row,) = [x for x in format_table(report).splitlines() if x.startswith("keyed_noise ")]
    assert row.split()[1] == "SKIP", row


def test_inconsistent_x_t_is_caught_record_by_record(base, tmp_path):
    def nudge(cols, sched, shard):  # one element of one record off by 1%
        cols["x_t"][5, 0, 3, 3] *= np.float16(1.01)

    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-0"], nudge)
    _, checks = _validate(d)
    assert _failed(checks) == {"record_consistency"}
    item = next(
        i
        for i in checks["record_consistency"]["detail"]["items"]
        if i["quantity"].startswith("x_t")
    )
    assert item["value"] == 1 and item["worst"]["shard"] == "sh-0"


# -- report and exit codes -------------------------------------------------------------------


def test_report_files_and_exit_code_0(base, capsys):
    assert validate.main([f"output.dir={base['b']}", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "epsilon_moments" in out and "report:" in out
    rep = base["b"] / "validation"
    report = json.loads((rep / "report.json").read_text())  # strict JSON: no NaN
    assert report["format"] == "ddpm-validation/1" and report["passed"] is True
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    for c in report["checks"]:
        assert {"name", "passed", "severity", "statistic", "threshold", "detail"} <= set(c)
    assert report["terminal"]["alpha_bar_T"] > 0 and report["summary"]["records"] == 4 * 48 * 2
    md = (rep / "report.md").read_text()
    assert "| check | verdict |" in md and "variance_preservation" in md
    # highlights are data: x_0 not stored (b), Var(x_0) = 1/3; each printed under the table
    found = {
        (c["name"], h["kind"], h["subject"]) for c in report["checks"] for h in c["highlights"]
    }
    assert found == {
        ("record_consistency", "not_checked", "x_t"),
        ("record_consistency", "not_checked", "posterior_mean"),
        ("convergence", "not_checked", "corr(x_T, x_0)"),
        ("variance_preservation", "data", "Var(x_0)"),
    }
    for c in report["checks"]:
        for h in c["highlights"]:
            assert f"note ({c['name']}): {h['text']}" in out and h["text"] in c["detail"]["notes"]
    for png in (
        "var_mean_over_t.png",
        "schedule.png",
        "eps_hist.png",
        "qq_x_T.png",
        "t_hist.png",
        "noising_strip.png",
    ):
        assert (rep / png).read_bytes()[:4] == b"\x89PNG" and png in report["plots"]


def test_exit_code_1_on_a_failed_check(base, tmp_path, capsys):
    d = _copy(base["a"], tmp_path / "d")
    (d / "sh-0.parquet").unlink()
    assert validate.main([f"output.dir={d}", "progress=false", "plots=false"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_exit_code_2_when_it_cannot_run(tmp_path, capsys):
    assert validate.main([f"output.dir={tmp_path / 'nope'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert validate.main([f"output.dir={tmp_path}"]) == 2
    assert f"no _manifest.json in {tmp_path}" in capsys.readouterr().err
    assert validate.main([]) == 2
    assert "output.dir" in capsys.readouterr().err
    assert validate.main([f"output.dir={tmp_path}", "z=-1"]) == 2
    assert "config key z" in capsys.readouterr().err
    assert validate.main([f"output.dir={tmp_path}", "no_such_key=1"]) == 2


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"garbage{", r"_manifest\.json is not valid JSON"),
        (b"[1]", r"_manifest\.json is a JSON list"),
    ],
)
def test_a_damaged_manifest_is_exit_2_naming_it(base, tmp_path, capsys, content, pattern):
    d = _copy(base["c"], tmp_path / "d")
    (d / MANIFEST).write_bytes(content)
    assert validate.main([f"output.dir={d}", "progress=false", "plots=false"]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda m: b"not json", "sh-1.json is not valid JSON"),
        (  # JSON, but its files are no file entries
            lambda m: json.dumps({**m, "files": [{"bytes": 1}]}).encode(),
            "sh-1.json is not a commit marker (its 'files' [{'bytes': 1}] is not a list of "
            "entries with a 'name')",
        ),
        (  # a marker naming a file of another shard: never read, never trusted
            lambda m: json.dumps({**m, "file": "sh-0.parquet"}).encode(),
            "sh-1.json names a file 'sh-0.parquet' that is not one of shard 'sh-1'",
        ),
    ],
)
def test_a_damaged_marker_fails_completeness_naming_it(base, tmp_path, damage, said):
    d = _copy(base["c"], tmp_path / "d")
    path = d / "_shards" / "sh-1.json"
    path.write_bytes(damage(json.loads(path.read_bytes())))
    report, checks = _validate(d)
    assert report["exit_code"] == 1 and _failed(checks) == {"completeness"}
    items = {i["quantity"]: i for i in checks["completeness"]["detail"]["items"]}
    bad = items["damaged or mismatching commit markers"]
    assert bad["value"] == 1 and said in bad["examples"][0]


def test_an_unwritable_report_dir_is_exit_2_naming_the_key(base, tmp_path, capsys):
    d = _copy(base["c"], tmp_path / "d")
    shutil.rmtree(d / "validation", ignore_errors=True)
    (d / "validation").write_bytes(b"a file where the report directory would go")
    assert validate.main([f"output.dir={d}", "progress=false", "plots=false"]) == 2
    assert "set output.report_dir" in capsys.readouterr().err
    report_dir = tmp_path / "elsewhere"
    args = [f"output.dir={d}", f"output.report_dir={report_dir}", "progress=false", "plots=false"]
    assert validate.main(args) == 0 and (report_dir / "report.json").exists()


def test_an_empty_dataset_fails(tmp_path):
    members = [(f"k{i}.npy", npy_bytes(np.full((2, 2), np.nan, np.float32))) for i in range(3)]
    write_tar(tmp_path / "a.tar", members)
    cfg = compose(
        ["progress=false", "source=arrays", "source.shape=[2,2]", f"source.urls={tmp_path}/a.tar",
         f"output.dir={tmp_path}/o"]
    )  # fmt: skip
    assert precompute(cfg)["exit_code"] == 1
    report, checks = _validate(tmp_path / "o")
    assert report["exit_code"] == 1 and "completeness" in _failed(checks)
    items = {i["quantity"]: i for i in checks["completeness"]["detail"]["items"]}
    assert items["no records"]["value"] == 1


# -- report rendering and verdicts (no dataset) ------------------------------------------------


def _check(name, notes, highlights):
    return {
        "name": name, "passed": True, "severity": "info", "statistic": 0.5, "threshold": 1.0,
        "summary": "1 items passed", "highlights": highlights,
        "detail": {"statistic_name": "given", "items": [], "notes": notes},
    }  # fmt: skip


def test_console_prints_highlights_not_notes_that_look_alike():
    h = {"kind": "data", "subject": "Var(x_0)", "text": "data has a small spread"}
    rep = {
        "passed": True, "report_dir": "/r",
        "checks": [_check("a", ["x NOT checked, but only a note"], []),
                   _check("b", ["plain", h["text"]], [h])],
    }  # fmt: skip
    out = report.format_console(rep)
    assert "note (b): data has a small spread" in out
    assert "NOT checked" not in out and out.endswith("PASSED; report: /r/report.md")


def test_verdict_takes_keywords_and_keeps_highlights_in_order():
    item = litem("overall", "problems", 0, 0)
    h = Highlight("not_checked", "corr(eps, x_0)", "corr(eps, x_0) NOT checked")
    c = verdict("x", [[item]], z=5.0, correct=True, notes=["first", h, "last"])
    assert c.passed and c.detail["notes"] == ["first", h.text, "last"] and c.highlights == [h]
    with pytest.raises(TypeError):
        verdict("x", [[item]], 5.0, True)  # z and correct are keyword-only
    with pytest.raises(ValueError, match="not_checked"):
        Highlight("important", "x", "text")


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_noise_copied_between_shards_is_found_across_hash_buckets(
    base, tmp_path, monkeypatch, executor
):
    """The duplicate check partitioned by hash prefix (16 buckets of spill files, each checked
    alone by a pool process or a Ray task): the verdict is that of one sort."""
    _, donor = _read(base["a"] / "sh-0.parquet")

    def copy_noise(cols, sched, shard):
        _refresh(cols, sched, eps32=donor["epsilon"].astype(np.float32))

    seen = []
    leave = SpillBuckets.__exit__

    def spy(self, *exc):
        seen.append((self.buckets, sum(map(self.bucket_records, range(self.buckets)))))
        return leave(self, *exc)

    monkeypatch.setattr(noisehash, "MIN_BUCKETS", 16)
    monkeypatch.setattr(SpillBuckets, "__exit__", spy)
    d = _plant(_copy(base["a"], tmp_path / "d"), ["sh-3"], copy_noise)
    report, checks = _validate(d, f"executor={executor}")
    assert report["summary"]["executor"] == executor
    dup = checks["noise_independence"]["detail"]["items"][0]
    assert dup["value"] == 2 * 96 and ["sh-0", "sh-3"] in dup["examples"]
    assert seen == [(16, report["summary"]["records"])]


@pytest.mark.parametrize("damage", ["flip", "rewrite"])
def test_a_file_changed_since_its_commit_fails_completeness_naming_it(base, tmp_path, damage):
    """A flipped sign in one x_t value (same size) or the file rewritten by pyarrow as valid
    Parquet of another size: the marker's checksum catches both, naming the file."""
    d = _copy(base["c"], tmp_path / "d")
    path = d / "sh-1.parquet"
    if damage == "flip":
        size = path.stat().st_size
        flip_an_x_t_sign(path)
        assert path.stat().st_size == size
    else:
        pq.write_table(pq.read_table(path), path, compression="snappy")
    report, checks = _validate(d)
    assert report["exit_code"] == 1 and "completeness" in _failed(checks)
    items = {i["quantity"]: i for i in checks["completeness"]["detail"]["items"]}
    bad = items["files changed since their commit"]
    assert bad["value"] == 1 and str(path) in bad["examples"][0], bad
    assert ("checksum" if damage == "flip" else "bytes") in bad["examples"][0]


def test_markers_without_checksum_are_checked_by_size_and_said(base, tmp_path):
    """Markers written before checksums existed keep passing; a note says how many."""
    d = _copy(base["c"], tmp_path / "d")
    out = OutputDir(str(d))
    for sid in ("sh-0", "sh-1"):
        marker = out.read_json(out.marker_name(sid))
        del marker["checksum"]
        out.write_json(out.marker_name(sid), marker)
    report, checks = _validate(d)
    assert report["exit_code"] == 0, _failed(checks)
    notes = checks["completeness"]["detail"]["notes"]
    assert any("2 committed files have no checksum" in n for n in notes), notes
