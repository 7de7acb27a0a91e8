"""The example trainer as a file: ``python jobs/train_example.py --data DIR ...`` (what the docs and
the demo's hints show) or ``python -m jobs.train_example ...``; the trainer itself is the package
``jobs/train/`` (``python -m jobs.train``), whose docstring describes it.

Run as a file, Python puts this file's folder ``jobs/`` first on ``sys.path``, so the package
imports as ``train``; as a module of ``jobs`` it imports relatively. Its modules import each
other relatively, so both work without touching ``sys.path``.
"""

if __package__:  # python -m jobs.train_example, or imported as jobs.train_example
    from .train.cli import main
else:  # python jobs/train_example.py
    from train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
