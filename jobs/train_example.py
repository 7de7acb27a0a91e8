"""Example: train a small epsilon-prediction denoiser on precomputed DDPM records.

::

    python jobs/train_example.py --data OUT_DIR --steps 300 --out train-out
    python jobs/train_example.py --data /tmp/synth --make-synthetic 4096 --out train-out

Reads ``x_t``, ``t``, ``epsilon`` and the posterior columns with
:class:`pipeline.dataset.PrecomputedDataset` and a DataLoader, trains a few conv layers with a
timestep embedding on ``MSE(eps_hat, eps)`` and shows that the loss falls below that of predicting
zeros (``E[eps^2]``, about 1). It also evaluates the variational-bound term

    L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) )

with q's mean and variance read from the records (``posterior_mean``, ``posterior_variance``) and
p_theta's mean from the predicted noise, with the schedule rebuilt from the files' metadata
(``t`` is 0-based: ``beta_t = betas[t]``, ``ab_t = alphas_cumprod[t]``)::

    mu_theta = (x_t - beta_t / sqrt(1 - ab_t) * eps_hat) / sqrt(1 - beta_t)

and p_theta's variance fixed to the posterior variance (Ho et al.'s sigma_t^2 = beta~_t), so the
KL is ``||mu_q - mu_theta||^2 / (2 beta~_t)`` per dimension. Records with ``t = 0`` (posterior
variance 0: that step is the decoder term L_0) or ``beta_t = 1`` (zero-terminal-SNR's last step)
are left out. The KL of the true noise is reported as a check of the stored posterior: it is 0
up to the storage dtype's rounding.

Writes ``loss.png`` (loss curve against the zero predictor) and ``metrics.json`` to ``--out``.
Evaluation uses the training records: this shows the data path, it does not measure
generalisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from pipeline.dataset import PrecomputedDataset

COLUMNS = ["x_t", "t", "epsilon", "posterior_mean", "posterior_variance"]


# -- model --------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, num_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of 0-based timesteps, rescaled to a 1000-step range."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * (1000.0 / num_timesteps))[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Block(nn.Module):
    """conv 3x3 -> GroupNorm -> + timestep bias -> SiLU."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, cout), cout)
        self.emb = nn.Linear(emb, cout)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)) + self.emb(e)[:, :, None, None])


class TinyDenoiser(nn.Module):
    """A small two-level conv net predicting eps from (x_t, t).

    Images of 32 pixels or more are first folded into 2x2 patches (PixelUnshuffle), so the
    convolutions run at half resolution: 64x64x3 records train at a few steps per second on CPU.
    """

    def __init__(self, shape, num_timesteps: int, width: int = 32, emb: int = 64):
        super().__init__()
        channels, height, width_px = shape
        self.patch = 2 if min(height, width_px) >= 32 and height % 2 == 0 == width_px % 2 else 1
        cin = channels * self.patch**2
        self.num_timesteps, self.emb_dim = num_timesteps, emb
        self.emb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = Block(cin, width, emb)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = Block(2 * width, 2 * width, emb)
        self.lift = nn.Conv2d(2 * width, width, 1)
        self.up = Block(width, width, emb)
        self.out = nn.Conv2d(width, cin, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.emb(timestep_embedding(t, self.emb_dim, self.num_timesteps))
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)
        h1 = self.inp(x, e)
        h2 = self.mid(self.down(h1), e)
        h2 = F.interpolate(self.lift(h2), size=h1.shape[-2:], mode="nearest")
        y = self.out(self.up(h1 + h2, e))
        return F.pixel_shuffle(y, self.patch) if self.patch > 1 else y


# -- the variational-bound term -----------------------------------------------------------------


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


# -- training -----------------------------------------------------------------------------------


def _loader(ds, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True)


def evaluate(model, ds, kl_term: PosteriorKL, batch_size: int, batches: int) -> dict:
    """MSE, zero-predictor MSE and the L_{t-1} KL (model, zero predictor, true eps)."""
    sums = {"mse": 0.0, "zero_mse": 0.0, "kl": 0.0, "kl_zero": 0.0, "kl_true_eps": 0.0}
    n = kl_n = 0
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(_loader(ds, batch_size, 0)):
            if i >= batches:
                break
            eps_hat = model(batch["x_t"], batch["t"])
            eps = batch["epsilon"]
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
    return out


@contextmanager
def _torch_threads(n: int | None):
    """torch intra-op threads set to ``n`` inside the block (None: unchanged), then restored."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    data,
    steps: int = 300,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    lr: float = 2e-3,
    width: int = 32,
    workers: int = 1,
    seed: int = 0,
    eval_batches: int = 8,
    shuffle_buffer: int = 1024,
    log_every: int = 50,
    quiet: bool = False,
    threads: int | None = None,
) -> dict:
    """Train TinyDenoiser for ``steps`` steps on the records in ``data``; returns the metrics
    (``losses`` per step, ``zero_losses`` = E[eps^2] of each batch, ``final_loss`` and
    ``final_zero_loss`` over the last 10% of steps, and ``eval`` from :func:`evaluate`).

    ``threads``: torch intra-op threads while training (restored afterwards); None leaves them.
    """
    with _torch_threads(threads):
        torch.manual_seed(seed)
        ds = PrecomputedDataset(
            data, columns=COLUMNS, dtype=torch.float32, seed=seed, shuffle_buffer=shuffle_buffer
        )
        schedule = ds.schedule()
        shape = ds.metadata["shape"]
        if ds.num_records < batch_size:
            raise ValueError(
                f"{data} holds {ds.num_records} records, fewer than one batch ({batch_size})"
            )
        model = TinyDenoiser(shape, schedule.num_timesteps, width=width)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=0.1
        )
        kl_term = PosteriorKL(schedule)
        losses, zero_losses = [], []
        start, epoch = time.perf_counter(), 0
        while len(losses) < steps:
            ds.set_epoch(epoch)
            for batch in _loader(ds, batch_size, workers):
                eps = batch["epsilon"]
                loss = F.mse_loss(model(batch["x_t"], batch["t"]), eps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                zero_losses.append(eps.pow(2).mean().item())
                step = len(losses)
                if not quiet and (step % log_every == 0 or step == 1):
                    print(
                        f"step {step:5d}  loss {losses[-1]:.4f}  zero-predictor {zero_losses[-1]:.4f}"
                    )
                if step >= steps:
                    break
            epoch += 1
        elapsed = time.perf_counter() - start
        tail = max(1, steps // 10)
        metrics = {
            "steps": steps,
            "epochs": epoch,
            "seconds": elapsed,
            "records": ds.num_records,
            "shape": shape,
            "schedule": ds.metadata["schedule"]["name"],
            "num_timesteps": schedule.num_timesteps,
            "final_loss": float(np.mean(losses[-tail:])),
            "final_zero_loss": float(np.mean(zero_losses[-tail:])),
            "eval": evaluate(model, ds, kl_term, batch_size, eval_batches),
            "losses": losses,
            "zero_losses": zero_losses,
        }
        if out is not None:
            save(metrics, Path(out))
        return metrics


def save(metrics: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    losses = np.array(metrics["losses"])
    k = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, alpha=0.35, label="MSE(eps_hat, eps) per step")
    ax.plot(np.arange(k - 1, len(losses)), smooth, label=f"moving mean ({k} steps)")
    ax.axhline(np.mean(metrics["zero_losses"]), color="k", ls="--", label="predict zeros: E[eps^2]")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="epsilon-prediction loss")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def report(m: dict) -> str:
    e = m["eval"]
    ln2 = math.log(2.0)
    return "\n".join(
        [
            f"{m['records']} records {m['shape']}, {m['schedule']} T={m['num_timesteps']}: "
            f"{m['steps']} steps in {m['seconds']:.1f} s ({m['epochs']} epochs)",
            f"train loss (last 10%):  {m['final_loss']:.4f}   zero predictor: {m['final_zero_loss']:.4f}",
            f"eval MSE:               {e['mse']:.4f}   zero predictor: {e['zero_mse']:.4f}"
            f"   ({e['records']} records)",
            f"L_(t-1) KL, nats/dim:   {e['kl']:.4g} ({e['kl'] / ln2:.4g} bits/dim)"
            f"   zero predictor: {e['kl_zero']:.4g}   true eps: {e['kl_true_eps']:.2g}"
            f"   ({e['kl_records']} records with t > 0)",
        ]
    )


# -- synthetic records (for trying this without a precompute run) -------------------------------


def make_synthetic_records(
    out,
    num_records: int = 4096,
    shape=(3, 32, 32),
    num_timesteps: int = 1000,
    schedule: str = "linear",
    dtype: str = "float16",
    files: int = 4,
    rows_per_group: int = 256,
    seed: int = 0,
) -> None:
    """Write records of coloured blobs with the pipeline's own noise, forward process and
    posterior, in the record format (one file per synthetic shard, no manifest)."""
    import pyarrow.parquet as pq

    from pipeline import records
    from pipeline.diffusion import q_posterior, q_sample
    from pipeline.manifest import OutputDir
    from pipeline.noise import KeyedNoise
    from pipeline.schedule import make_schedule

    sched = make_schedule(schedule, num_timesteps)
    noise = KeyedNoise(seed, num_timesteps)
    meta = records.make_metadata(
        schedule=sched,
        noise=noise,
        dtype=dtype,
        shape=shape,
        store_x0=False,
        config_hash=f"synthetic-{seed}-{schedule}-{num_timesteps}",
    )
    target = OutputDir(str(out))
    target.makedirs()
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    for f, rows in enumerate(np.array_split(np.arange(num_records), files)):
        n, shard = len(rows), f"synthetic-{f:03d}"
        centre = rng.uniform(-0.6, 0.6, (n, 2, 1, 1))
        radius = rng.uniform(0.2, 0.5, (n, 1, 1))
        blob = np.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / radius**2)
        colour = rng.uniform(-1, 1, (n, c, 1, 1))
        x0 = np.clip(-0.5 + blob[:, None] * (colour + 0.5), -1, 1).astype(np.float32)
        keys = [f"{i:08d}" for i in rows]
        t, eps = noise.draw(shard, keys, np.arange(n), shape)
        x0_t, t_t = torch.from_numpy(x0), torch.from_numpy(t)
        x_t = q_sample(sched, x0_t, t_t, torch.from_numpy(eps))
        mean, var, log_var = q_posterior(sched, x0_t, x_t, t_t)
        m = {**meta, "source": {"url": "synthetic", "shard": shard}}
        schema = records.record_schema(shape, dtype, False, m)
        table = records.build_table(
            schema,
            {
                "key": keys,
                "index": np.arange(n),
                "draw": np.zeros(n, np.int32),
                "t": t.astype(np.int32),
                "x_t": x_t.numpy(),
                "epsilon": eps,
                "posterior_mean": mean.numpy(),
                "posterior_variance": var.reshape(-1).numpy(),
                "posterior_log_variance": log_var.reshape(-1).numpy(),
                "alpha_bar": sched.alphas_cumprod[t].astype(np.float32),
            },
        )
        name = OutputDir.data_name(shard)
        tmp = target.tmp_name(name)
        pq.write_table(
            table,
            target.path(tmp),
            filesystem=target.fs,
            row_group_size=rows_per_group,
            **records.writer_options(schema, compression="zstd", tensor_compression="none"),
        )
        target.commit(tmp, name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="records directory (path or URI)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="train-example", help="where loss.png and metrics.json go")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv level")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: CPUs minus DataLoader workers; oversubscribed OpenMP "
        "threads slow small convolutions down many times)",
    )
    p.add_argument(
        "--make-synthetic",
        type=int,
        metavar="N",
        help="first write N synthetic records (blobs, 3x32x32, linear T=1000) into --data",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.make_synthetic:
        make_synthetic_records(args.data, args.make_synthetic, seed=args.seed)
    try:
        m = train(
            args.data,
            steps=args.steps,
            out=args.out,
            batch_size=args.batch_size,
            lr=args.lr,
            width=args.width,
            workers=args.workers,
            seed=args.seed,
            threads=args.threads or max(1, (os.cpu_count() or 1) - args.workers),
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        p.error(str(exc))
    print(report(m))
    print(f"loss curve: {Path(args.out) / 'loss.png'}")
    return 0 if m["final_loss"] < m["final_zero_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
