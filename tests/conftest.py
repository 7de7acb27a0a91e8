"""Plugins of tests/fixtures (shared fixtures, the integration tier), and composed configs."""

from __future__ import annotations

import pytest

from pipeline.run.config import compose

pytest_plugins = [
    "fixtures.tiers",
    "fixtures.raylocal",
    "fixtures.records",
    "fixtures.runner",
    "fixtures.dataset",
    "fixtures.workers",
]


@pytest.fixture
def make_cfg():
    """make_cfg(*overrides) -> a composed precompute config (progress bar off)."""

    def _make(*overrides: str):
        return compose(["progress=false", *overrides])

    return _make
