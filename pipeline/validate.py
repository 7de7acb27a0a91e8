"""Validate a precomputed DDPM dataset: ``python -m pipeline.validate output.dir=/data/noised``.

One pass over the records, bounded memory whatever the dataset size: every committed shard is
read one Parquet batch at a time by a Ray task (:func:`pipeline.scan.scan_shard`), and the per-shard statistics
(mergeable moments, co-moments, reservoirs, hashes; see :mod:`pipeline.stats`) are merged on the
driver as tasks finish (:class:`pipeline.scan.DatasetStats`). Everything about the process comes
from the dataset itself: the manifest's ``process`` block and every file's ``ddpm`` metadata.

The named checks (:mod:`pipeline.checks`) each give a statistic, its expected value and a
tolerance of ``z`` standard errors (raised for families of tests), and a verdict. The report goes
to ``<output.dir>/validation/``: ``report.json``, ``report.md`` and PNG plots.

Exit codes: 0 every check passed (warnings allowed), 1 a check failed, 2 the validator could not
run (no such directory, no manifest, bad config value, ...), with a message naming the path/key.
What a shard scan measures: :class:`pipeline.scan.Stats`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
from omegaconf import DictConfig, OmegaConf

from . import checks, records
from .manifest import COMMITTED, MANIFEST, MANIFEST_FORMAT, REJECTS, OutputDir
from .scan import DatasetStats, ScanPlan, ShardStats, scan_shard

REPORT_FORMAT = "ddpm-validation/1"


class CannotValidate(RuntimeError):
    """The validator cannot run; the message names the path or config key (exit code 2)."""


# -- orchestration ---------------------------------------------------------------------------


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/validate.yaml with command-line style overrides (``key=value``)."""
    from .config import compose

    return compose(list(overrides), config_name="validate")


def _check_config(cfg: DictConfig) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise CannotValidate(f"config key {key}: {msg}")

    try:
        uri = cfg.output.dir
    except Exception:  # omegaconf MissingMandatoryValue
        uri = None
    need(bool(uri), "output.dir", "required: python -m pipeline.validate output.dir=/path/or/uri")
    need(cfg.z > 0, "z", f"must be > 0, got {cfg.z}")
    need(cfg.bins >= 1, "bins", f"must be >= 1, got {cfg.bins}")
    need(cfg.reservoir_size >= 0, "reservoir_size", f"must be >= 0, got {cfg.reservoir_size}")
    need(cfg.max_consistency_records >= 0, "max_consistency_records", "must be >= 0")
    need(0 < cfg.reconstruct_min_alpha_bar <= 1, "reconstruct_min_alpha_bar", "must be in (0, 1]")
    need(cfg.terminal_mean_shift >= 0, "terminal_mean_shift", "must be >= 0")
    need(0 <= cfg.terminal_window < 1, "terminal_window", "must be in [0, 1)")
    need(cfg.batch_elements >= 1, "batch_elements", f"must be >= 1, got {cfg.batch_elements}")
    need(cfg.ray.num_cpus_per_task > 0, "ray.num_cpus_per_task", "must be > 0")


def open_dataset(uri: str) -> tuple[OutputDir, dict]:
    """The output dir and its manifest; CannotValidate (exit 2) naming the path otherwise."""
    try:
        out = OutputDir(uri)
        info = out.fs.get_file_info(out.root)
    except Exception as exc:
        raise CannotValidate(f"cannot open output.dir {uri!r}: {exc}") from None
    if info.type.name != "Directory":
        raise CannotValidate(f"output.dir {out.display()}: no such directory")
    try:
        manifest = out.read_manifest()
    except Exception as exc:
        raise CannotValidate(f"cannot read {out.display(MANIFEST)}: {exc}") from None
    if manifest is None:
        raise CannotValidate(
            f"no {MANIFEST} in {out.display()}: not written by pipeline.precompute (or never started)"
        )
    if manifest.get("format") != MANIFEST_FORMAT or "process" not in manifest:
        raise CannotValidate(
            f"{out.display(MANIFEST)}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
        )
    return out, manifest


def t_edges(T: int, bins: int, terminal_window: float) -> tuple[int, ...]:
    """t-bin edges: ``bins`` equal ranges over [0, T - w), then the terminal bin [T - w, T) with
    w = max(1, round(T * terminal_window)) (where convergence looks at x_T)."""
    w = min(T, max(1, round(T * terminal_window)))
    main = np.floor(np.linspace(0, T - w, min(bins, T - w) + 1)) if T > w else np.zeros(1)
    return tuple(int(e) for e in np.unique(main)) + (T,)


def _plan(cfg: DictConfig, process: dict, n_files: int) -> ScanPlan:
    T = int(process["schedule"]["num_timesteps"])
    edges = t_edges(T, int(cfg.bins), float(cfg.terminal_window))
    quota = math.ceil(cfg.max_consistency_records / max(n_files, 1))
    return ScanPlan(
        process=process,
        edges=edges,
        reservoir_size=int(cfg.reservoir_size),
        recon_min_alpha_bar=float(cfg.reconstruct_min_alpha_bar),
        batch_elements=int(cfg.batch_elements),
        seed=int(cfg.seed),
        consistency_quota=quota,
        grid=bool(cfg.plots),
    )


def _scan_all(cfg: DictConfig, out: OutputDir, shards: list[str], ds: DatasetStats) -> None:
    """Scan the shards as Ray tasks (at most max_in_flight at once), merging as they finish."""
    import ray
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CannotValidate(
                f"cannot start Ray (ray.address={cfg.ray.address}): {exc}"
            ) from None
    try:
        task = ray.remote(scan_shard).options(num_cpus=cfg.ray.num_cpus_per_task)
        window = cfg.ray.max_in_flight or max(
            2, int(2 * ray.cluster_resources().get("CPU", 1) / cfg.ray.num_cpus_per_task)
        )
        todo, running = list(reversed(shards)), {}
        bar = tqdm(total=len(shards), unit="shard", desc="validate", disable=not cfg.progress)
        with bar:
            while todo or running:
                while todo and len(running) < window:
                    shard = todo.pop()
                    running[task.remote(out, shard, ds.plan)] = shard
                done, _ = ray.wait(list(running), num_returns=1)
                shard = running.pop(done[0])
                try:
                    st = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the task's process died (OOM, node)
                    st = ShardStats(shard, out.display(OutputDir.data_name(shard)), error=str(exc))
                ds.add(st)
                bar.update(1)
    finally:
        if started:
            ray.shutdown()


def run(cfg: DictConfig) -> dict:
    """Validate the dataset at ``cfg.output.dir``; returns the report (``report["exit_code"]``
    is 0 or 1). Raises :class:`CannotValidate` when it cannot run (exit code 2)."""
    _check_config(cfg)
    t0 = time.perf_counter()
    out, manifest = open_dataset(cfg.output.dir)
    process = manifest["process"]
    entries = manifest.get("shards", {})
    present = set(out.data_files())
    to_scan = [
        k
        for k, e in sorted(entries.items())
        if e.get("status") in COMMITTED and OutputDir.data_name(k) in present
    ]
    try:
        schedule = records.schedule_from_metadata(process)
        noise = records.noise_from_metadata(process)
        records.check_dtype(process["dtype"])
        ds = DatasetStats(_plan(cfg, process, len(to_scan)), entries)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise CannotValidate(f"{out.display(MANIFEST)}: bad process description ({what})") from None
    if to_scan:
        _scan_all(cfg, out, to_scan, ds)
    rejects = out.read_jsonl(REJECTS) if out.exists(REJECTS) else None
    z, fc = float(cfg.z), bool(cfg.family_correction)
    results = [
        checks.completeness(ds, out, manifest, rejects),
        checks.record_consistency(ds, z, fc),
        checks.keyed_noise(ds, z, fc),
        checks.epsilon_moments(ds, z, fc),
        checks.epsilon_normality(ds, z, fc),
        checks.noise_independence(ds, z, fc),
        checks.variance_preservation(ds, z, fc),
        checks.convergence(ds, schedule, z, fc, float(cfg.terminal_mean_shift)),
        checks.timestep_distribution(ds, noise.sampler, z, fc),
    ]
    passed = all(c.passed for c in results)
    report = {
        "format": REPORT_FORMAT,
        "dataset": out.display(),
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "checks": [asdict(c) for c in results],
        "terminal": schedule.terminal(),
        "summary": _summary(manifest, ds, schedule, noise),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    rep = OutputDir(cfg.output.report_dir) if cfg.output.report_dir else out
    prefix = "" if cfg.output.report_dir else "validation/"
    rep.makedirs(prefix.rstrip("/"))
    report["plots"] = _plots(rep, prefix, ds, schedule, report) if cfg.plots else []
    report["report_dir"] = rep.display(prefix.rstrip("/")) if prefix else rep.display()
    rep.write_bytes(prefix + "report.json", _to_json(report).encode())
    rep.write_bytes(prefix + "report.md", format_markdown(report).encode())
    return report


def _summary(manifest: dict, ds: DatasetStats, schedule, noise) -> dict:
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
    }


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


def _to_json(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=False, allow_nan=False) + "\n"


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _verdict_word(c: dict) -> str:
    return "FAIL" if not c["passed"] else "WARN" if c["severity"] == "warning" else "PASS"


def format_table(report: dict) -> str:
    """The short summary table printed to stdout."""
    rows = [f"{'check':<22} {'verdict':<7} {'statistic':<22} {'value':>9} {'limit':>9}  summary"]
    for c in report["checks"]:
        rows.append(
            f"{c['name']:<22} {_verdict_word(c):<7} {c['detail']['statistic_name']:<22} "
            f"{_num(c['statistic']):>9} {_num(c['threshold']):>9}  {c['summary'][:100]}"
        )
    return "\n".join(rows)


def format_markdown(report: dict) -> str:
    s, term = report["summary"], report["terminal"]
    lines = [
        f"# Validation of `{report['dataset']}`",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** (exit code {report['exit_code']}); "
        f"{s['records']} records in {s['scanned_shards']} of {s['shards']} shards; schedule "
        f"{s['schedule']['name']} T={s['schedule']['num_timesteps']} (zero_terminal_snr="
        f"{s['schedule']['zero_terminal_snr']}), sampler {s['sampler']}, K={s['draws_per_sample']}, "
        f"{s['dtype']} {s['shape']}, store_x0={s['store_x0']}, source {s['source_kind']}.",
        "",
        "| check | verdict | statistic | value | limit | summary |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        summ = c["summary"].replace("|", "\\|")
        lines.append(
            f"| {c['name']} | {_verdict_word(c)} | {c['detail']['statistic_name']} | {_num(c['statistic'])} | "
            f"{_num(c['threshold'])} | {summ} |"
        )
    lines += [
        "",
        "Terminal figures (t = T-1): " + ", ".join(f"{k} = {_num(v)}" for k, v in term.items()),
        "",
    ]  # noqa: E501
    for c in report["checks"]:
        lines += [f"## {c['name']}", ""]
        lines += [f"- {n}" for n in c["detail"].get("notes", [])]
        bad = [i for i in c["detail"].get("items", []) if not i.get("passed", True)]
        for i in bad[:20]:
            lines.append(f"- **{i['severity']}** {checks.describe(i)}")
        if c["name"] == "variance_preservation" and c["detail"].get("per_bin"):
            lines += ["", "| t range | records | alpha_bar | Var(x_t) | model | E[x_t] | model |"]
            lines.append("|---|---|---|---|---|---|---|")
            for r in c["detail"]["per_bin"]:
                lines.append(
                    f"| [{r['t_lo']}, {r['t_hi']}) | {r['records']:.0f} | {r['alpha_bar']:.4g} | "
                    f"{r['var_x_t']:.4g} | {r['var_x_t_model']:.4g} | {r['mean_x_t']:.4g} | "
                    f"{r['mean_x_t_model']:.4g} |"
                )
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------


def _plots(rep: OutputDir, prefix: str, ds: DatasetStats, schedule, report: dict) -> list[str]:
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


# -- entry points ----------------------------------------------------------------------------


def run_validation(output_dir: str, *overrides: str) -> int:
    """Validate ``output_dir`` with default settings (plus overrides); print; return the exit code."""
    return main([f"output.dir={output_dir}", *overrides])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``diffusion-validate output.dir=... [key=value ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from .config import CONF_DIR

        print(__doc__.split("\n\n")[0] + "\n\nKeys, set as key=value (conf/validate.yaml):\n")
        print((CONF_DIR / "validate.yaml").read_text())
        return 0
    try:
        cfg = load_config(argv)
        report = run(cfg)
    except CannotValidate as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # hydra override errors, unreadable config, ...
        if type(exc).__module__.split(".")[0] in ("hydra", "omegaconf"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(format_table(report))
    for c in report["checks"]:
        bad = [i for i in c["detail"]["items"] if not i["passed"]]
        for i in bad[:3]:
            print(f"  {c['name']} {i['severity']}: {checks.describe(i)}")
        if len(bad) > 3:
            print(f"  {c['name']}: {len(bad) - 3} more in the report")
        for n in c["detail"].get("notes", []):
            if "not unit-variance" in n or "NOT " in n:
                print(f"  note ({c['name']}): {n}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; report: {report['report_dir']}/report.md")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
