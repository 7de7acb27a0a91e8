"""Validate a precomputed DDPM dataset: ``python -m pipeline.validate output.dir=/data/noised``.

The validator reads every committed shard once (bounded memory, in Ray tasks or local
processes), merges the shards' statistics and gives each named check a verdict: a statistic, its
expected value and a tolerance of ``z`` standard errors (raised for families of tests). It
writes ``report.json``, ``report.md`` and PNG plots to ``<output.dir>/validation/``.

Exit codes: :class:`pipeline.errors.ExitCode` (``--help`` lists them).

The package, in the order of the data's path:

* :mod:`~pipeline.validate.cli`: the command line; :mod:`~pipeline.validate.driver`: the run;
* :mod:`~pipeline.validate.plan`: what every shard's scan measures (:class:`ScanPlan`);
* :mod:`~pipeline.validate.scan`: the scan of one shard, batch by batch into
  :mod:`~pipeline.validate.accumulate` (with :mod:`~pipeline.validate.rounding`,
  :mod:`~pipeline.validate.condscan`); :mod:`~pipeline.validate.inventory`: markers, listing,
  rejects; :mod:`~pipeline.validate.cost`: the timer;
* :mod:`~pipeline.validate.measures`: the statistics and their merge;
  :mod:`~pipeline.validate.features`: the named per-record features;
* :mod:`~pipeline.validate.checks`: the check registry, one module per check, built with
  :mod:`~pipeline.validate.verdict` and :mod:`~pipeline.validate.figures`.

The config's schema is :mod:`pipeline.validate.config`; where the scans run,
:mod:`pipeline.validate.executor`; the report, :mod:`pipeline.validate.report`.
"""

from pipeline.validate.cli import load_config, main, run_validation
from pipeline.validate.driver import CannotValidate, open_dataset, run

__all__ = ["CannotValidate", "load_config", "main", "open_dataset", "run", "run_validation"]
