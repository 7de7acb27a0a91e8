"""The validator's ``latent_scale`` check: is x_0 a latent at unit scale?

Diffusion models are trained on latents scaled to about unit variance: ``x_0 = (z - shift) *
scaling_factor``. A missing or doubled scaling is the classic silent mistake (the records look
fine, the model trains badly): raw Stable Diffusion latents have std ~5.5 (about 1 / 0.18215);
scaled twice, ~0.18 (5.5 x 0.18215^2), and ~0.03 (0.18215^2) when latents already at unit scale
are multiplied by the factor twice more. This check reports per channel the mean and standard
deviation of x_0 -- stored (``output.store_x0``) or reconstructed from x_t and eps where
alpha_bar is large (:func:`pipeline.validate.figures.x0_figures`) -- and warns, naming the fix,
when the std (channels averaged) is outside [1/3, 3], or a channel's outside [0.1, 10].

It applies to latent records: ``encoder=vae`` (the metadata's ``encoder`` entry), and with
``include_arrays`` to ``source=arrays`` (precomputed latents, scaled by ``source.scale``; not
turned on in the validator yet); for images without an encoder (pixels in [-1, 1], std ~0.5) it
returns nothing. Its items are warnings: a dataset whose
latents are deliberately not at unit scale still passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pipeline.validate.checks.context import Context
from pipeline.validate.figures import flow_recon, x0_figures
from pipeline.validate.verdict import Check, verdict

NAME = CHECK_NAME = "latent_scale"
STD_RANGE = (1 / 3, 3.0)  # the channel-averaged std
CHANNEL_STD_RANGE = (0.1, 10.0)
_FACTORS = (
    "SD 1.x/2.x 0.18215; SDXL 0.13025; SD3 1.5305 with shift 0.0609; Flux 0.3611 with shift 0.1159"
)


def applies(process: Mapping, include_arrays: bool = False) -> bool:
    """Latent records: an encoder's, or with ``include_arrays`` arrays (precomputed latents)."""
    arrays = include_arrays and process.get("source", {}).get("kind") == "arrays"
    return bool(process.get("encoder")) or arrays


def remedy(std: float, process: Mapping) -> str:
    """What to change when x_0's std is ``std`` (outside the expected range): the std measured,
    the factor applied and the factor that would give std 1 (x_0 = (z - shift) * factor, so
    factor / std)."""
    enc = process.get("encoder")
    key, factor = (
        ("encoder.scaling_factor", enc.get("scaling_factor"))
        if enc
        else ("source.scale", process.get("source", {}).get("scale"))
    )
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        factor = None
    measured = (
        f"std(x_0) = {std:.4g} with factor {factor:g} applied ({key})"
        if factor
        else (f"std(x_0) = {std:.4g} ({key}: {factor})")
    )
    unit = f"; {key}={factor / std:.4g} would give std 1" if factor and std > 0 else ""
    if std > 1:
        why = "the latents look unscaled" if enc else "the arrays look like unscaled latents"
        fix = f"set {key} to the model's scaling factor" + (
            "" if enc else " and source.shift to its shift_factor"
        )
    else:
        why = (
            "the latents look scaled twice or by a wrong factor"
            if enc
            else ("the arrays look scaled twice")
        )
        fix = "do not scale them again" + (
            "" if enc else " (arrays saved already scaled: source.scale=1 source.shift=0)"
        )
    return f"{why}: {measured}{unit}; {fix} ({_FACTORS})"


def _item(where: str, quantity: str, value: float, lo: float, hi: float, message: str) -> dict:
    ok = lo <= value <= hi
    return {
        "where": where,
        "quantity": quantity,
        "value": float(value),
        "severity": "warning",
        "kind": "limit",
        "limit": f"[{lo:.3g}, {hi:.3g}]",
        "passed": ok,
        **({} if ok else {"message": message}),
    }


def latent_scale_from_figures(figures: Mapping, process: Mapping, source: str) -> Check:
    """The check from :func:`pipeline.validate.figures.x0_figures` (per channel ``c``, and
    ``C``: the channels averaged); ``source`` says where x_0 came from (stored or reconstructed)."""
    C = int(process["shape"][0])
    table = [
        {
            "channel": c,
            "records": int(f["records"]),
            "mean": float(f["mean"]),
            "std": math.sqrt(max(f["var"], 0.0)),
        }
        for c, f in sorted(figures.items())
        if c < C
    ]
    extra = {"per_channel": table, "x0": source}
    if C not in figures:
        note = f"no x_0 to measure ({source}: fewer than 3 records): latent scale not checked"
        return verdict(CHECK_NAME, [], z=5.0, correct=False, notes=[note], extra=extra)
    std = math.sqrt(max(figures[C]["var"], 0.0))
    items = [_item("all channels", "std(x_0)", std, *STD_RANGE, remedy(std, process))]
    items += [
        _item(f"channel {r['channel']}", "std(x_0)", r["std"], *CHANNEL_STD_RANGE,
              remedy(r["std"], process))
        for r in table
    ]  # fmt: skip
    notes = [
        f"x_0 ({source}): std {std:.4g} (channels averaged); per channel mean/std "
        + ", ".join(f"{r['mean']:.3g}/{r['std']:.3g}" for r in table)
    ]
    return verdict(
        CHECK_NAME,
        [items],
        z=5.0,
        correct=False,
        notes=notes,
        statistic=std,
        threshold=STD_RANGE[1] if std > 1 else STD_RANGE[0],
        extra=extra,
    )


def latent_scale(ds, include_arrays: bool = False) -> list[Check]:
    """``[check]`` for latent records (see :func:`applies`), ``[]`` otherwise. ``ds``: the
    merged :class:`pipeline.validate.measures.DatasetStats` of a scan. The validator runs it for
    encoder datasets; ``include_arrays`` extends it to ``source=arrays`` datasets."""
    process = ds.plan.process.to_json()  # the helpers above read the description's JSON form
    if not applies(process, include_arrays):
        return []
    if ds.plan.process.store_x0:
        source = "stored"
    elif ds.plan.flow:
        source = f"reconstructed where {flow_recon(ds.plan)}"
    else:
        source = f"reconstructed where alpha_bar >= {ds.plan.recon_min_alpha_bar}"
    return [latent_scale_from_figures(x0_figures(ds), process, source)]


def run(ctx: Context) -> Check | None:
    """The check for latent records, None (not applicable) otherwise."""
    return next(iter(latent_scale(ctx.ds)), None)
