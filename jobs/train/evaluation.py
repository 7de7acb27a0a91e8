"""The example trainer's evaluation: the held-out (or training) MSE against the zero predictor's,
the variational-bound term L_{t-1} (:class:`PosteriorKL`) and, for a conditional model, the gap
between the MSE given the label and given the null label (:func:`evaluate`, :func:`curve_point`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import loader


class PosteriorKL:
    """KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) per dimension, from predicted noise."""

    def __init__(self, schedule):
        self.betas = torch.from_numpy(np.array(schedule.betas))
        self.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))

    def model_mean(self, x_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        beta = self.betas[t].view(-1, *([1] * (x_t.ndim - 1)))
        ab = self.alphas_cumprod[t].view_as(beta)
        mu = (x_t.double() - beta / torch.sqrt(1.0 - ab) * eps_hat.double()) / torch.sqrt(1 - beta)
        return mu

    def __call__(self, batch: dict, eps_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-record KL in nats per dimension, number of records used)."""
        t, var = batch["t"], batch["posterior_variance"].double()
        keep = (t > 0) & (var > 0) & (self.betas[t] < 1.0)
        if not keep.any():
            return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        mu = self.model_mean(batch["x_t"][keep], t[keep], eps_hat[keep])
        diff2 = (batch["posterior_mean"][keep].double() - mu) ** 2
        kl = diff2.flatten(1).mean(1) / (2.0 * var[keep])
        return kl.sum(), keep.sum()


def evaluate(
    model,
    ds,
    kl_term,
    batch_size: int,
    batches: int,
    label: str | None = None,
    target: str = "epsilon",
) -> dict:
    """MSE, zero-predictor MSE and the L_{t-1} KL (model, zero predictor, true eps).

    With ``label`` (a class-conditional model) ``mse`` and ``kl`` are the model's given the
    records' labels and ``mse_null`` its MSE on the same records (same x_t, t, eps) given the null
    label; ``mse_gap`` = mse_null - mse, ``mse_gap_se`` its standard error over records."""
    sums = {"mse": 0.0, "zero_mse": 0.0, "kl": 0.0, "kl_zero": 0.0, "kl_true_eps": 0.0}
    gaps = []
    n = kl_n = 0
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader(ds, batch_size, 0, drop_last=False)):
            if i >= batches:
                break
            eps = batch[target]  # the objective's target (epsilon, v or velocity)
            if label is None:
                eps_hat = model(batch["x_t"], batch["t"])
            else:
                eps_hat = model(batch["x_t"], batch["t"], batch[label])
                null_hat = model(batch["x_t"], batch["t"], None)
                per_cond = (eps_hat - eps).pow(2).flatten(1).mean(1)
                per_null = (null_hat - eps).pow(2).flatten(1).mean(1)
                gaps.append((per_null - per_cond).double())
            sums["mse"] += F.mse_loss(eps_hat, eps).item() * len(eps)
            sums["zero_mse"] += eps.pow(2).mean().item() * len(eps)
            n += len(eps)
            for name, pred in (
                ("kl", eps_hat),
                ("kl_zero", torch.zeros_like(eps)),
                ("kl_true_eps", eps),
            ):
                total, count = kl_term(batch, pred)
                sums[name] += total.item()
            kl_n += int(count)
    model.train()
    out = {k: v / max(n, 1) for k, v in sums.items() if k in ("mse", "zero_mse")}
    out.update({k: v / max(kl_n, 1) for k, v in sums.items() if k.startswith("kl")})
    out["records"], out["kl_records"] = n, kl_n
    if label is not None:
        gap = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)
        out["mse_gap"] = gap.mean().item() if len(gap) else 0.0
        out["mse_null"] = out["mse"] + out["mse_gap"]
        out["mse_gap_se"] = (gap.std() / math.sqrt(len(gap))).item() if len(gap) > 1 else 0.0
    return out


def curve_point(model, batch: dict, label: str, target: str) -> tuple[float, float]:
    """(MSE given the labels, MSE given the null label) of one fixed batch."""
    model.eval()
    with torch.no_grad():
        x, t, eps = batch["x_t"], batch["t"], batch[target]
        cond = F.mse_loss(model(x, t, batch[label]), eps).item()
        null = F.mse_loss(model(x, t, None), eps).item()
    model.train()
    return cond, null
