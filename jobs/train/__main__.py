"""``python -m jobs.train ...`` (from the repository root): the example trainer's command line."""

from .cli import main

raise SystemExit(main(prog="python -m jobs.train"))
