"""Example: train a small denoiser on precomputed records: eps-, v- or velocity-prediction.

::

    python jobs/train_example.py --data OUT_DIR --steps 300 --out train-out
    python jobs/train_example.py --data /tmp/synth --make-synthetic 4096 --out train-out
    python jobs/train_example.py --data demo/records --cond cls --out train-cond
    python jobs/train_example.py --data text-records --cond text --out train-text
    python jobs/train_example.py --data flow-records --objective flow --out train-flow

``--objective`` (:mod:`pipeline.noising.targets`): ``eps`` regresses ``epsilon`` (the default,
described below), ``v`` the v-prediction target ``v`` (records made with ``output.targets=[v]``),
``flow`` the rectified-flow ``velocity`` = eps - x_0 (records made with ``schedule=flow``; the
model's timestep is the stored t = sigma * T, samples by Euler steps down the flow grid). The loss
is MSE(prediction, target) against the zero predictor E[target^2]; the held-out loss is reported
per objective, and the variational-bound term below uses the general posterior with the x_0 the
prediction implies.

Reads ``x_t``, ``t``, ``epsilon`` and the posterior columns with
:class:`pipeline.consume.dataset.PrecomputedDataset` and a DataLoader, trains a few conv layers with
a timestep embedding on ``MSE(eps_hat, eps)`` and shows that the loss falls below that of predicting
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

Writes ``loss.png`` (loss curve against the zero predictor), ``metrics.json``, the weights
(``model.safetensors``) and ``samples.png`` (a grid of samples drawn from the trained model by
ancestral sampling through the posterior the records carry, :func:`ancestral_sample`) to
``--out``.
Evaluation uses the training records (unless ``--holdout``): this shows the data path, it does not
measure generalisation.

Class-conditional (``--cond cls``): the int64 conditioning column ``cls`` (``source.keep``, see
:mod:`pipeline.read.conditioning`) selects a row of a class embedding (``num_classes + 1`` rows, the
last being the null label) added to the timestep embedding. During training each label is
replaced by the null label with probability ``--p-uncond`` (classifier-free guidance's joint
training); records whose label is null (read as -1) train as the null label. ``--num-classes``
defaults to the largest label + 1, read from the ``cls`` column with pyarrow before training.
A fraction ``--holdout`` of the samples (default 0.1 with ``--cond``; chosen by a hash of the key,
so both draws of a sample fall on the same side) is kept out of training, and at the end the same
model is evaluated on those records twice, with the same x_t, t and eps: given the true label and
given the null label. The gap between the two MSEs is what the label tells the denoiser; it is
small on images: a K-class label carries at most ln K nats about x_0, so (I-MMSE) it lowers the
eps MSE per dimension, averaged over uniform t, by at most about
``2 ln K / (D min |d ln SNR / d(t/T)|)`` for D = C*H*W dimensions.

Text-conditional (``--cond text``, records made with ``text=clip|sdxl|sd3|flux``): the pooled
caption embedding (:func:`text_column`, read with its records through the loader's join of the
text tables) minus the dataset's unconditional embedding (the empty prompt's, stored once in
``_text/_uncond.parquet``, ``PrecomputedDataset.unconditional()``) goes through a linear layer
added to the timestep embedding; caption dropout (``--p-uncond``) swaps a record's embedding for
the unconditional one, as classifier-free-guidance trainers do, instead of a rate baked into the
cache. The held-out evaluation compares the caption's embedding with the empty prompt's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from pipeline.consume.dataset import PrecomputedDataset, RecordsDir
from pipeline.noising.targets import OBJECTIVES, Objective, euler_sample
from pipeline.output import records

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
    """A small two-level conv net predicting eps from (x_t, t), or from (x_t, t, y) with
    ``num_classes``: a class embedding of ``num_classes + 1`` rows (row ``num_classes`` is the null
    label) added to the timestep embedding.

    Images of 32 pixels or more are first folded into 2x2 patches (PixelUnshuffle), so the
    convolutions run at half resolution: 64x64x3 records train at a few steps per second on CPU.
    """

    def __init__(
        self,
        shape,
        num_timesteps: int,
        width: int = 32,
        emb: int = 64,
        num_classes: int = 0,
        text_dim: int = 0,
    ):
        super().__init__()
        channels, height, width_px = self.shape = tuple(int(v) for v in shape)
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
        # Made last, so the other layers start as the unconditional model's with the same seed.
        self.num_classes = int(num_classes)
        self.label = nn.Embedding(self.num_classes + 1, emb) if self.num_classes else None
        if self.label is not None:
            nn.init.zeros_(self.label.weight)  # starts as the unconditional model
        # Text (``text_dim``): a linear map of a caption's pooled embedding; the null condition
        # is the dataset's unconditional (empty prompt) embedding, a buffer set before training.
        self.text_dim = int(text_dim)
        self.text = nn.Linear(self.text_dim, emb) if self.text_dim else None
        if self.text is not None:
            nn.init.zeros_(self.text.weight)
            nn.init.zeros_(self.text.bias)
            self.register_buffer("null_text", torch.zeros(self.text_dim))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """Embedding rows of labels ``y`` [n]: a negative label (a null, read as -1) or no ``y``
        at all is the null label; ValueError for a label >= num_classes."""
        if y is None:
            return torch.full((n,), self.null_label, dtype=torch.int64)
        y = y.to(torch.int64)
        if (y >= self.num_classes).any():
            raise ValueError(
                f"class label {int(y.max())} >= num_classes = {self.num_classes} "
                "(--num-classes is too small for these records)"
            )
        return torch.where(y < 0, self.null_label, y)

    def drop(self, y: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """``y`` with the rows where ``dropped`` [B] is true replaced by the null condition."""
        if self.text is not None:
            return torch.where(dropped[:, None], self.null_text.to(y.dtype), y)
        return torch.where(dropped, -1, y)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        e = self.emb(timestep_embedding(t, self.emb_dim, self.num_timesteps))
        if self.label is not None:
            e = e + self.label(self.labels(y, len(x)))
        if self.text is not None:  # y [B, text_dim]: caption embeddings; None: the null one
            # centred on the null embedding: the null condition adds the bias alone
            y = torch.zeros_like(self.null_text) if y is None else y.float() - self.null_text
            e = e + self.text(y.expand(len(x), -1))
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


def _loader(ds, batch_size: int, workers: int, drop_last: bool = True) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=drop_last)


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the sample ``key`` is in the held-out ``fraction`` (a stable hash of the key, so
    every draw of a sample and every run agree)."""
    return zlib.crc32(key.encode("utf-8")) % 100_000 < fraction * 100_000


class KeySplit(IterableDataset):
    """The records of ``ds`` (which must read ``key``) on one side of the held-out split."""

    def __init__(self, ds: PrecomputedDataset, fraction: float, held_out: bool):
        super().__init__()
        self.ds, self.fraction, self.held_out = ds, fraction, held_out

    def __iter__(self):
        for record in self.ds:
            if is_held_out(record["key"], self.fraction) == self.held_out:
                yield record


def scan_records(rdir: RecordsDir, label: str | None, holdout: float) -> dict:
    """Counts read with pyarrow before training (the ``key`` and ``label`` columns only):
    ``held_out`` records and, with ``label``, ``null_labels`` (null or -1), the largest label
    ``max_label`` (None when every label is null) and ``class_counts`` {label: records}.
    ValueError for a label below -1."""
    columns = ([label] if label else []) + (["key"] if holdout else [])
    out = {"records": rdir.num_records, "held_out": 0}
    values = []
    for unit in rdir.units() if columns else ():
        table = rdir.read(unit, columns)
        if holdout:
            keys = table["key"].to_pylist()
            out["held_out"] += sum(is_held_out(k, holdout) for k in keys)
        if label:
            values.append(table[label].fill_null(-1).to_numpy())
    if label:
        y = np.concatenate(values) if values else np.zeros(0, np.int64)
        if (y < -1).any():
            raise ValueError(
                f"column {label!r} holds negative labels (smallest {int(y.min())}): class "
                "labels must be 0..num_classes-1 (a null or -1 trains as the null label)"
            )
        classes, counts = np.unique(y[y >= 0], return_counts=True)
        out["null_labels"] = int((y < 0).sum())
        out["max_label"] = int(classes[-1]) if len(classes) else None
        out["class_counts"] = {int(c): int(n) for c, n in zip(classes, counts)}
    return out


def check_label_column(rdir: RecordsDir, column: str) -> None:
    """ValueError unless ``column`` is an int64 conditioning column of the records (listed in
    the metadata's ``conditioning`` entry, :mod:`pipeline.read.conditioning`)."""
    from pipeline.read.conditioning import spec_of

    kept = {k.column: k for k in spec_of(rdir.metadata).kept}
    ints = [c for c, k in kept.items() if k.type == "int64"]
    hint = f"int64 conditioning columns of these records: {', '.join(ints) or 'none'}"
    if column not in kept:
        raise ValueError(
            f"--cond {column}: the records in {rdir.uri} have no conditioning column {column!r} "
            f"(kept: {', '.join(kept) or 'none'}; see source.keep); {hint}"
        )
    if kept[column].type != "int64":
        raise ValueError(
            f"--cond {column}: {column!r} is a {kept[column].type} column; this example "
            f"conditions on integer class labels; {hint}"
        )


def text_column(rdir: RecordsDir) -> str:
    """The caption embedding ``--cond text`` conditions on: the pooled column of the first text
    encoder that stores one (``clip_pooled``, ``clip_g_pooled`` for sdxl, ``clip_l_pooled`` for
    sd3 and flux); ValueError naming the fix for records without one."""
    from pipeline.encode.text import column_names

    meta = rdir.metadata.get("text")
    if not meta:
        raise ValueError(
            f"--cond text: the records in {rdir.uri} have no text embeddings (made without "
            "text=...): precompute them with text=clip text.model=<folder> (or sdxl, sd3, flux)"
        )
    pooled = [column_names(e)["pooled"] for e in meta["encoders"] if "pooled" in e["output"]]
    if not pooled:
        names = ", ".join(e["name"] for e in meta["encoders"])
        raise ValueError(
            f"--cond text: the text encoders of {rdir.uri} ({names}) store no pooled embedding; "
            "this example conditions on one: text=clip, sdxl, sd3 or flux"
        )
    return pooled[0]


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
        for i, batch in enumerate(_loader(ds, batch_size, 0, drop_last=False)):
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


def _curve_point(model, batch: dict, label: str, target: str) -> tuple[float, float]:
    """(MSE given the labels, MSE given the null label) of one fixed batch."""
    model.eval()
    with torch.no_grad():
        x, t, eps = batch["x_t"], batch["t"], batch[target]
        cond = F.mse_loss(model(x, t, batch[label]), eps).item()
        null = F.mse_loss(model(x, t, None), eps).item()
    model.train()
    return cond, null


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
    cond: str | None = None,
    num_classes: int | None = None,
    p_uncond: float = 0.1,
    holdout: float | None = None,
    samples: int = 16,
    objective: str = "eps",
) -> dict:
    """Train TinyDenoiser for ``steps`` steps on the records in ``data``; returns the metrics
    (``losses`` per step, ``zero_losses`` = E[eps^2] of each batch, ``final_loss`` and
    ``final_zero_loss`` over the last 10% of steps, and ``eval`` from :func:`evaluate`).

    ``threads``: torch intra-op threads while training (restored afterwards); None leaves them.
    ``cond``: an int64 conditioning column (``cls``) to train a class-conditional model on, with
    ``num_classes`` (default: largest label + 1) and label dropout ``p_uncond``; or ``"text"``:
    the pooled caption embedding (:func:`text_column`), dropped with ``p_uncond`` to the stored
    unconditional embedding (``PrecomputedDataset.unconditional()``, the empty prompt's); adds
    ``cond`` (the label statistics) and ``curve`` (MSE given the label and given the null label
    of one fixed evaluation batch, every few steps) to the metrics. ``holdout``: fraction of samples
    left out of training and evaluated on (default 0.1 with ``cond``, else 0: evaluation on the
    training records). With ``out``: the weights go to ``model.safetensors``
    (:func:`save_checkpoint`) and ``samples`` generated samples to ``samples.png``
    (:func:`save_samples`; 0: none), beside ``loss.png`` and ``metrics.json``. ``objective``:
    eps | v | flow (:class:`pipeline.noising.targets.Objective`), the column the loss regresses.
    """
    if holdout is None:
        holdout = 0.1 if cond else 0.0
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    with _torch_threads(threads):
        torch.manual_seed(seed)
        columns = list(COLUMNS)
        scan = None
        text = cond == "text"
        label = cond  # the column the model is conditioned on
        rdir = RecordsDir(data)
        if rdir.metadata.get("buckets") is not None:
            raise ValueError(
                f"{data} holds aspect-ratio buckets (source.buckets), a sample shape per bucket; "
                "this example trains one shape: train with PrecomputedDataset(..., batch_size=B), "
                "whose batches never mix shapes (docs/buckets.md), or precompute with "
                "source.buckets=null"
            )
        if cond or holdout:
            if text:
                label = text_column(rdir)
                columns.append(label)
            elif cond:
                check_label_column(rdir, cond)
                columns.append(cond)
            scan = scan_records(rdir, None if text else cond, holdout)
            if holdout:
                columns.append("key")
        goal = Objective(objective, records.process_from_metadata(rdir.metadata))
        goal.check(rdir.column_names, str(data))
        target = goal.column
        columns += [] if target in columns else [target]
        ds = PrecomputedDataset(
            data, columns=columns, dtype=torch.float32, seed=seed, shuffle_buffer=shuffle_buffer
        )
        schedule = goal.process
        shape = ds.metadata["shape"]
        train_records = ds.num_records - (scan["held_out"] if scan else 0)
        if train_records < batch_size:
            raise ValueError(
                f"{data} holds {train_records} training records, fewer than one batch "
                f"({batch_size})" + (f" ({scan['held_out']} held out)" if holdout else "")
            )
        if holdout and scan["held_out"] == 0:
            raise ValueError(
                f"no sample of {data} falls in the held-out fraction {holdout}: raise --holdout"
            )
        if cond and not text:
            if scan["max_label"] is None and num_classes is None:
                raise ValueError(f"every {cond!r} label of {data} is null: nothing to condition on")
            inferred = 0 if scan["max_label"] is None else scan["max_label"] + 1
            if num_classes is None:
                num_classes = inferred
            elif num_classes < inferred:
                raise ValueError(
                    f"num_classes = {num_classes} but {cond!r} holds label {inferred - 1}"
                )
        train_ds = KeySplit(ds, holdout, held_out=False) if holdout else ds
        eval_ds = KeySplit(ds, holdout, held_out=True) if holdout else ds
        text_dim = 0
        if text:
            null_text = ds.unconditional()[label].float()  # _text/_uncond.parquet
            text_dim = len(null_text)
        model = TinyDenoiser(
            shape, schedule.num_timesteps, width=width, num_classes=num_classes or 0,
            text_dim=text_dim,
        )  # fmt: skip
        if text:
            model.null_text.copy_(null_text)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=0.1
        )
        # DDPM eps: Ho et al.'s model mean; otherwise the general posterior with the implied x_0
        ddpm_eps = objective == "eps" and schedule.family == "ddpm"
        kl_term = PosteriorKL(schedule.schedule) if ddpm_eps else goal.posterior_kl
        losses, zero_losses = [], []
        curve = None
        if cond:
            # One fixed evaluation batch, scored given the labels and the null label as we go.
            curve_batch = next(iter(_loader(eval_ds, batch_size, 0, drop_last=False)))
            curve = {"steps": [], "mse": [], "mse_null": [], "records": len(curve_batch["t"])}
            curve_every = max(1, steps // 25)
            drop = torch.Generator().manual_seed(seed)
        start, epoch = time.perf_counter(), 0
        while len(losses) < steps:
            ds.set_epoch(epoch)
            for batch in _loader(train_ds, batch_size, workers):
                eps = batch[target]
                if cond:
                    y = batch[label]
                    dropped = torch.rand(len(y), generator=drop) < p_uncond
                    y = model.drop(y, dropped)  # the null label, or the empty prompt's embedding
                    loss = F.mse_loss(model(batch["x_t"], batch["t"], y), eps)
                else:
                    loss = F.mse_loss(model(batch["x_t"], batch["t"]), eps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                zero_losses.append(eps.pow(2).mean().item())
                step = len(losses)
                logged = not quiet and (step % log_every == 0 or step == 1)
                if cond and (logged or step % curve_every == 0 or step == steps):
                    point = _curve_point(model, curve_batch, label, target)
                    curve["steps"].append(step)
                    curve["mse"].append(point[0])
                    curve["mse_null"].append(point[1])
                if logged:
                    line = (
                        f"step {step:5d}  loss {losses[-1]:.4f}"
                        f"  zero-predictor {zero_losses[-1]:.4f}"
                    )
                    if cond:
                        line += (
                            f"  eval batch: given label {curve['mse'][-1]:.4f}"
                            f"  null label {curve['mse_null'][-1]:.4f}"
                        )
                    print(line)
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
            "objective": objective,
            "target": target,
            "num_timesteps": schedule.num_timesteps,
            "final_loss": float(np.mean(losses[-tail:])),
            "final_zero_loss": float(np.mean(zero_losses[-tail:])),
            "eval": evaluate(model, eval_ds, kl_term, batch_size, eval_batches, label, target),
            "losses": losses,
            "zero_losses": zero_losses,
        }
        if holdout:
            metrics["holdout"] = holdout
            metrics["held_out_records"] = scan["held_out"]
        if text:
            metrics["cond"] = {"column": "text", "embedding": label, "p_uncond": p_uncond,
                               "null": "the stored unconditional embedding"}  # fmt: skip
            metrics["curve"] = curve
        elif cond:
            metrics["cond"] = {
                "column": cond,
                "num_classes": num_classes,
                "p_uncond": p_uncond,
                "null_labels": scan["null_labels"],
                "class_counts": scan["class_counts"],
            }
            metrics["curve"] = curve
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(model, out / "model.safetensors", ds.metadata)
            if samples:
                metrics["samples"] = save_samples(model, goal, ds.metadata, out, samples, seed)
            save(metrics, out)
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


# -- checkpoint and samples ---------------------------------------------------------------------


def save_checkpoint(model: TinyDenoiser, path: Path, records_meta: dict) -> None:
    """The model's weights as safetensors (never a pickle), with what rebuilds it (shape, width,
    classes) and the records' schedule in the file's metadata; see :func:`load_checkpoint`."""
    from safetensors.torch import save_file

    config = {
        "shape": list(records_meta["shape"]),
        "num_timesteps": model.num_timesteps,
        "width": model.inp.conv.out_channels,
        "emb": model.emb_dim,
        "num_classes": model.num_classes,
        "text_dim": model.text_dim,
        "schedule": records_meta["schedule"],
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(config)})


def load_checkpoint(path) -> tuple[TinyDenoiser, dict]:
    """(model in eval mode, its config) from a file written by :func:`save_checkpoint`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    model = TinyDenoiser(
        config["shape"], config["num_timesteps"], width=config["width"], emb=config["emb"],
        num_classes=config["num_classes"], text_dim=config.get("text_dim", 0),
    )  # fmt: skip
    model.load_state_dict(load_file(str(path)))
    return model.eval(), config


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


def save_samples(model, goal, meta: dict, out: Path, n: int, seed: int = 0) -> dict:
    """``n`` samples of ``model`` (a conditional model: labels 0, 1, ... in turn) drawn with
    :func:`ancestral_sample` (eps, v: through the eps the prediction implies) or for ``flow`` by
    Euler steps (:func:`pipeline.noising.targets.euler_sample`), saved as ``samples.png`` in
    ``out``; ``goal``: the :class:`pipeline.noising.targets.Objective`. Returns their summary."""
    schedule = goal.process
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = not meta.get("encoder")
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
    title = f"{n} {how} samples, {meta['schedule']['name']} T={schedule.num_timesteps}, {what}"
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


# -- synthetic records (for trying this without a precompute run) -------------------------------


def palette(classes: int, channels: int) -> np.ndarray:
    """``classes`` distinct fixed colours [classes, channels] in [-1, 1]: channel ``c`` of colour
    ``k`` is level ``k * (2c + 1) mod classes`` of ``classes`` evenly spaced levels."""
    k, c = np.arange(classes)[:, None], np.arange(channels)[None]
    levels = (k * (2 * c + 1)) % classes
    return (-1.0 + 2.0 * levels / max(classes - 1, 1)).astype(np.float64)


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
    classes: int = 0,
    informative: bool = True,
    null_labels: float = 0.0,
) -> None:
    """Write records of coloured blobs with the pipeline's own noise, forward process and
    posterior, in the record format (one file per synthetic shard, no manifest).

    ``classes`` > 0: each blob takes one of ``classes`` fixed colours (:func:`palette`) and the
    records carry a ``cls`` conditioning column (int64, ``source.keep=[cls]`` in the metadata), the
    colour's index; ``informative=False`` draws the labels independently of the colours (a
    control: the label then tells nothing); a fraction ``null_labels`` of the records has a null
    label (an absent ``.cls`` member)."""
    import pyarrow.parquet as pq

    from pipeline.noising.diffusion import q_posterior, q_sample
    from pipeline.noising.noise import KeyedNoise
    from pipeline.noising.schedule import make_schedule
    from pipeline.output import records
    from pipeline.output.manifest import OutputDir
    from pipeline.read.conditioning import Conditioning

    sched = make_schedule(schedule, num_timesteps)
    noise = KeyedNoise(seed, num_timesteps)
    meta = records.make_metadata(
        schedule=sched,
        noise=noise,
        dtype=dtype,
        shape=shape,
        store_x0=False,
        config_hash=f"synthetic-{seed}-{schedule}-{num_timesteps}"
        + (f"-cls{classes}{'' if informative else 'r'}" if classes else ""),
        conditioning=Conditioning(["cls"]).describe() if classes else None,
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
        extra = {}
        if classes:
            colour_class = rng.integers(classes, size=n)
            colour = palette(classes, c)[colour_class][:, :, None, None]
            label = colour_class if informative else rng.integers(classes, size=n)
            null = rng.random(n) < null_labels
            extra["cls"] = [None if z else int(v) for v, z in zip(label, null)]
        else:
            colour = rng.uniform(-1, 1, (n, c, 1, 1))
        if classes:
            x0 = (colour * (0.5 + 0.5 * blob[:, None])).astype(np.float32)
        else:
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
                "snr": sched.snr[t].astype(np.float32),
                **extra,
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


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (options whose default depends on others say so in
    their help instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Defaults)
    p.add_argument("--data", required=True, help="records directory (path or URI)")
    p.add_argument(
        "--objective", choices=OBJECTIVES, default="eps",
        help="what the model predicts: eps (epsilon), v (v, records with output.targets=[v]) or "
        "flow (velocity = eps - x_0, records with schedule=flow)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument(
        "--out",
        default="train-example",
        help="where loss.png, metrics.json, model.safetensors and samples.png go",
    )
    p.add_argument(
        "--samples", type=int, default=16, help="generated samples drawn into samples.png (0: none)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="records per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv level")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="model, shuffle and sampling seed")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: CPUs minus DataLoader workers; oversubscribed OpenMP "
        "threads slow small convolutions down many times)",
    )
    p.add_argument(
        "--cond",
        metavar="COLUMN",
        help="train a class-conditional model on this int64 conditioning column (e.g. cls), or "
        "'text': on the pooled caption embedding of records made with text=clip|sdxl|sd3|flux",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        help="with --cond: number of classes (default: the largest label in the records + 1)",
    )
    p.add_argument(
        "--p-uncond",
        type=float,
        help="with --cond: probability of replacing a label by the null label while training "
        "(classifier-free guidance; default 0.1)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        help="fraction of samples (by key) left out of training and evaluated on "
        "(default: 0.1 with --cond, else 0: evaluate on training records)",
    )
    p.add_argument(
        "--make-synthetic",
        type=int,
        metavar="N",
        help="first write N synthetic records (blobs, 3x32x32, linear T=1000) into --data; "
        "with --cond cls their colour is one of --synthetic-classes and their cls label",
    )
    p.add_argument(
        "--synthetic-classes",
        type=int,
        metavar="K",
        help="with --make-synthetic: K blob colours labelled in a cls column "
        "(default: 4 with --cond, else 0: random colours and no label)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        p.error("--num-classes must be >= 1")
    if (args.num_classes is not None or args.p_uncond is not None) and not args.cond:
        p.error("--num-classes and --p-uncond apply to a conditional model: add --cond COLUMN")
    if args.cond == "text" and (args.make_synthetic or args.num_classes is not None):
        p.error("--cond text reads the text embeddings of a precompute run (text=clip ...): "
                "--make-synthetic and --num-classes do not apply")  # fmt: skip
    if args.make_synthetic:
        classes = args.synthetic_classes
        if classes is None:
            classes = 4 if args.cond else 0
        make_synthetic_records(args.data, args.make_synthetic, seed=args.seed, classes=classes)
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
            cond=args.cond,
            num_classes=args.num_classes,
            p_uncond=0.1 if args.p_uncond is None else args.p_uncond,
            holdout=args.holdout,
            samples=args.samples,
            objective=args.objective,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        p.error(str(exc))
    print(report(m))
    print(f"loss curve: {Path(args.out) / 'loss.png'}")
    print(f"checkpoint: {Path(args.out) / 'model.safetensors'}")
    if m.get("samples"):
        sm = m["samples"]
        print(
            f"samples:    {Path(args.out) / 'samples.png'}"
            f" ({sm['n']} drawn in {sm['seconds']:.1f} s)"
        )
    return 0 if m["final_loss"] < m["final_zero_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
