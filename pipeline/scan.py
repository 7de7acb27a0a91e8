"""Deprecated: the validator's scan moved to :mod:`pipeline.validate` (plan, accumulate, scan,
measures). These names keep working."""

import warnings

from pipeline.validate.accumulate import Accumulator as _Scanner  # noqa: F401
from pipeline.validate.condscan import CondScan  # noqa: F401
from pipeline.validate.cost import Cost  # noqa: F401
from pipeline.validate.features import CROSS, REC, X0REC  # noqa: F401
from pipeline.validate.measures import DatasetStats, ShardStats, Stats  # noqa: F401
from pipeline.validate.plan import (  # noqa: F401
    CHUNK_ELEMENTS,
    CONSISTENCY,
    U32,
    ScanPlan,
    bin_of_t,
    seed_of,
    t_edges,
)
from pipeline.validate.rounding import finite_rows as _finite_rows  # noqa: F401
from pipeline.validate.rounding import half_ulp  # noqa: F401
from pipeline.validate.scan import scan_shard  # noqa: F401

# Deprecated: the commit-marker fields the validator once kept of each marker (it keeps
# pipeline.output.contracts.CommitMarker.attested() now).
MARKER_FIELDS = ("status", "records", "config_hash", "bytes", "checksum", "side_files", "files")

warnings.warn(
    "pipeline.scan is deprecated: import from pipeline.validate.scan, .plan or .measures",
    DeprecationWarning,
    stacklevel=2,
)
