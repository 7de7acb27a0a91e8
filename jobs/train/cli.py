"""Example: train a small denoiser on precomputed records: eps-, v- or velocity-prediction.

The command line (``python -m jobs.train``, ``python jobs/train_example.py``): every option and
its default in ``--help``; the package's docstring (:mod:`jobs.train`) describes the training.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.noising.targets import OBJECTIVES

from .loop import train
from .report import report
from .synthetic import make_synthetic_records


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (options whose default depends on others say so in
    their help instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line on ``argv`` (None: ``sys.argv[1:]``); ``prog``: the name ``--help`` and
    errors show (None: the script's file name). Returns the exit code: 0 when the final training
    loss is below the zero predictor's, else 1; argparse exits with 2 on bad arguments."""
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=_Defaults
    )
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
