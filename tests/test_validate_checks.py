"""The check registry of pipeline.validate.checks, and the deprecated module names."""

from __future__ import annotations

import importlib
import sys

import pytest
from fixtures.runner import run_python

from pipeline.validate.checks import CHECKS


def test_every_registered_check_has_a_unique_name_and_a_run():
    names = [c.NAME for c in CHECKS]
    assert len(set(names)) == len(names)
    for c in CHECKS:
        assert c.__name__.rsplit(".", 1)[1] == c.NAME  # one module per check, named after it
        assert callable(c.run)


def test_the_package_imports_no_scipy():
    """Pool processes re-import ``python -m pipeline.validate``: the scan needs no scipy."""
    code = (
        "import sys, pipeline.validate, pipeline.validate.scan; assert 'scipy' not in sys.modules"
    )
    res = run_python("-c", code)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "module, names",
    [
        ("pipeline.scan", ["scan_shard", "DatasetStats", "ScanPlan", "t_edges", "half_ulp"]),
        ("pipeline.checks", ["Check", "Highlight", "verdict", "litem", "completeness"]),
        ("pipeline.latents_check", ["latent_scale", "applies", "latent_scale_from_figures"]),
    ],
)
def test_old_module_names_still_work_with_a_deprecation_warning(module, names):
    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match=module):
        mod = importlib.import_module(module)
    assert all(hasattr(mod, n) for n in names)
