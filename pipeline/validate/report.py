"""Render a validation report: ``report.json``, ``report.md``, ``report.html`` (one
self-contained file, the plots embedded as base64 PNG, to paste into a review), PNG plots
(:mod:`pipeline.validate.plots`) and the console text.

:func:`pipeline.validate.run` builds the report (a dict: the checks as
:func:`dataclasses.asdict` of :class:`pipeline.validate.verdict.Check`, the dataset's summary, the
schedule's terminal figures, the config); :func:`write_report` writes it and its plots to the
report directory, :func:`format_console` is what the CLI prints. Renderers read only the report
dict (the plots also read the merged statistics), and a check's highlights come as data
(``check["highlights"]``), so nothing here matches words in the notes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from pipeline.output.manifest import OutputDir

if TYPE_CHECKING:
    from pipeline.validate.measures import DatasetStats

REPORT_FORMAT = "ddpm-validation/1"
CONSOLE_ITEMS = 3  # failed items printed per check; the rest are in report.md


def schedule_summary(desc: dict) -> dict:
    """The report's figures of the process: name, T and DDPM's zero_terminal_snr, or flow's
    family, shift and dynamic shift."""
    keys = ("name", "num_timesteps", "zero_terminal_snr", "family", "shift", "dynamic_shift")
    return {k: desc[k] for k in keys if k in desc}


def schedule_text(sch: dict) -> str:
    """``linear T=1000 (zero_terminal_snr=False)``; ``flow T=1000 (shift=3.0)`` or
    ``flow T=1000 (dynamic shift)``."""
    if sch.get("family") == "flow":
        how = "dynamic shift" if sch.get("dynamic_shift") else f"shift={sch.get('shift')}"
    else:
        how = f"zero_terminal_snr={sch.get('zero_terminal_snr')}"
    return f"{sch['name']} T={sch['num_timesteps']} ({how})"


def terminal_text(report: dict) -> str:
    """The report's line of terminal figures: ``Terminal figures (t = T-1): alpha_bar_T = ...``
    for DDPM, ``Terminal figures (last grid point, t = sigma_T T = 1000): sigma_T = 1, ...`` for
    rectified flow (its t is sigma T, not the grid index)."""
    term, sch = report["terminal"], report["summary"]["schedule"]
    where = "t = T-1"
    if sch.get("family") == "flow":
        t = term.get("sigma_T", float("nan")) * sch["num_timesteps"]
        where = f"last grid point, t = sigma_T T = {_num(t)}"
    return f"Terminal figures ({where}): " + ", ".join(f"{k} = {_num(v)}" for k, v in term.items())


def dataset_summary(manifest: dict, ds: DatasetStats, noise) -> dict:
    """The report's ``summary`` block: what was validated (shards, records, process)."""
    p, t = ds.plan.process, manifest.get("totals", {})
    return {
        "shards": len(manifest.get("shards", {})),
        "scanned_shards": len(ds.shards),
        "records": int(ds.t_hist.sum()),
        **{k: t.get(k) for k in ("samples", "rejected")},
        "schedule": schedule_summary(p.schedule),
        **{"sampler": noise.sampler, "draws_per_sample": noise.draws, "seed": noise.seed},
        "dtype": p.dtype,
        "shape": [int(s) for s in ds.plan.shape],  # buckets: the most populated bucket's
        "store_x0": p.store_x0,
        "source_kind": ds.source_kind or (p.source or {}).get("kind"),
        "t_bins": list(ds.plan.edges),
        "executor": ds.executor,
    }


def write_report(
    report: dict,
    ds: DatasetStats,
    schedule,
    *,
    out: OutputDir,
    report_dir: str | None,
    plots: bool,
) -> None:
    """Write report.json, report.md, report.html and (with ``plots``) the PNG plots to
    ``report_dir``, or to
    ``<out>/validation/`` when it is None; adds ``plots`` (file names) and ``report_dir`` (its
    display name) to ``report``."""
    rep = OutputDir(report_dir) if report_dir else out
    prefix = "" if report_dir else "validation/"
    rep.makedirs(prefix.rstrip("/"))
    drawn = []
    if plots:
        from pipeline.validate.plots import write_plots  # matplotlib: only when plots are drawn

        drawn = write_plots(rep, prefix, ds=ds, schedule=schedule, report=report)
    report["plots"] = drawn
    report["report_dir"] = rep.display(prefix.rstrip("/")) if prefix else rep.display()
    rep.write_bytes(prefix + "report.json", to_json(report).encode())
    rep.write_bytes(prefix + "report.md", format_markdown(report).encode())
    images = {name: rep.read_bytes(prefix + name) for name in drawn}
    rep.write_bytes(prefix + "report.html", format_html(report, images).encode())


# -- JSON ------------------------------------------------------------------------------------


def _clean(v):
    """JSON-ready: numpy scalars/arrays to Python, non-finite floats to null."""
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def to_json(report: dict) -> str:
    """The report as strict JSON (no NaN: non-finite numbers become null)."""
    return json.dumps(_clean(report), indent=2, sort_keys=False, allow_nan=False) + "\n"


# -- text and Markdown -----------------------------------------------------------------------


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(v) -> str:
    """A Markdown table cell: ``|`` escaped (``max |z|`` would split the cell), line breaks and
    surrounding spaces removed, so every row keeps its columns in any renderer."""
    text = v if isinstance(v, str) else _num(v)
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|")


def _row(*cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _verdict_word(c: dict) -> str:
    if c["passed"] and c["detail"].get("n_items") == 0:
        return "SKIP"  # zero items checked: the summary says why
    return "FAIL" if not c["passed"] else "WARN" if c["severity"] == "warning" else "PASS"


def _failed_items(c: dict) -> list[dict]:
    return [i for i in c["detail"].get("items", []) if not i.get("passed", True)]


def format_table(report: dict) -> str:
    """The short summary table: one line per check."""
    rows = [f"{'check':<22} {'verdict':<7} {'statistic':<22} {'value':>9} {'limit':>9}  summary"]
    for c in report["checks"]:
        rows.append(
            f"{c['name']:<22} {_verdict_word(c):<7} {c['detail']['statistic_name']:<22} "
            f"{_num(c['statistic']):>9} {_num(c['threshold']):>9}  {c['summary'][:100]}"
        )
    return "\n".join(rows)


def format_console(report: dict) -> str:
    """What the CLI prints: the table, the first failed items and the highlights of each
    check, and the verdict with the report's location."""
    from pipeline.validate.verdict import (
        describe,  # here: it imports scipy, which scan processes need not
    )

    lines = [format_table(report)]
    for c in report["checks"]:
        bad, places = [], set()
        for i in _failed_items(c):  # a shard failing several items is listed once
            if i["where"] == "overall" or i["where"] not in places:
                places.add(i["where"])
                bad.append(i)
        lines += [f"  {c['name']} {i['severity']}: {describe(i)}" for i in bad[:CONSOLE_ITEMS]]
        if len(bad) > CONSOLE_ITEMS:
            lines.append(f"  {c['name']}: {len(bad) - CONSOLE_ITEMS} more in the report")
        lines += [f"  note ({c['name']}): {h['text']}" for h in c.get("highlights", [])]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(f"{verdict}; report: {report['report_dir']}/report.md")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """report.md: the verdict and dataset, the table, then per check its notes, failed items
    (up to 20) and, for variance_preservation, the per-t-bin table; then the plots."""
    from pipeline.validate.verdict import describe

    s = report["summary"]
    sch = s["schedule"]
    lines = [
        f"# Validation of `{report['dataset']}`",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** (exit code {report['exit_code']}); "
        f"{s['records']} records in {s['scanned_shards']} of {s['shards']} shards; schedule "
        f"{schedule_text(sch)}, sampler {s['sampler']}, K={s['draws_per_sample']}, "
        f"{s['dtype']} {s['shape']}, store_x0={s['store_x0']}, source {s['source_kind']}.",
        "",
        "| check | verdict | statistic | value | limit | summary |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        name, stat = c["detail"]["statistic_name"], c["statistic"]
        lines.append(_row(c["name"], _verdict_word(c), name, stat, c["threshold"], c["summary"]))
    lines += ["", terminal_text(report), ""]
    for c in report["checks"]:
        lines += [f"## {c['name']}", ""]
        lines += [f"- {n}" for n in c["detail"].get("notes", [])]
        for i in _failed_items(c)[:20]:
            lines.append(f"- **{i['severity']}** {describe(i)}")
        if c["name"] == "variance_preservation" and c["detail"].get("per_bin"):
            lines += _per_bin_table(c["detail"]["per_bin"])
        if c["name"] == "buckets" and c["detail"].get("histogram"):
            lines += ["", "| bucket (H x W) | records | share |", "|---|---|---|"]
            lines += [_row(*r) for r in _bucket_rows(c["detail"]["histogram"])]
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _bucket_rows(hist: list[dict]) -> list[list]:
    """The ``buckets`` check's histogram as table rows: bucket, records, share."""
    return [[h["bucket"], f"{h['records']}", f"{100 * h['share']:.1f}%"] for h in hist]


def _per_bin_head(rows: list[dict]) -> list[str]:
    """The per-t-bin table's header: the bin's mean alpha_bar (DDPM), or its mean sigma
    (rectified flow, whose rows have no alpha_bar)."""
    what = "alpha_bar" if "alpha_bar" in rows[0] else "sigma"
    return ["t range", "records", what, "Var(x_t)", "model", "E[x_t]", "model"]


def _t_range(row: dict) -> str:
    """A per-bin row's range: DDPM ``[lo, hi)`` (t is the grid index); rectified flow its label
    without ``t in`` (``[first t, last t]``, or ``grid points [lo, hi)``)."""
    if "label" in row:
        return row["label"].removeprefix("t in ")
    return f"[{row['t_lo']}, {row['t_hi']})"


def _per_bin_rows(rows: list[dict]) -> list[list]:
    what = "alpha_bar" if "alpha_bar" in rows[0] else "sigma"
    return [
        [_t_range(r), f"{r['records']:.0f}", r[what], r["var_x_t"],
         r["var_x_t_model"], r["mean_x_t"], r["mean_x_t_model"]]
        for r in rows
    ]  # fmt: skip


def _per_bin_table(rows: list[dict]) -> list[str]:
    lines = ["", "| " + " | ".join(_per_bin_head(rows)) + " |", "|---|---|---|---|---|---|---|"]
    for r in _per_bin_rows(rows):
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.4g}" for v in r) + " |")
    return lines


# -- HTML ------------------------------------------------------------------------------------

_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}.FAIL{color:#b00;font-weight:bold}"
    ".WARN{color:#a60;font-weight:bold}.PASS{color:#070}img{max-width:100%;display:block;"
    "margin:1em 0}code{background:#f3f3f3}"
)


def _html_table(head: list[str], rows: list[list]) -> list[str]:
    e = html.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = []
        for v in r:
            text = v if isinstance(v, str) else _num(v)
            cls = f' class="{text}"' if text in ("PASS", "WARN", "FAIL") else ""
            cells.append(f"<td{cls}>{e(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return out + ["</table>"]


def format_html(report: dict, images: Mapping[str, bytes]) -> str:
    """report.html: what report.md says (verdict, dataset, checks table, notes, failed items,
    per-t-bin table), with the plots embedded as base64 PNG: one file, no links."""
    from pipeline.validate.verdict import describe

    e, s = html.escape, report["summary"]
    sch = s["schedule"]
    word = "PASSED" if report["passed"] else "FAILED"
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>Validation of {e(report['dataset'])}: {word}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Validation of <code>{e(report['dataset'])}</code></h1>",
        f'<p><span class="{word[:4]}">{word}</span> (exit code {report["exit_code"]}); '
        f"{s['records']} records in {s['scanned_shards']} of {s['shards']} shards; schedule "
        f"{e(schedule_text(sch))}, sampler {e(str(s['sampler']))}, "
        f"K={s['draws_per_sample']}, {e(str(s['dtype']))} {e(str(s['shape']))}, "
        f"store_x0={s['store_x0']}, source {e(str(s['source_kind']))}.</p>",
    ]
    rows = [
        [c["name"], _verdict_word(c), c["detail"]["statistic_name"], c["statistic"],
         c["threshold"], c["summary"]]
        for c in report["checks"]
    ]  # fmt: skip
    out += _html_table(["check", "verdict", "statistic", "value", "limit", "summary"], rows)
    out.append(f"<p>{e(terminal_text(report))}</p>")
    for c in report["checks"]:
        out.append(f'<h2>{e(c["name"])} <span class="{_verdict_word(c)}">{_verdict_word(c)}'
                   "</span></h2>")  # fmt: skip
        lines = [e(n) for n in c["detail"].get("notes", [])]
        lines += [f"<b>{e(i['severity'])}</b> {e(describe(i))}" for i in _failed_items(c)[:20]]
        if lines:
            out.append("<ul>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>")
        if c["name"] == "variance_preservation" and c["detail"].get("per_bin"):
            rows = c["detail"]["per_bin"]
            out += _html_table(_per_bin_head(rows), _per_bin_rows(rows))
        if c["name"] == "buckets" and c["detail"].get("histogram"):
            rows = _bucket_rows(c["detail"]["histogram"])
            out += _html_table(["bucket (H x W)", "records", "share"], rows)
    if images:
        out.append("<h2>Plots</h2>")
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(
                f'<img alt="{e(name)}" title="{e(name)}" src="data:image/png;base64,{data}">'
            )
    return "\n".join(out + ["</body></html>"]) + "\n"
