"""Batch sizing by free memory (pipeline.encode.memory): the worker's, its VAE stage's and the
driver's check that one sample fits in an actor."""

from __future__ import annotations

import pytest
from fixtures.runner import run_python

from pipeline.encode.memory import (
    DEVICE_BYTES_PER_ELEMENT,
    fit_batch_size,
    host_memory_share,
    working_set_per_sample,
)


def test_fit_batch_size_caps_to_free_device_memory():
    per_sample = 3 * 64 * 64 * DEVICE_BYTES_PER_ELEMENT  # one 64 px draw: 384 KiB
    assert fit_batch_size(64, per_sample, free_bytes=8 * 2**30) == 64  # fits: unchanged
    # half of 10 MiB free holds 13 such samples
    assert fit_batch_size(64, per_sample, free_bytes=10 * 2**20) == 13
    with pytest.raises(MemoryError, match=r"free the GPU or use ray.device=cpu"):
        fit_batch_size(64, per_sample, free_bytes=2**19)
    with pytest.raises(MemoryError, match=r"of host memory.*smaller source.resolution"):
        fit_batch_size(64, per_sample, free_bytes=2**19, where="host")


def test_working_set_and_host_share():
    per_draw = 3 * 64 * 64 * DEVICE_BYTES_PER_ELEMENT
    assert working_set_per_sample([3, 64, 64], draws=2) == 2 * per_draw
    assert 0 < host_memory_share(1) <= host_memory_share(10**6)


def test_importing_it_does_not_import_torch():
    """The driver imports this module; torch is the actors' cost only."""
    code = "import sys, pipeline.encode.memory; assert 'torch' not in sys.modules"
    res = run_python("-c", code)
    assert res.returncode == 0, res.stderr
