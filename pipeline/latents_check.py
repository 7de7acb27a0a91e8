"""Deprecated: the ``latent_scale`` check moved to :mod:`pipeline.validate.checks.latent_scale`.
These names keep working."""

import warnings

from pipeline.validate.checks.latent_scale import (  # noqa: F401
    CHANNEL_STD_RANGE,
    CHECK_NAME,
    STD_RANGE,
    applies,
    latent_scale,
    latent_scale_from_figures,
    remedy,
)

warnings.warn(
    "pipeline.latents_check is deprecated: import from pipeline.validate.checks.latent_scale",
    DeprecationWarning,
    stacklevel=2,
)
