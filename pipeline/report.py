"""Render a validation report: ``report.json``, ``report.md``, PNG plots and the console text.

:func:`pipeline.validate.run` builds the report (a dict: the checks as
:func:`dataclasses.asdict` of :class:`pipeline.validate.verdict.Check`, the dataset's summary, the
schedule's terminal figures, the config); :func:`write_report` writes it and its plots to the
report directory, :func:`format_console` is what the CLI prints. Renderers read only the report
dict (the plots also read the merged statistics), and a check's highlights come as data
(``check["highlights"]``), so nothing here matches words in the notes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .manifest import OutputDir

if TYPE_CHECKING:
    from .validate.measures import DatasetStats

REPORT_FORMAT = "ddpm-validation/1"
CONSOLE_ITEMS = 3  # failed items printed per check; the rest are in report.md


def dataset_summary(manifest: dict, ds: DatasetStats, noise) -> dict:
    """The report's ``summary`` block: what was validated (shards, records, process)."""
    p, t = ds.plan.process, manifest.get("totals", {})
    return {
        "shards": len(manifest.get("shards", {})),
        "scanned_shards": len(ds.shards),
        "records": int(ds.t_hist.sum()),
        **{k: t.get(k) for k in ("samples", "rejected")},
        "schedule": {k: p["schedule"][k] for k in ("name", "num_timesteps", "zero_terminal_snr")},
        **{"sampler": noise.sampler, "draws_per_sample": noise.draws, "seed": noise.seed},
        **{k: p[k] for k in ("dtype", "shape", "store_x0")},
        "source_kind": ds.source_kind or p.get("source", {}).get("kind"),
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
    """Write report.json, report.md and (with ``plots``) the PNG plots to ``report_dir``, or to
    ``<out>/validation/`` when it is None; adds ``plots`` (file names) and ``report_dir`` (its
    display name) to ``report``."""
    rep = OutputDir(report_dir) if report_dir else out
    prefix = "" if report_dir else "validation/"
    rep.makedirs(prefix.rstrip("/"))
    drawn = write_plots(rep, prefix, ds=ds, schedule=schedule, report=report) if plots else []
    report["plots"] = drawn
    report["report_dir"] = rep.display(prefix.rstrip("/")) if prefix else rep.display()
    rep.write_bytes(prefix + "report.json", to_json(report).encode())
    rep.write_bytes(prefix + "report.md", format_markdown(report).encode())


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
    from .validate.verdict import describe  # here: it imports scipy, which scan processes need not

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
    from .validate.verdict import describe

    s, term = report["summary"], report["terminal"]
    sch = s["schedule"]
    lines = [
        f"# Validation of `{report['dataset']}`",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** (exit code {report['exit_code']}); "
        f"{s['records']} records in {s['scanned_shards']} of {s['shards']} shards; schedule "
        f"{sch['name']} T={sch['num_timesteps']} (zero_terminal_snr="
        f"{sch['zero_terminal_snr']}), sampler {s['sampler']}, K={s['draws_per_sample']}, "
        f"{s['dtype']} {s['shape']}, store_x0={s['store_x0']}, source {s['source_kind']}.",
        "",
        "| check | verdict | statistic | value | limit | summary |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        name, stat = c["detail"]["statistic_name"], c["statistic"]
        lines.append(_row(c["name"], _verdict_word(c), name, stat, c["threshold"], c["summary"]))
    lines += [
        "",
        "Terminal figures (t = T-1): " + ", ".join(f"{k} = {_num(v)}" for k, v in term.items()),
        "",
    ]
    for c in report["checks"]:
        lines += [f"## {c['name']}", ""]
        lines += [f"- {n}" for n in c["detail"].get("notes", [])]
        for i in _failed_items(c)[:20]:
            lines.append(f"- **{i['severity']}** {describe(i)}")
        if c["name"] == "variance_preservation" and c["detail"].get("per_bin"):
            lines += _per_bin_table(c["detail"]["per_bin"])
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _per_bin_table(rows: list[dict]) -> list[str]:
    lines = ["", "| t range | records | alpha_bar | Var(x_t) | model | E[x_t] | model |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| [{r['t_lo']}, {r['t_hi']}) | {r['records']:.0f} | {r['alpha_bar']:.4g} | "
            f"{r['var_x_t']:.4g} | {r['var_x_t_model']:.4g} | {r['mean_x_t']:.4g} | "
            f"{r['mean_x_t_model']:.4g} |"
        )
    return lines


# -- plots -----------------------------------------------------------------------------------


def write_plots(
    rep: OutputDir, prefix: str, *, ds: DatasetStats, schedule, report: dict
) -> list[str]:
    """Write the PNG plots to ``rep`` under ``prefix``; returns their file names: Var/E of x_t
    over t against the model, the schedule, eps against N(0, 1), a QQ plot of x_T, the label
    histogram of each int64 kept column (``hist_cls.png``) and (images) one stored x_t per t-bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    saved = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        rep.write_bytes(prefix + name, buf.getvalue())
        saved.append(name)

    t = np.arange(schedule.num_timesteps)
    ab = schedule.alphas_cumprod
    vp = next(c for c in report["checks"] if c["name"] == "variance_preservation")["detail"]
    rows, x0 = vp.get("per_bin", []), vp.get("x0", {}).get(str(ds.plan.shape[0]))
    if rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        mid = [(r["t_lo"] + r["t_hi"] - 1) / 2 for r in rows]
        a1.plot(mid, [r["var_x_t"] for r in rows], "o", label="empirical (per t-bin)")
        a2.plot(mid, [r["mean_x_t"] for r in rows], "o", label="empirical (per t-bin)")
        if x0:
            a1.plot(t, ab * x0["var"] + 1 - ab, "-", label="ab Var(x_0) + 1 - ab")
            a2.plot(t, np.sqrt(ab) * x0["mean"], "-", label="sqrt(ab) E[x_0]")
        a1.axhline(1.0, color="grey", lw=0.5)
        a1.set(xlabel="t", ylabel="Var(x_t)", title="variance of x_t over t")
        a2.set(xlabel="t", ylabel="E[x_t]", title="mean of x_t over t")
        for a in (a1, a2):
            a.legend()
            a.grid(alpha=0.3)
        save(fig, "var_mean_over_t.png")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    with np.errstate(divide="ignore"):
        a1.plot(t, ab)
        a2.plot(t, schedule.snr)
    a1.set(yscale="log", xlabel="t", title="alpha_bar_t")
    a2.set(yscale="log", xlabel="t", title="SNR(t) = ab / (1 - ab)")
    save(fig, "schedule.png")
    eps = ds.eps_res.sample().astype(np.float64)
    if len(eps):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(eps, bins=80, density=True, alpha=0.6, label=f"eps sample (n={len(eps)})")
        xs = np.linspace(-5, 5, 400)
        ax.plot(xs, sps.norm.pdf(xs), label="N(0, 1)")
        ax.set(xlabel="eps", title="noise vs N(0, 1)")
        ax.legend()
        save(fig, "eps_hist.png")
    xT = np.sort(ds.xT_res.sample().astype(np.float64))
    if len(xT):
        fig, ax = plt.subplots(figsize=(5, 5))
        q = sps.norm.ppf((np.arange(len(xT)) + 0.5) / len(xT))
        ax.plot(q, xT, ".", ms=2)
        ax.plot([-5, 5], [-5, 5], "k-", lw=0.5)
        ax.set(
            xlabel="N(0, 1) quantile", ylabel="x_t quantile", title=f"QQ, t >= {ds.plan.edges[-2]}"
        )
        save(fig, "qq_x_T.png")
    cond = next((c for c in report["checks"] if c["name"] == "conditioning"), None)
    for col, hist in ((cond or {}).get("detail", {}).get("histograms") or {}).items():
        if not hist:
            continue
        labels = sorted(int(k) for k in hist)
        fig, ax = plt.subplots(figsize=(max(5, min(14, 0.3 * len(labels))), 3.5))
        ax.bar([str(k) for k in labels], [hist[str(k)] for k in labels])
        ax.set(xlabel=col, ylabel="samples", title=f"label histogram: {col}")
        if len(labels) > 40:
            ax.set_xticks([])
        save(fig, f"hist_{col}.png")
    if report["summary"]["source_kind"] == "images" and ds.grid:
        _grid(plt, save, ds)
    return saved


def _grid(plt, save, ds: DatasetStats) -> None:
    """One stored x_t per t-bin, mapped from [-1, 1] to pixels (channels 1, 3 or 4 shown)."""
    bins = sorted(b for b, r in ds.grid.items() if len(r))
    if not bins or len(ds.plan.shape) != 3:
        return
    norm = ds.plan.process.get("source", {}).get("normalize", True)
    fig, axes = plt.subplots(1, len(bins), figsize=(1.8 * len(bins), 2.2), squeeze=False)
    for ax, b in zip(axes[0], bins):
        x = ds.grid[b].sample()[0].astype(np.float64)
        img = np.clip((x + 1) / 2 if norm else x, 0, 1)
        img = img[0] if img.shape[0] in (1, 2) else np.moveaxis(img[:3], 0, -1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(f"t~{(ds.plan.edges[b] + ds.plan.edges[b + 1] - 1) // 2}", fontsize=8)
        ax.axis("off")
    save(fig, "x_t_grid.png")
