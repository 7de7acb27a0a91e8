"""The stage interface (pipeline/run/stage.py): a Batch keeps its samples, extras and rejects
aligned when samples are dropped, and a chain stops at an empty batch."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.read.source import Sample, SampleError
from pipeline.run.stage import Batch, Stage, run_chain


def _batch(n: int = 4) -> Batch:
    samples = [
        Sample(f"k{i}", 10 + i, np.full((1, 2), i, np.float32), cond={"cls": i}) for i in range(n)
    ]
    extras = {"index": np.array([s.index for s in samples]), "name": [s.key for s in samples]}
    return Batch("sh", samples, extras=extras)


def test_reject_drops_samples_and_their_extras_and_records_the_reasons():
    batch = _batch()
    out = batch.reject([1, 3], ["too dark", "too big"])
    assert [s.key for s in out.samples] == ["k0", "k2"]
    assert out.extras["index"].tolist() == [10, 12] and out.extras["name"] == ["k0", "k2"]
    assert [s.cond for s in out.samples] == [{"cls": 0}, {"cls": 2}]
    assert out.rejects == [
        {"shard": "sh", "key": "k1", "index": 11, "reason": "too dark"},
        {"shard": "sh", "key": "k3", "index": 13, "reason": "too big"},
    ]
    assert len(batch) == 4 and batch.rejects == []  # the input batch is unchanged
    assert batch.reject([], []) is batch


def test_reject_with_on_error_fail_raises_for_the_first():
    with pytest.raises(SampleError, match="shard sh key 'k2': bad") as info:
        _batch().reject([2, 3], ["bad", "worse"], on_error="fail")
    assert (info.value.key, info.value.index, info.value.reason) == ("k2", 12, "bad")


class _Drop(Stage):
    """Rejects the samples whose index is even."""

    def process(self, batch: Batch) -> Batch:
        bad = [i for i, s in enumerate(batch.samples) if s.index % 2 == 0]
        return batch.reject(bad, ["even"] * len(bad))


class _Count(Stage):
    def __init__(self):
        self.seen = []

    def process(self, batch: Batch) -> Batch:
        self.seen.append(len(batch))
        return batch


def test_a_chain_runs_in_order_and_stops_at_an_empty_batch():
    count = _Count()
    out = run_chain([_Drop(), count, _Drop()], _batch(4))
    assert [s.index for s in out.samples] == [11, 13] and count.seen == [2]
    assert [r["index"] for r in out.rejects] == [10, 12]
    count = _Count()
    only_even = Batch("sh", [Sample("a", 0, np.zeros(1, np.float32))])
    out = run_chain([_Drop(), count], only_even)
    assert out.samples == [] and count.seen == []  # the stage after the empty batch never ran
    assert [r["key"] for r in out.rejects] == ["a"]


def test_the_default_lifecycle_does_nothing_but_process_is_required():
    stage = Stage()
    stage.setup(None)
    stage.start("sh", "sh.tar")
    result: dict = {}
    stage.finish(result)
    stage.abort()
    assert result == {}
    with pytest.raises(NotImplementedError):
        stage.process(_batch())
