"""Training objectives on the records: which column a model regresses, and what its prediction
implies for x_0 and eps, for either family of :mod:`pipeline.noising.process`.

============  ===========  =====================================================  ===============
objective     column       target                                                 records
============  ===========  =====================================================  ===============
``eps``       ``epsilon``  eps                                                    any
``v``         ``v``        alpha_t eps - sigma_t x_0 (Salimans and Ho 2022)       ``targets=[v]``
``flow``      ``velocity`` eps - x_0 (rectified flow, SD3 / Flux)                 ``schedule=flow``
============  ===========  =====================================================  ===============

With x_t = alpha x_0 + sigma eps, a prediction of any target gives both x_0 and eps
(:meth:`Objective.x0_eps`), so a sampler or a variational-bound term can run on any objective:
``eps``: x_0 = (x_t - sigma eps) / alpha; ``v``: x_0 = (alpha x_t - sigma v) / (alpha^2 +
sigma^2), eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2); ``flow``: x_0 = x_t - sigma u, eps
= x_t + alpha u (alpha + sigma = 1). Shapes: ``x_t``, predictions [B, ...]; grid indices [B].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.noising.process import GaussianProcess

COLUMNS = {"eps": "epsilon", "v": "v", "flow": "velocity"}
OBJECTIVES = tuple(COLUMNS)


def _col(table: np.ndarray, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.from_numpy(np.ascontiguousarray(table[idx.numpy()])).to(like.dtype)
    return v.view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class Objective:
    """What a model predicts (``name``: eps | v | flow) on records of ``process``."""

    name: str
    process: GaussianProcess

    def __post_init__(self):
        if self.name not in COLUMNS:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.name!r}")

    @property
    def column(self) -> str:
        """The record column the loss compares the prediction with."""
        return COLUMNS[self.name]

    def check(self, columns, where: str) -> None:
        """ValueError naming the fix when records with ``columns`` cannot train this objective."""
        fam = self.process.family
        if self.name == "flow" and fam != "flow":
            raise ValueError(
                f"--objective flow needs rectified-flow records (schedule=flow); {where} is {fam}"
            )
        if self.column not in columns:
            raise ValueError(
                f"{where} has no {self.column!r} column for --objective {self.name}: make the "
                "records with output.targets=[v]"
                if self.name == "v"
                else f"{where} has no {self.column!r} column"
            )

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Grid indices [B] (int64) of the records' stored ``t`` (flow: sigma * T)."""
        return torch.from_numpy(self.process.grid_index(t.numpy()))

    def x0_eps(
        self, x_t: torch.Tensor, idx: torch.Tensor, pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by a prediction ``pred`` of this objective's target, float64."""
        x, y = x_t.double(), pred.double()
        a, s = _col(self.process.alpha, idx, x), _col(self.process.sigma, idx, x)
        if self.name == "eps":
            return (x - s * y) / a, y
        if self.name == "v":
            n = a * a + s * s
            return (a * x - s * y) / n, (s * x + a * y) / n
        return x - s * y, x + a * y

    def posterior_kl(self, batch: dict, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over records of KL(q(x_s | x_t, x_0) || p(x_s | x_t, x0_hat)) per dimension, the
        number of records used): the general posterior of the previous grid point with x_0
        replaced by the prediction's, the variance the records' (q's). Records at the first
        point (variance 0) or where alpha = 0 are left out."""
        idx = self.index(batch["t"])
        p = self.process
        var = batch["posterior_variance"].double()
        keep = (idx > 0) & (var > 0) & torch.from_numpy(p.alpha[idx.clamp_min(0).numpy()] > 0)
        if not keep.any():
            return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        x_t, i = batch["x_t"][keep].double(), idx[keep]
        x0, _ = self.x0_eps(x_t, i, pred[keep])
        mu = _col(p.posterior_mean_coef1, i, x_t) * x0 + _col(p.posterior_mean_coef2, i, x_t) * x_t
        diff2 = (batch["posterior_mean"][keep].double() - mu) ** 2
        return (diff2.flatten(1).mean(1) / (2.0 * var[keep])).sum(), keep.sum()


@torch.no_grad()
def euler_sample(model, process: GaussianProcess, n: int, labels=None, seed: int = 0):
    """``n`` samples [n, *model.shape] of a velocity model (``model(x, t, labels)`` predicts
    eps - x_0) by Euler steps down the flow grid from x = eps at sigma = 1: x <- x + (sigma_prev
    - sigma) u_hat, the last step to sigma = 0 (the data), as diffusers'
    FlowMatchEulerDiscreteScheduler steps on its training grid. float64 state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *model.shape), generator=g, dtype=torch.float64)
    sig = np.concatenate([[0.0], process.sigma])
    model.eval()
    for k in range(process.num_timesteps - 1, -1, -1):
        t = torch.full((n,), float(process.timesteps[k]), dtype=torch.float32)
        u = model(x.float(), t, labels).double()
        x = x + (sig[k] - sig[k + 1]) * u
    return x
