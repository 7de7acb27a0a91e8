"""The validation report's PNG plots, drawn from the report dict and the merged scan statistics.

Every title names the dataset, the schedule and the encoder (:func:`context`); a plot of a
check's quantity carries the check's verdict and draws the band the check itself tests (the model
+- the item's tolerance, threshold z x SE). Plots: the per-t-bin moments of x_t against the
model (``var_mean_over_t.png``), the schedule, the timestep histogram against the configured
density (:meth:`pipeline.noising.noise.KeyedNoise.timestep_pmf`), eps per channel on a log scale
against N(0, 1), a QQ plot of x_T, label histograms, and the noising strip: a few records' x_0
and their x_t at increasing t (images as pictures, latents per channel). For latents of an
encoder whose files are at hand and are the ones the metadata names (the config's and weights'
sha256), the strip also shows x_0 decoded by that VAE (:func:`vae_decoder`).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from pipeline.output.description import ProcessMetadata
from pipeline.output.manifest import OutputDir
from pipeline.output.records import noise_from_metadata, process_from_metadata
from pipeline.validate.checks import variance_preservation as vp
from pipeline.validate.figures import bin_label, t_text
from pipeline.validate.measures import DatasetStats, split_strip

STRIP_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # t / (T - 1) of the strip's columns
LATENT_RANGE = 3.0  # latents are drawn on [-3, 3] (unit-scale latents: +-3 std)


def context(report: dict, process: ProcessMetadata) -> str:
    """'<dataset> | schedule <name> T=<T> | encoder <model> (images -> latents)', or '... | no
    encoder (<source kind>)'."""
    s = report["summary"]
    sch = s["schedule"]
    enc = (process.encoder or {}).get("model")
    what = f"encoder {enc} (images -> latents)" if enc else f"no encoder ({s['source_kind']})"
    zt = ", zero terminal SNR" if sch.get("zero_terminal_snr") else ""
    return f"{report['dataset']} | schedule {sch['name']} T={sch['num_timesteps']}{zt} | {what}"


def _check(report: dict, name: str) -> dict | None:
    return next((c for c in report["checks"] if c["name"] == name), None)


def verdict_text(c: dict | None) -> str:
    """'<name>: PASS (max |z| 1.2 <= 4.9)' for a check, '' for None."""
    if c is None:
        return ""
    word = "FAIL" if not c["passed"] else "WARN" if c["severity"] == "warning" else "PASS"
    stat, thr = c.get("statistic"), c.get("threshold")
    fig = ""
    if stat is not None and thr is not None:
        p_value = c["detail"]["statistic_name"] == "min p-value"  # passes when p >= alpha
        op = "vs" if not c["passed"] else ">=" if p_value else "<="
        fig = f" ({c['detail']['statistic_name']} {stat:.3g} {op} {thr:.3g})"
    return f"{c['name']}: {word}{fig}"


def write_plots(
    rep: OutputDir, prefix: str, *, ds: DatasetStats, schedule, report: dict
) -> list[str]:
    """Write the PNG plots to ``rep`` under ``prefix``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        rep.write_bytes(prefix + name, buf.getvalue())
        saved.append(name)

    ctx = context(report, ds.plan.process)
    decode, note = vae_decoder(ds.plan.process.encoder)
    for draw in (_moments_over_t, _schedule, _timesteps, _eps, _qq, _labels, _buckets, _strip):
        draw(plt, save, ds=ds, schedule=schedule, report=report, ctx=ctx, decode=decode, note=note)
    return saved


def vae_decoder(meta: dict | None) -> tuple[Callable | None, str]:
    """``(decode, note)`` for the records' encoder (``meta``: the metadata's ``encoder`` entry).

    ``decode(z)`` maps scaled latents ``z`` [N, C, h, w] (what the records hold: ``(latent -
    shift) * scale``) to images [N, C_in, H, W] in the encoder's input range, ``vae.decode(z /
    scale + shift)``, with the VAE built from exactly the files whose sha256 the metadata names:
    a local folder at the recorded path, a remote folder copied as the actors copy it, or a Hub
    snapshot already in the local cache (never downloaded here). None, with the reason in
    ``note``, when there is no encoder, diffusers is missing, or the files are not at hand or
    differ."""
    if not meta:
        return None, ""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("diffusers", "safetensors")):
        return None, "decoded x_0 not drawn: diffusers is not installed (the vae extra)"
    try:
        folder = _vae_folder(meta)
        vae = _load_decoder(folder, meta)
    except Exception as exc:  # any reason not to draw it is a note on the plot, not a failure
        return None, f"decoded x_0 not drawn: {type(exc).__name__}: {exc}"
    scale, shift = float(meta["scaling_factor"]), float(meta["shift_factor"])

    def decode(z: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(z, np.float32) / scale + shift)
            return vae.decode(x).sample.double().numpy()

    return decode, f"decoded x_0: {meta['model']} (config and weights sha256 as recorded)"


def _vae_folder(meta: dict) -> str:
    """The local folder of the recorded encoder's files (not verified here: see _load_decoder)."""
    if meta["location"] != "hub":
        from pipeline.encode.encode_stage import fetch_model

        return fetch_model(meta)
    import os

    from huggingface_hub import snapshot_download

    root = snapshot_download(
        repo_id=meta["model"], revision=meta["resolved_revision"], local_files_only=True
    )
    return os.path.join(root, meta["subfolder"]) if meta.get("subfolder") else root


def _load_decoder(folder: str, meta: dict):
    """The VAE of ``folder`` from exactly the bytes whose sha256 the metadata records (a
    WeightsError names a file that differs), float32, eval mode, its encoder half dropped."""
    import json

    from diffusers import AutoencoderKL
    from diffusers.models.modeling_utils import no_init_weights

    from pipeline.encode.encoder import CONFIG_NAME
    from pipeline.encode.weights import load_state_dict, read_verified

    config = json.loads(read_verified(f"{folder}/{CONFIG_NAME}", meta["config_sha256"]))
    state = load_state_dict(folder, meta["weights_sha256"])
    with no_init_weights():
        vae = AutoencoderKL.from_config(config)
    vae._fix_state_dict_keys_on_load(state)  # diffusers' renames of deprecated attention keys
    vae.load_state_dict(state, strict=True)
    vae.encoder, vae.quant_conv = None, None  # decode() does not use them
    return vae.eval().requires_grad_(False).float()


def _bin_means(ds: DatasetStats, table: np.ndarray) -> np.ndarray:
    """The record-weighted mean of ``table`` [T] over each t-bin's records (NaN if none)."""
    e, h = np.asarray(ds.plan.edges), ds.t_hist.astype(np.float64)
    num, den = np.add.reduceat(h * table, e[:-1]), np.add.reduceat(h, e[:-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


# (item quantity, y label, the model as a function of (alpha [T], sigma [T], x_0 figures))
_MOMENTS = (
    (vp.Q_VAR, "E[x_t^2]", lambda a, s, f: a * a * f["m2"] + s * s),
    (vp.Q_MEAN, "E[x_t]", lambda a, s, f: a * f["mean"]),
    (vp.Q_EPS, "E[x_t eps]", lambda a, s, f: s),
)


def _moments_over_t(plt, save, *, ds, schedule, report, ctx, **_):
    """variance_preservation's quantities per t-bin (channels averaged): the measured value, the
    model (curve over t, for rectified flow over sigma, and per bin over its records' t) and
    the check's band (model +- tolerance, from ``detail["bands"]``); failed bins as red
    crosses."""
    c = _check(report, "variance_preservation")
    if c is None or not c["detail"].get("bands"):
        return
    C, alpha, sigma = ds.plan.shape[0], schedule.alpha, schedule.sigma
    fig0 = c["detail"].get("x0", {}).get(str(C))
    bands = c["detail"]["bands"]
    panels = [m for m in _MOMENTS if any(b["quantity"] == m[0] for b in bands)]
    flow = schedule.family == "flow"
    t = sigma if flow else np.arange(len(alpha), dtype=np.float64)  # the x axis
    x_name = "sigma" if flow else "t (0-based)"
    t_mean = _bin_means(ds, t)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (quantity, label, model) in zip(axes[0], panels):
        curve = model(alpha, sigma, fig0)  # E[x_0] figures exist wherever their bands do
        per_bin = _bin_means(ds, curve)
        ax.plot(t, curve, "-", color="C1", lw=1, label="model")
        for band in (b for b in bands if b["quantity"] == quantity):
            b, m, tol, ok = band["bin"], per_bin[band["bin"]], band["tolerance"], band["passed"]
            lo, hi = ds.plan.edges[b], ds.plan.edges[b + 1]  # the bin's grid points
            ax.fill_between(
                [t[lo], t[hi - 1] + 1e-9], m - tol, m + tol, color="C1",
                alpha=0.25, lw=0, label="model +- tolerance",
            )  # fmt: skip
            y = m + band["value"] - band["expected"]
            if ok:
                ax.plot(t_mean[b], y, "o", color="C0", ms=5, label="measured (per t-bin)")
            else:
                ax.plot(t_mean[b], y, "X", color="red", ms=10, label="failed bin")
        ax.set(xlabel=x_name, ylabel=f"{label} (channels averaged)", title=f"{label} vs {x_name}")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    zs = sorted({round(b["threshold_z"], 2) for b in bands})
    z = f"{zs[0]:.3g}" if len(zs) == 1 else f"{zs[0]:.3g}..{zs[-1]:.3g} (Student t: few records)"
    fig.suptitle(f"{verdict_text(c)}; band: model +- {z} SE\n{ctx}", fontsize=10)
    save(fig, "var_mean_over_sigma.png" if flow else "var_mean_over_t.png")


def _schedule(plt, save, *, schedule, report, ctx, **_):
    sch = report["summary"]["schedule"]
    t = np.arange(schedule.num_timesteps)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    flow = getattr(schedule, "family", "ddpm") == "flow"  # sigma_t on the grid, linear
    with np.errstate(divide="ignore"):
        a1.plot(t, schedule.sigma if flow else schedule.alphas_cumprod, label=sch["name"])
        a2.plot(t, schedule.snr, label=sch["name"])
    x_name = "grid index i (t = sigma_i T)" if flow else "t (0-based)"
    if flow:
        a1.set(xlabel=x_name, ylabel="sigma_t", title="sigma_t")
    else:
        a1.set(yscale="log", xlabel=x_name, ylabel="alpha_bar_t", title="alpha_bar_t")
    a2.set(yscale="log", xlabel=x_name, ylabel="SNR(t)", title="SNR = alpha^2 / sigma^2")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    what = "sigma_t" if flow else "alpha_bar_t"
    fig.suptitle(f"noise schedule {sch['name']}: {what} and SNR(t)\n{ctx}", fontsize=10)
    save(fig, "schedule.png")


def _timesteps(plt, save, *, ds, report, ctx, **_):
    """The t histogram in up to 50 ranges against the configured density's expected counts,
    with +- z sqrt(expected) (the Poisson spread of a count)."""
    n, T = int(ds.t_hist.sum()), ds.T
    if not n:
        return
    pmf = noise_from_metadata(ds.plan.process).timestep_pmf()
    nb = min(50, T, max(2, n // 5))  # >= 5 records expected per range
    edges = np.unique(np.floor(np.linspace(0, T, nb + 1)).astype(np.int64))
    obs = np.add.reduceat(ds.t_hist, edges[:-1])
    exp = n * np.add.reduceat(pmf, edges[:-1])
    z = float(report.get("config", {}).get("z", 5.0))
    sampler = report["summary"]["sampler"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.stairs(obs, edges, fill=True, alpha=0.5, label=f"records (n={n})")
    ax.stairs(exp, edges, color="C1", lw=1.5, label=f"expected: {sampler} density")
    band = z * np.sqrt(exp)
    ax.stairs(exp + band, edges, baseline=np.maximum(exp - band, 0), fill=True, color="C1",
              alpha=0.15, label=f"+- {z:g} sqrt(expected)")  # fmt: skip
    if ds.plan.flow:  # the histogram is over grid points; a record's t is sigma_i T
        x_name, per = "grid index i (t = sigma_i T)", "range of grid points"
    else:
        x_name, per = "t (0-based)", "t range"
    ax.set(xlabel=x_name, ylabel=f"records per {per} (width {edges[1] - edges[0]})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    title = verdict_text(_check(report, "timestep_distribution"))
    ax.set_title(f"{title}\n{ctx}", fontsize=10)
    save(fig, "t_hist.png")


def _eps(plt, save, *, ds, report, ctx, **_):
    """eps per channel (the per-position reservoir), log-scale density against N(0, 1)."""
    from scipy import stats as sps

    eps = ds.eps_ch.sample().astype(np.float64)
    if not len(eps):
        return
    C = eps.shape[1]
    cols = min(C, 4)
    rows = -(-C // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.6), squeeze=False)
    xs = np.linspace(-6, 6, 400)
    bins = np.linspace(-6, 6, 61)
    for c, ax in enumerate(axes.flat):
        if c >= C:
            ax.axis("off")
            continue
        ax.hist(eps[:, c], bins=bins, density=True, alpha=0.6, label=f"eps (n={len(eps)})")
        ax.plot(xs, sps.norm.pdf(xs), color="C1", label="N(0, 1)")
        ax.set(yscale="log", ylim=(0.5 / len(eps) / (bins[1] - bins[0]), 1), xlabel="eps")
        ax.set_title(f"channel {c}", fontsize=9)
        ax.grid(alpha=0.3)
        if c == 0:
            ax.set_ylabel("density (log)")
            ax.legend(fontsize=7)
    names = ("epsilon_moments", "epsilon_normality")
    title = "; ".join(v for v in (verdict_text(_check(report, n)) for n in names) if v)
    fig.suptitle(f"{title}\n{ctx}", fontsize=10)
    save(fig, "eps_hist.png")


def _qq(plt, save, *, ds, report, ctx, **_):
    from scipy import stats as sps

    xT = np.sort(ds.xT_res.sample().astype(np.float64))
    if not len(xT):
        return
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    q = sps.norm.ppf((np.arange(len(xT)) + 0.5) / len(xT))
    ax.plot(q, xT, ".", ms=2)
    ax.plot([-5, 5], [-5, 5], "k-", lw=0.5)
    ax.set(xlabel="N(0, 1) quantile", ylabel="x_t quantile")
    top = bin_label(ds.plan, ds.plan.bins - 1) if ds.plan.flow else f"t >= {ds.plan.edges[-2]}"
    ax.set_title(
        f"QQ of x_t, {top}\n{verdict_text(_check(report, 'convergence'))}\n{ctx}", fontsize=8
    )
    save(fig, "qq_x_T.png")


def _labels(plt, save, *, report, ctx, **_):
    cond = _check(report, "conditioning")
    for col, hist in ((cond or {}).get("detail", {}).get("histograms") or {}).items():
        if not hist:
            continue
        labels = sorted(int(k) for k in hist)
        fig, ax = plt.subplots(figsize=(max(6, min(14, 0.3 * len(labels))), 3.8))
        ax.bar([str(k) for k in labels], [hist[str(k)] for k in labels])
        ax.set(xlabel=col, ylabel="samples")
        ax.set_title(f"label histogram: {col}\n{ctx}", fontsize=9)
        if len(labels) > 40:
            ax.set_xticks([])
        save(fig, f"hist_{col}.png")


def _buckets(plt, save, *, report, ctx, **_):
    """Records per aspect-ratio bucket (the ``buckets`` check's histogram), by aspect ratio."""
    check = _check(report, "buckets")
    hist = (check or {}).get("detail", {}).get("histogram") or []
    if not hist:
        return
    fig, ax = plt.subplots(figsize=(max(6, min(14, 0.45 * len(hist))), 3.8))
    ax.bar([h["bucket"] for h in hist], [h["records"] for h in hist])
    ax.set(xlabel="bucket H x W (by aspect ratio H/W)", ylabel="records")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.set_title(f"aspect-ratio buckets: {verdict_text(check)}\n{ctx}", fontsize=9)
    save(fig, "hist_buckets.png")


def is_latent(process: ProcessMetadata) -> bool:
    """Records of latents (an encoder's, or precomputed arrays): drawn per channel."""
    return bool(process.encoder) or (process.source or {}).get("kind") == "arrays"


def _strip_title(process, i: int, ab) -> str:
    """A strip column's title: DDPM ``t=<i> (ab=...)``; flow ``t=<sigma_i T> (sigma=...)``."""
    if getattr(process, "family", "ddpm") == "flow":
        return f"t={t_text(process.timesteps[i])} (sigma={process.sigma[i]:.2g})"
    return f"t={i} (ab={ab[i]:.2g})"


def _strip(
    plt, save, *, ds, schedule, report, ctx, decode: Callable | None = None, note: str = "", **_
):
    """A few records, one per row: x_0 (stored, or reconstructed from x_t and eps), then x_t =
    sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps with the record's own eps at increasing t, then the
    stored x_t at the record's t. Images from [-1, 1] to pixels; latents per channel (one
    grey panel per channel, side by side, on [-3, 3]), preceded by x_0 decoded to pixels when
    ``decode`` (:func:`vae_decoder`) is given; ``note`` says why it is not."""
    rows = ds.strip.sample()
    shape = ds.plan.shape
    if not len(rows) or len(shape) != 3:
        return
    x0, eps, xt, t_rec = split_strip(rows.astype(np.float64), shape)  # t_rec: grid indices
    if ds.plan.flow:  # the grid of the strip's records (a dynamic shift's follows the shape)
        schedule = process_from_metadata(ds.plan.process, shape)
    T, ab, al, sg = ds.T, schedule.alphas_cumprod, schedule.alpha, schedule.sigma
    ts = sorted({int(round(f * (T - 1))) for f in STRIP_FRACTIONS})
    latent = is_latent(ds.plan.process)
    norm = (ds.plan.process.source or {}).get("normalize", True)
    src = "stored" if ds.plan.process.store_x0 else "reconstructed"
    decoded = decode(x0) if latent and decode is not None else None  # [n, C_in, H, W]
    first = 0 if decoded is None else 1  # the column of x_0 (latent)
    ncol = len(ts) + 2 + first
    aspect = (shape[0] if latent else 1) * shape[2] / shape[1]  # a panel's width / height
    panel_w = min(22.0, 1.6 * ncol * max(1.0, aspect)) / ncol
    fig, axes = plt.subplots(
        len(rows), ncol, figsize=(panel_w * ncol, (panel_w / aspect + 0.35) * len(rows) + 0.8),
        squeeze=False,
    )  # fmt: skip

    def show(ax, x, title, pixels=not latent):
        if not pixels:  # latent channels side by side, a thin gap between them
            gap = np.full((shape[1], 1), np.nan)
            img = np.concatenate([p for c in x for p in (c, gap)][:-1], axis=1)
            ax.imshow(img, cmap="gray", vmin=-LATENT_RANGE, vmax=LATENT_RANGE)
        else:
            img = np.clip((x + 1) / 2 if norm else x, 0, 1)
            img = img[0] if img.shape[0] in (1, 2) else np.moveaxis(img[:3], 0, -1)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])

    for r in range(len(rows)):
        if decoded is not None:
            show(axes[r, 0], decoded[r], f"x_0 ({src}) decoded by the VAE", pixels=True)
        show(axes[r, first], x0[r], f"x_0 ({src})")
        for j, tj in enumerate(ts):
            x = al[tj] * x0[r] + sg[tj] * eps[r]
            show(axes[r, first + 1 + j], x, _strip_title(schedule, tj, ab))
        t_shown = t_text(schedule.timesteps[t_rec[r]]) if ds.plan.flow else t_rec[r]
        show(axes[r, -1], xt[r], f"stored x_t, t={t_shown}")
    how = "channels side by side on [-3, 3]" if latent else "pixels from [-1, 1]"
    fig.suptitle(
        f"noising strip: x_t = alpha_t x_0 + sigma_t eps, each row one record with its own "
        f"eps ({how})\n{ctx}" + (f"\n{note}" if note and latent else ""),
        fontsize=9,
    )
    save(fig, "noising_strip.png")
