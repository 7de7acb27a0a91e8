"""pipeline.validate.report and pipeline.validate.plots: report.md parses as Markdown, report.html
embeds every plot, the plots' data (bands, strip, eps per channel) agree with the records.

Datasets are built by the real precompute on tiny shards (as in test_validate.py): images
(16 x 16 RGB, x_0 stored) and 4-channel arrays (the shape of latents, x_0 not stored).
"""

from __future__ import annotations

import base64
import re
from dataclasses import replace

import numpy as np
import pytest
from shards import write_array_shard, write_image_shard

from pipeline import validate
from pipeline.precompute import run as precompute
from pipeline.run.config import compose
from pipeline.validate import plots
from pipeline.validate.measures import split_strip, strip_item

pytestmark = pytest.mark.usefixtures("ray_session")


def _build(root, name, *overrides, kind="images"):
    src = root / f"{name}-src"
    src.mkdir()
    for i in range(2):
        if kind == "images":
            write_image_shard(src / f"sh-{i}.tar", 40, size=(16, 16), seed=i, key_prefix=f"k{i}_")
        else:
            write_array_shard(src / f"sh-{i}.tar", 40, shape=(4, 8, 8), seed=i, key_prefix=f"k{i}_")
    source = ["source=images", "source.resolution=16"] if kind == "images" else ["source=arrays"]
    cfg = compose(
        ["progress=false", *source, f"source.urls={src}/sh-{{0..1}}.tar",
         f"output.dir={root / name}", "schedule.num_timesteps=100", "ray.num_actors=1",
         *overrides]
    )  # fmt: skip
    assert precompute(cfg)["exit_code"] == 0
    return root / name


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """name -> (report dict, report directory) of validated datasets, plots on."""
    root = tmp_path_factory.mktemp("report")
    built = {
        "images": _build(root, "images", "output.store_x0=true"),
        "arrays": _build(
            root, "arrays", "schedule=cosine", "sampling.timesteps=stratified", kind="arrays"
        ),
    }
    out, seen, draw = {}, {}, plots.write_plots

    def keep(*args, **kw):  # the merged statistics the plots were drawn from
        seen.update(ds=kw["ds"], schedule=kw["schedule"])
        return draw(*args, **kw)

    plots.write_plots = keep
    try:
        for name, path in built.items():
            cfg = validate.load_config([f"output.dir={path}", "progress=false"])
            out[name] = (validate.run(cfg), path / "validation", dict(seen))
    finally:
        plots.write_plots = draw
    return out


def _tables(md: str) -> list[list[list[str]]]:
    """Every table of ``md`` as rendered by markdown-it (GFM tables): rows of cell texts."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    tables, row, cell = [], None, None
    for tok in tokens:
        if tok.type == "table_open":
            tables.append([])
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "tr_close":
            tables[-1].append(row)
        elif tok.type in ("th_open", "td_open"):
            cell = ""
        elif tok.type == "inline" and cell is not None:
            cell = tok.content
        elif tok.type in ("th_close", "td_close"):
            row.append(cell)
            cell = None
    return tables


def test_markdown_table_parses_with_one_cell_per_column(reports):
    report, rep, _ = reports["images"]
    md = (rep / "report.md").read_text()
    tables = _tables(md)
    checks = tables[0]
    assert checks[0] == ["check", "verdict", "statistic", "value", "limit", "summary"]
    assert [r[0] for r in checks[1:]] == [c["name"] for c in report["checks"]]
    assert all(len(r) == 6 for r in checks)
    # the statistic names survive intact, pipes included (escaped in the source)
    assert [r[2] for r in checks[1:]] == [c["detail"]["statistic_name"] for c in report["checks"]]
    assert any("|" in c["detail"]["statistic_name"] for c in report["checks"])
    for t in tables:
        assert len({len(r) for r in t}) == 1


def test_cell_escapes_pipes_and_line_breaks():
    from pipeline.validate.report import _cell

    assert _cell("max |z|") == "max \\|z\\|"
    assert _cell("a\nb  c") == "a b c" and _cell(None) == "-" and _cell(0.123456) == "0.1235"


PLOTS = {"var_mean_over_t.png", "schedule.png", "t_hist.png", "eps_hist.png", "noising_strip.png"}


@pytest.mark.parametrize("name", ["images", "arrays"])
def test_html_is_one_file_with_every_plot_embedded(reports, name):
    report, rep, _ = reports[name]
    assert PLOTS <= set(report["plots"])
    page = (rep / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == len(report["plots"]) and not re.search(r'href="', page)
    for src, png in zip(srcs, report["plots"]):
        data = src.removeprefix("data:image/png;base64,")
        assert base64.b64decode(data) == (rep / png).read_bytes()
    for c in report["checks"]:
        assert f"<h2>{c['name']} " in page
    assert "max |z|" in page  # in a table cell, escaped only for HTML


@pytest.mark.parametrize("name", ["images", "arrays"])
def test_bands_are_the_checks_own_items_for_every_bin(reports, name):
    report, _, seen = reports[name]
    vp = next(c for c in report["checks"] if c["name"] == "variance_preservation")
    ds, bands = seen["ds"], vp["detail"]["bands"]
    drawn = {q for q, _, _ in plots._MOMENTS}
    assert drawn <= {b["quantity"] for b in bands}
    per_bin = np.add.reduceat(ds.t_hist, np.asarray(ds.plan.edges[:-1]))
    tested = [b for b in range(ds.plan.bins) if per_bin[b] >= 3]  # the check's minimum
    assert len(tested) >= ds.plan.bins - 1
    assert sorted(b["bin"] for b in bands if b["quantity"] in drawn) == sorted(tested * 3)
    for b in bands:
        assert b["passed"] == (abs(b["value"] - b["expected"]) <= b["tolerance"])
        assert b["tolerance"] > 0 and b["where"].endswith("all channels")
    assert vp["detail"]["n_items"] > len(vp["detail"]["items"])  # the report keeps only some


@pytest.mark.parametrize("name", ["images", "arrays"])
def test_strip_records_satisfy_the_forward_process(reports, name):
    """Each kept record's x_t is sqrt(ab) x_0 + sqrt(1 - ab) eps at its own t (x_0 stored for
    images, reconstructed for arrays): the strip draws the records' own x_0 and eps."""
    _, _, seen = reports[name]
    ds, ab = seen["ds"], seen["schedule"].alphas_cumprod
    rows = ds.strip.sample()
    positions = int(ds.t_hist.sum()) * ds.plan.P  # eps_ch keeps one [C] vector per position
    assert len(rows) == 4 and len(ds.eps_ch) == min(ds.plan.reservoir_size, positions)
    assert ds.eps_ch.sample().shape[1] == ds.plan.shape[0]
    x0, eps, xt, t = split_strip(rows.astype(np.float64), ds.plan.shape)
    a = ab[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, xt, atol=1e-2)
    assert np.abs(eps).max() < 8 and eps.std() == pytest.approx(1, abs=0.15)
    back = split_strip(strip_item(x0, eps, xt, t), ds.plan.shape)
    for want, got in zip((x0, eps, xt, t), back):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_titles_name_dataset_schedule_encoder_and_verdict(reports):
    report, _, seen = reports["arrays"]
    ctx = plots.context(report, seen["ds"].plan.process)
    assert ctx == f"{report['dataset']} | schedule cosine T=100 | no encoder (arrays)"
    enc = replace(seen["ds"].plan.process, encoder={"model": "stabilityai/sd-vae-ft-mse"})
    assert plots.context(report, enc).endswith(
        "encoder stabilityai/sd-vae-ft-mse (images -> latents)"
    )
    c = {"name": "x", "passed": True, "severity": "info", "statistic": 0.5, "threshold": 1e-6,
         "detail": {"statistic_name": "min p-value"}}  # fmt: skip
    assert plots.verdict_text(c) == "x: PASS (min p-value 0.5 >= 1e-06)"
    c.update(passed=False, severity="error", statistic=7.0, threshold=5.0)
    c["detail"]["statistic_name"] = "max |z|"
    assert plots.verdict_text(c) == "x: FAIL (max |z| 7 vs 5)"


# -- the decoded x_0 of latent records ----------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dataset(tmp_path_factory):
    """Latent records of a tiny random VAE (images 16 x 16 -> latents 4 x 8 x 8, x_0 stored),
    the VAE folder and the validated report; write_plots' strip calls are recorded."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    from jobs.bench.encoder import TINY

    root = tmp_path_factory.mktemp("vae-report")
    folder = root / "vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**TINY, scaling_factor=0.5, shift_factor=0.1).save_pretrained(
        folder, safe_serialization=True
    )
    path = _build(root, "latents", "encoder=vae", f"encoder.model={folder}",
                  "encoder.latent=mean", "output.store_x0=true")  # fmt: skip
    calls, strip = [], plots._strip

    def spy(*args, **kw):
        calls.append(kw)
        return strip(*args, **kw)

    plots._strip = spy
    try:
        report = validate.run(validate.load_config([f"output.dir={path}", "progress=false"]))
    finally:
        plots._strip = strip
    return path, folder, report, calls


def _strip_figure(kw, decode, note=""):
    """The strip's matplotlib figure for the recorded call ``kw`` with ``decode``/``note``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    plots._strip(plt, lambda fig, name: figs.append(fig), **{**kw, "decode": decode, "note": note})
    return figs[0]


def test_strip_draws_x0_decoded_by_the_recorded_vae(vae_dataset):
    import diffusers
    import torch

    path, folder, report, calls = vae_dataset
    assert "noising_strip.png" in report["plots"] and len(calls) == 1
    kw = calls[0]
    assert kw["decode"] is not None and kw["note"].startswith("decoded x_0: ")
    ds = kw["ds"]
    x0, _, _, _ = split_strip(ds.strip.sample().astype(np.float64), ds.plan.shape)
    assert x0.shape[1:] == (4, 8, 8)
    vae = diffusers.AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
    with torch.no_grad():  # diffusers' own decode of the unscaled latents
        want = vae.decode(torch.from_numpy(x0 / 0.5 + 0.1).float()).sample.double().numpy()
    got = kw["decode"](x0)
    assert got.shape == (len(x0), 3, 16, 16)
    np.testing.assert_allclose(got, want, atol=1e-5)
    fig = _strip_figure(kw, kw["decode"], kw["note"])
    ncol = len({int(round(f * 99)) for f in plots.STRIP_FRACTIONS}) + 3
    assert len(fig.axes) == len(x0) * ncol
    first = fig.axes[0]
    assert first.get_title() == "x_0 (stored) decoded by the VAE"
    np.testing.assert_allclose(
        first.images[0].get_array(), np.moveaxis(np.clip((want[0] + 1) / 2, 0, 1), 0, -1),
        atol=1e-5,
    )  # fmt: skip
    assert fig.axes[1].get_title() == "x_0 (stored)"  # then the latent channels, as before
    assert "decoded x_0: " in fig._suptitle.get_text()


def test_strip_without_the_recorded_vae_says_why(vae_dataset, tmp_path):
    import shutil

    import diffusers
    import torch

    from jobs.bench.encoder import TINY

    path, folder, report, calls = vae_dataset
    meta = calls[0]["ds"].plan.process.encoder
    assert plots.vae_decoder(None) == (None, "")
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    decode, note = plots.vae_decoder({**meta, "folder": str(tmp_path / "gone")})
    assert decode is None and "decoded x_0 not drawn: " in note and "does not exist" in note
    torch.manual_seed(1)  # other weights at the recorded path: not the VAE the records used
    vae = diffusers.AutoencoderKL(**TINY, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(moved, safe_serialization=True)
    decode, note = plots.vae_decoder({**meta, "folder": str(moved)})
    assert decode is None and "diffusion_pytorch_model.safetensors: sha256" in note
    fig = _strip_figure(calls[0], decode, note)
    assert fig.axes[0].get_title() == "x_0 (stored)" and note in fig._suptitle.get_text()
