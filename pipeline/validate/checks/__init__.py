"""The validator's checks, one module each, run in the order of :data:`CHECKS`.

A check module has ``NAME`` (the check's name in the report) and ``run(ctx) -> Check | None``:
it turns the merged statistics of the scan (``ctx.ds``, a
:class:`pipeline.validate.measures.DatasetStats`) into a :class:`pipeline.validate.verdict.Check`
(items with their tolerances, built with :func:`pipeline.validate.verdict.verdict`), or returns
None when it does not apply to this dataset (``latent_scale`` on pixel records). See
:class:`pipeline.validate.checks.context.Context` for what ``ctx`` holds.

Adding a check: write ``pipeline/validate/checks/<name>.py`` with ``NAME`` and ``run``, and add
the module to :data:`CHECKS`. When it needs a statistic the scan does not gather yet, add it to
:class:`pipeline.validate.measures.Stats` (and its ``merge``) and fill it in
:class:`pipeline.validate.accumulate.Accumulator` (docs/architecture.md).
"""

from __future__ import annotations

from pipeline.validate.checks import (
    buckets,
    completeness,
    conditioning,
    convergence,
    epsilon_moments,
    epsilon_normality,
    keyed_noise,
    latent_scale,
    noise_independence,
    record_consistency,
    text,
    timestep_distribution,
    variance_preservation,
)
from pipeline.validate.checks.context import Context

CHECKS = (
    completeness,
    record_consistency,
    keyed_noise,
    epsilon_moments,
    epsilon_normality,
    noise_independence,
    variance_preservation,
    convergence,
    timestep_distribution,
    conditioning,
    buckets,
    latent_scale,
    text,
)

__all__ = ["CHECKS", "Context"]
