"""The stage interface: every step of a worker's chain has one shape.

A shard's samples are read and decoded (:class:`pipeline.run.stages.ReadStage`), cut into batches,
and each batch goes through the worker's chain of stages in order, for example::

    text encode -> VAE encode -> noise (the forward process) -> write records -> write text

Each stage is a :class:`Stage`:

* ``setup(device)`` once per actor, on the device Ray assigned it (:mod:`pipeline.encode.device`):
  models loaded, tables moved;
* ``start(shard, url)`` per shard: opens what the shard needs (a temporary file, a cache);
* ``process(batch) -> batch`` per batch;
* ``finish(result)`` when the shard's stream is done: closes, and adds its part to the shard's
  result (its files, its figures);
* ``abort()`` after a failure: removes what this attempt wrote.

This is NeMo Curator's ``ProcessingStage`` (setup / process) with Ray Data ``Datasink``'s write
lifecycle (on_write_start / write / on_write_complete / on_write_failed).

A :class:`Batch` carries the shard's samples still alive (each :class:`pipeline.read.source.Sample`
with its kept members in ``cond``), their per-sample columns (``extras``: text embeddings), the
record columns once the noise stage made them, and the rows of the samples rejected so far. A
stage that drops samples calls :meth:`Batch.reject`, which keeps everything aligned. A batch left
without samples ends its chain.

Adding a stage: one class with these methods, built by the worker from its config group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from pipeline.read.source import Sample, SampleError

if TYPE_CHECKING:
    import torch

    from pipeline.output.contracts import ShardResult


def reject_row(shard: str, key: str | None, index: int | None, reason: str) -> dict:
    """A row of ``rejects.jsonl``: a sample (key, index) or the whole shard (None, None)."""
    return {"shard": shard, "key": key, "index": index, "reason": reason}


def select(cols: dict, keep: np.ndarray) -> dict:
    """The rows of ``cols`` (numpy arrays or lists of equal length) where ``keep`` is True."""
    return {
        k: [x for x, m in zip(v, keep) if m] if isinstance(v, list) else v[keep]
        for k, v in cols.items()
    }


@dataclass
class Batch:
    """One batch of a shard on its way through the chain.

    ``samples``: the samples still in the batch, in shard order (``Sample.cond``: their
    conditioning). ``extras``: per-sample columns aligned with ``samples`` (the text stage's
    embeddings). ``records``: the record columns (N*K rows, sample-major), set by the noise stage.
    ``rejects``: the reject rows of this batch's samples, in the order they were rejected.
    """

    shard: str
    samples: list[Sample]
    extras: dict = field(default_factory=dict)
    records: dict | None = None
    rejects: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def reject(
        self, positions: Sequence[int], reasons: Sequence[str], on_error: str = "skip"
    ) -> Batch:
        """This batch without the samples at ``positions`` (and their extras); each becomes a
        reject row with its reason. ``on_error="fail"`` raises :class:`SampleError` for the first
        instead. Record columns, if any, are the caller's to filter."""
        if not len(positions):
            return self
        if on_error == "fail":
            s, why = self.samples[positions[0]], reasons[0]
            raise SampleError(
                f"shard {self.shard} key {s.key!r}: {why}", key=s.key, index=s.index, reason=why
            )
        keep = np.ones(len(self.samples), dtype=bool)
        keep[list(positions)] = False
        rows = [
            reject_row(self.shard, self.samples[i].key, self.samples[i].index, why)
            for i, why in zip(positions, reasons)
        ]
        return replace(
            self,
            samples=[s for s, m in zip(self.samples, keep) if m],
            extras=select(self.extras, keep),
            rejects=[*self.rejects, *rows],
        )


class Stage:
    """One step of a worker's chain (see the module docstring). The defaults do nothing, so a
    stage defines only what it needs; :meth:`process` is required."""

    def setup(self, device: torch.device) -> None:
        """Once per actor, before the first shard."""

    def start(self, shard: str, url: str) -> None:
        """Before the first batch of a shard."""

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def finish(self, result: ShardResult) -> None:
        """After the shard's last batch (also when its stream broke): close, and add this
        stage's part of the shard's result (its files, its figures)."""

    def abort(self) -> None:
        """After a failure: remove what this attempt wrote; must not raise."""


def run_chain(stages: Iterable[Stage], batch: Batch) -> Batch:
    """``batch`` through ``stages`` in order; a batch left without samples stops there."""
    for stage in stages:
        if not batch.samples:
            break
        batch = stage.process(batch)
    return batch
