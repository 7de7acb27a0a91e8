"""Version 0.1's flat module paths (pipeline.moved): each still imports as the very module of its
new home, with a DeprecationWarning naming it; the public names at the package's top."""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import subprocess
import sys
import warnings

import pytest

import pipeline
from pipeline.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module_and_warns(old):
    new = importlib.import_module(f"pipeline.{MOVED[old]}")
    sys.modules.pop(f"pipeline.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"pipeline.{old}")
    assert module is new
    assert any(
        issubclass(w.category, DeprecationWarning) and f"pipeline.{MOVED[old]}" in str(w.message)
        for w in caught
    ), [str(w.message) for w in caught]


def test_every_moved_module_exists_and_no_old_file_is_left():
    root = pipeline.__path__[0]
    for old, new in MOVED.items():
        assert importlib.util.find_spec(f"pipeline.{new}") is not None, new
        assert not (importlib.resources.files(pipeline) / f"{old}.py").is_file(), (root, old)


def test_from_import_of_an_old_name_gives_the_new_class():
    from pipeline.consume.dataset import PrecomputedDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pipeline.dataset import PrecomputedDataset as old  # noqa: F401

    assert old is PrecomputedDataset


def test_public_names_at_the_top():
    from pipeline.consume.dataset import PrecomputedDataset
    from pipeline.consume.hf import export_hf_parquet, to_hf_dataset

    assert pipeline.PrecomputedDataset is PrecomputedDataset
    assert (pipeline.to_hf_dataset, pipeline.export_hf_parquet) == (
        to_hf_dataset,
        export_hf_parquet,
    )
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018


def test_python_dash_m_of_an_old_path_runs_the_new_module():
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.schedule", "--timesteps", "1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "linear            4.036e-05" in res.stdout
