"""Deprecated: the validator's checks moved to :mod:`pipeline.validate.checks` (one module per
check) and :mod:`pipeline.validate.verdict` (the framework). These names keep working."""

import warnings

from pipeline.validate.checks.completeness import PROBLEMS, completeness  # noqa: F401
from pipeline.validate.checks.conditioning import conditioning  # noqa: F401
from pipeline.validate.checks.convergence import convergence  # noqa: F401
from pipeline.validate.checks.epsilon_moments import epsilon_moments  # noqa: F401
from pipeline.validate.checks.epsilon_normality import epsilon_normality  # noqa: F401
from pipeline.validate.checks.keyed_noise import keyed_noise  # noqa: F401
from pipeline.validate.checks.noise_independence import noise_independence  # noqa: F401
from pipeline.validate.checks.record_consistency import record_consistency  # noqa: F401
from pipeline.validate.checks.timestep_distribution import timestep_distribution  # noqa: F401
from pipeline.validate.checks.variance_preservation import variance_preservation  # noqa: F401
from pipeline.validate.figures import kept_nulls, label_histograms, x0_figures  # noqa: F401
from pipeline.validate.verdict import (  # noqa: F401
    HIGHLIGHT_KINDS,
    Check,
    Highlight,
    corr_item,
    describe,
    family_z,
    litem,
    pitem,
    verdict,
    zitem,
)

warnings.warn(
    "pipeline.checks is deprecated: import from pipeline.validate.verdict or "
    "pipeline.validate.checks",
    DeprecationWarning,
    stacklevel=2,
)
