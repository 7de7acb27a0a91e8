"""pipeline.report: report.md parses as Markdown, the plots and report.html are written.

Datasets are built by the real precompute on tiny shards (as in test_validate.py): images
(16 x 16 RGB, x_0 stored) and 4-channel arrays (the shape of latents, x_0 not stored).
"""

from __future__ import annotations

import pytest
from shards import write_array_shard, write_image_shard

from pipeline import validate
from pipeline.config import compose
from pipeline.precompute import run as precompute

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
    out = {}
    for name, path in built.items():
        cfg = validate.load_config([f"output.dir={path}", "progress=false"])
        out[name] = (validate.run(cfg), path / "validation")
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
    report, rep = reports["images"]
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
    from pipeline.report import _cell

    assert _cell("max |z|") == "max \\|z\\|"
    assert _cell("a\nb  c") == "a b c" and _cell(None) == "-" and _cell(0.123456) == "0.1235"
