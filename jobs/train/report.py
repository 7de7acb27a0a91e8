"""The example trainer's report: ``loss.png`` and ``metrics.json`` (:func:`save`) and the text
summary it prints (:func:`report`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def save(metrics: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    losses = np.array(metrics["losses"])
    k = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    y = {"epsilon": "eps", "v": "v", "velocity": "u"}.get(metrics.get("target"), "eps")
    ax.plot(losses, alpha=0.35, label=f"MSE({y}_hat, {y}) per step")
    ax.plot(np.arange(k - 1, len(losses)), smooth, label=f"moving mean ({k} steps)")
    ax.axhline(
        np.mean(metrics["zero_losses"]), color="k", ls="--", label=f"predict zeros: E[{y}^2]"
    )
    if "eval" in metrics:
        where = "held-out" if metrics.get("holdout") else "eval"
        ax.axhline(metrics["eval"]["mse"], color="C3", ls=":", label=f"{where} MSE")
    curve = metrics.get("curve")
    if curve:
        where = "held-out" if metrics.get("holdout") else "training"
        ax.plot(curve["steps"], curve["mse_null"], "s-", ms=4, lw=2.5, alpha=0.6,
                label=f"{where} batch, null label")  # fmt: skip
        ax.plot(curve["steps"], curve["mse"], "o-", ms=2, lw=1, label=f"{where} batch, true label")
    title = {"epsilon": "epsilon", "v": "v", "velocity": "velocity (rectified flow)"}.get(
        metrics.get("target"), "epsilon"
    ) + "-prediction loss"
    if metrics.get("cond"):
        c = metrics["cond"]
        title += f", conditioned on {c.get('embedding', c['column'])}" + (
            f" ({c['num_classes']} classes)" if "num_classes" in c else ""
        )
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def report(m: dict) -> str:
    e = m["eval"]
    ln2 = math.log(2.0)
    where = f"held out: {m['holdout']:.0%} of samples" if m.get("holdout") else "training records"
    lines = [
        f"{m['records']} records {m['shape']}, {m['schedule']} T={m['num_timesteps']}: "
        f"{m['steps']} steps in {m['seconds']:.1f} s ({m['epochs']} epochs)",
        f"train loss (last 10%):  {m['final_loss']:.4f}"
        f"   zero predictor: {m['final_zero_loss']:.4f}",
        f"eval MSE ({m.get('objective', 'eps')}):"
        + " " * max(1, 9 - len(m.get("objective", "eps")))
        + f"{e['mse']:.4f}   zero predictor: {e['zero_mse']:.4f}"
        f"   ({e['records']} records, {where})",
        f"L_(t-1) KL, nats/dim:   {e['kl']:.4g} ({e['kl'] / ln2:.4g} bits/dim)"
        f"   zero predictor: {e['kl_zero']:.4g}   true target: {e['kl_true_eps']:.2g}"
        f"   ({e['kl_records']} records with t > 0)",
    ]
    if m.get("cond", {}).get("column") == "text":
        c = m["cond"]
        lines += [
            f"conditioned on the caption embedding {c['embedding']!r}, p_uncond {c['p_uncond']:g} "
            "(a dropped caption takes the stored unconditional embedding, the empty prompt's)",
            f"eval MSE given caption: {e['mse']:.4f}   given the empty prompt: {e['mse_null']:.4f}"
            f"   (same {e['records']} records, x_t, t, eps; empty - caption = "
            f"{e['mse_gap']:.4f} +- {e['mse_gap_se']:.4f} s.e.)",
        ]
    elif m.get("cond"):
        c = m["cond"]
        lines += [
            f"conditioned on {c['column']!r}: {c['num_classes']} classes + the null label, "
            f"p_uncond {c['p_uncond']:g}, {c['null_labels']} records with a null label",
            f"eval MSE given label:   {e['mse']:.4f}   given the null label: {e['mse_null']:.4f}"
            f"   (same {e['records']} records, x_t, t, eps; null - label = "
            f"{e['mse_gap']:.4f} +- {e['mse_gap_se']:.4f} s.e.)",
        ]
    return "\n".join(lines)
