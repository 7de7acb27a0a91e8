"""Typed ``source`` groups for the tests of :mod:`pipeline.read`: the dataclasses the actors
receive (:func:`pipeline.run.config.actor_config`), composed from ``conf/`` so that every value a
test leaves alone is the configured default."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from omegaconf import OmegaConf

from pipeline.run.config import ArraysSource, ImagesSource, compose


@cache
def _composed(kind: str) -> ImagesSource | ArraysSource:
    cfg = compose([f"source={kind}", "source.urls=unused.tar"])
    return OmegaConf.to_object(cfg.source)


def source_group(kind: str = "images", **fields) -> ImagesSource | ArraysSource:
    """The ``source`` group ``source=<kind>`` composes to (:class:`ImagesSource` or
    :class:`ArraysSource`), with ``fields`` replaced (no check: a test may give a bad value)."""
    return replace(_composed(kind), **fields)
