"""The example trainer's training loop (:func:`train`): reads the records, builds the model, trains
with AdamW and a one-cycle learning rate, evaluates and writes its outputs."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.consume.dataset import PrecomputedDataset, RecordsDir
from pipeline.noising.targets import Objective
from pipeline.output.description import process_from_metadata

from .checkpoint import save_checkpoint
from .data import KeySplit, check_label_column, loader, scan_records, text_column
from .evaluation import PosteriorKL, curve_point, evaluate
from .model import TinyDenoiser
from .report import save
from .sampling import save_samples

COLUMNS = ["x_t", "t", "epsilon", "posterior_mean", "posterior_variance"]


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
        if rdir.description.buckets is not None:
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
        goal = Objective(objective, process_from_metadata(rdir.description))
        goal.check(rdir.column_names, str(data))
        target = goal.column
        columns += [] if target in columns else [target]
        ds = PrecomputedDataset(
            data, columns=columns, dtype=torch.float32, seed=seed, shuffle_buffer=shuffle_buffer
        )
        schedule = goal.process
        shape = ds.description.shape
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
            curve_batch = next(iter(loader(eval_ds, batch_size, 0, drop_last=False)))
            curve = {"steps": [], "mse": [], "mse_null": [], "records": len(curve_batch["t"])}
            curve_every = max(1, steps // 25)
            drop = torch.Generator().manual_seed(seed)
        start, epoch = time.perf_counter(), 0
        while len(losses) < steps:
            ds.set_epoch(epoch)
            for batch in loader(train_ds, batch_size, workers):
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
                    point = curve_point(model, curve_batch, label, target)
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
            "schedule": ds.description.schedule["name"],
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
            save_checkpoint(model, out / "model.safetensors", ds.description)
            if samples:
                metrics["samples"] = save_samples(model, goal, ds.description, out, samples, seed)
            save(metrics, out)
        return metrics
