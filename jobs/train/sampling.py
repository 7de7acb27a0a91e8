"""Samples of a trained model: ancestral sampling through the posterior the records carry
(:func:`ancestral_sample`), Euler steps for rectified flow, and the grid drawn into
``samples.png`` (:func:`sample_grid`, :func:`save_samples`)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pipeline.noising.targets import euler_sample
from pipeline.output.description import ProcessMetadata

from .model import TinyDenoiser


@torch.no_grad()
def ancestral_sample(
    model: TinyDenoiser,
    schedule,
    n: int,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    clip: bool = True,
) -> torch.Tensor:
    """``n`` samples [n, C, H, W] by ancestral sampling (Ho et al. alg. 2), float64.

    From x_T ~ N(0, I), each step predicts eps, x0_hat = predict_x0_from_eps (clipped to [-1, 1]
    with ``clip``, for pixel records) and draws x_{t-1} ~ q(x_{t-1} | x_t, x0_hat): the posterior
    the records carry (:func:`pipeline.noising.diffusion.q_posterior`, variance beta~_t), from the
    schedule of the records' metadata. The last step (t = 0) returns the mean. Steps whose
    alpha_bar is 0 (zero-terminal SNR's last) are skipped: x_T starts one step below.
    ``labels`` [n]: class labels for a conditional model (-1 or None: the null label).
    """
    from pipeline.noising.diffusion import predict_x0_from_eps, q_posterior

    g = torch.Generator().manual_seed(seed)
    shape = (n, *model.shape)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    top = int(np.flatnonzero(np.asarray(schedule.alphas_cumprod) > 0).max())
    model.eval()
    for step in range(top, -1, -1):
        t = torch.full((n,), step, dtype=torch.int64)
        eps_hat = model(x.float(), t, labels).double()
        x0 = predict_x0_from_eps(schedule, x, t, eps_hat)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, log_var = q_posterior(schedule, x0, x, t)
        if step == 0:
            return mean
        x = mean + torch.exp(0.5 * log_var) * torch.randn(shape, generator=g, dtype=x.dtype)
    return x


def sample_grid(samples: torch.Tensor, pixels: bool) -> np.ndarray:
    """A grid image [rows*H, cols*W, 3] in [0, 1] of samples [n, C, H, W]: pixel records
    (in [-1, 1]) as images (1 or 3 channels); latents as their first three channels (or the
    first one, grey), each sample scaled to its own min..max."""
    x = samples.double()
    c = x.shape[1]
    x = x[:, :3] if c >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    if pixels:
        x = (x.clamp(-1, 1) + 1) / 2
    else:
        lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    n, _, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + 2), cols * (w + 2), 3))
    for i, img in enumerate(x.numpy().transpose(0, 2, 3, 1)):
        r, q = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = img
    return grid


class _EpsModel:
    """A v-prediction model seen as an eps-prediction one (for :func:`ancestral_sample`)."""

    def __init__(self, model, goal):
        self.model, self.goal, self.shape = model, goal, model.shape

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, x, t, labels=None):
        return self.goal.x0_eps(x, t, self.model(x, t, labels))[1]


def save_samples(
    model, goal, description: ProcessMetadata | Mapping, out: Path, n: int, seed: int = 0
) -> dict:
    """``n`` samples of ``model`` (a conditional model: labels 0, 1, ... in turn) drawn with
    :func:`ancestral_sample` (eps, v: through the eps the prediction implies) or for ``flow`` by
    Euler steps (:func:`pipeline.noising.targets.euler_sample`), saved as ``samples.png`` in
    ``out``; ``goal``: the :class:`pipeline.noising.targets.Objective`; ``description``: the
    records' process description (``PrecomputedDataset.description`` or its JSON dict), whose
    ``encoder`` (latents: none) and schedule name the plot shows. Returns their summary."""
    schedule = goal.process
    description = ProcessMetadata.from_json(description)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = not description.encoder
    labels = None
    if model.num_classes:
        labels = torch.arange(n) % model.num_classes
    start = time.perf_counter()
    if goal.name == "flow":
        samples = euler_sample(model, schedule, n, labels, seed=seed)
    else:
        net = model if goal.name == "eps" else _EpsModel(model, goal)
        samples = ancestral_sample(net, schedule, n, labels, seed=seed, clip=pixels)
    seconds = time.perf_counter() - start
    grid = sample_grid(samples, pixels)
    scale = max(1.0, 256 / grid.shape[0])
    fig, ax = plt.subplots(
        figsize=(grid.shape[1] * scale / 100 + 0.4, grid.shape[0] * scale / 100 + 0.6)
    )
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    what = "pixels" if pixels else "latents (first channels, min..max per sample)"
    how = "Euler" if goal.name == "flow" else "ancestral"
    title = f"{n} {how} samples, {description.schedule['name']} T={schedule.num_timesteps}, {what}"
    if labels is not None:
        title += (
            f"\nclass labels {', '.join(str(int(v)) for v in labels[: model.num_classes])}, ..."
        )
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    return {
        "n": n,
        "seconds": seconds,
        "mean": samples.mean().item(),
        "std": samples.std().item(),
        "finite": bool(torch.isfinite(samples).all()),
    }
