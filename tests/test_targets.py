"""pipeline.noising.targets: every objective's prediction implies the right x_0 and eps, the general
posterior KL of the true target is 0, Euler sampling of an exact velocity lands on the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.noising import process
from pipeline.noising.diffusion import q_posterior, q_sample, v_target, velocity
from pipeline.noising.schedule import make_schedule
from pipeline.noising.targets import Objective, euler_sample

PROCS = {
    "ddpm": process.ddpm(make_schedule("cosine", 50)),
    "flow": process.flow(50, shift=3.0),
}


def _batch(proc, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, proc.num_timesteps - 1, (n,), generator=g)  # alpha > 0
    x_t = q_sample(proc, x0, idx, eps)
    mean, var, _ = q_posterior(proc, x0, x_t, idx)
    t = torch.from_numpy(proc.t_column(idx.numpy()))
    batch = {"x_t": x_t, "t": t, "posterior_mean": mean, "posterior_variance": var.reshape(-1)}
    targets = {"eps": eps, "v": v_target(proc, x0, idx, eps), "flow": velocity(x0, eps)}
    return batch, x0, eps, idx, targets


@pytest.mark.parametrize("family", ["ddpm", "flow"])
@pytest.mark.parametrize("name", ["eps", "v", "flow"])
def test_prediction_implies_x0_and_eps(family, name):
    if name == "flow" and family == "ddpm":
        pytest.skip("velocity is flow's target")
    proc = PROCS[family]
    batch, x0, eps, idx, targets = _batch(proc)
    goal = Objective(name, proc)
    assert (goal.index(batch["t"]) == idx).all()  # flow's t = sigma * T maps back to its index
    got_x0, got_eps = goal.x0_eps(batch["x_t"], idx, targets[name])
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)
    total, count = goal.posterior_kl(batch, targets[name])
    assert count == (idx > 0).sum() and total.item() < 1e-15
    wrong, _ = goal.posterior_kl(batch, torch.zeros_like(eps))
    assert wrong.item() > 1.0


def test_objectives_check_their_records():
    with pytest.raises(ValueError, match="schedule=flow"):
        Objective("flow", PROCS["ddpm"]).check(["epsilon", "velocity"], "d")
    with pytest.raises(ValueError, match=r"output\.targets=\[v\]"):
        Objective("v", PROCS["ddpm"]).check(["epsilon"], "d")
    with pytest.raises(ValueError, match="objective must be one of"):
        Objective("x0", PROCS["ddpm"])
    Objective("eps", PROCS["flow"]).check(["epsilon", "velocity"], "d")


def test_euler_sampling_of_the_exact_velocity_lands_on_the_data():
    proc = process.flow(20, shift=3.0)
    c = torch.tensor([0.3, -0.7]).view(1, 2, 1, 1).double()

    class Exact(torch.nn.Module):  # one-point data: u = eps - x_0 = (x - c) / sigma
        shape = (2, 3, 3)

        def forward(self, x, t, labels=None):
            sigma = (t.double() / proc.num_timesteps).view(-1, 1, 1, 1)
            return ((x.double() - c) / sigma).float()

    x = euler_sample(Exact(), proc, 4, seed=1)
    assert x.shape == (4, 2, 3, 3)
    torch.testing.assert_close(x, c.expand_as(x), rtol=0, atol=1e-5)
    assert np.isclose(proc.sigma[-1], 1.0)
