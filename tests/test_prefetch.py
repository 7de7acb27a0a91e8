"""ReadAhead: order, exceptions at their position, bounded depth, early close releases the
source."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.read.prefetch import ReadAhead


def test_items_in_order_and_exhaustion():
    r = ReadAhead(range(1000), depth=3)
    assert list(r) == list(range(1000))
    assert list(r) == []  # exhausted stays exhausted


def test_exception_is_raised_after_the_items_before_it():
    def items():
        yield from (1, 2, 3)
        raise OSError("truncated tar")

    seen = []
    with pytest.raises(OSError, match="truncated tar"):
        for x in ReadAhead(items(), depth=2):
            seen.append(x)
    assert seen == [1, 2, 3]


def test_depth_bounds_how_far_the_producer_runs_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    r = ReadAhead(items(), depth=4)
    time.sleep(0.3)
    # `depth` queued, one held by the blocked producer
    assert len(produced) <= 4 + 1
    assert next(r) == 0
    r.close()


def test_close_stops_the_producer_and_closes_the_generator_in_its_thread():
    closed_in = []

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_in.append(threading.current_thread().name)

    with ReadAhead(items(), depth=2, name="reader-x") as r:
        assert [next(r) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert closed_in == ["reader-x"]
    assert not any(t.name == "reader-x" for t in threading.enumerate())


def test_consumer_error_inside_with_block_stops_the_thread():
    def items():
        yield from range(10**9)

    with pytest.raises(RuntimeError, match="write failed"):
        with ReadAhead(items(), depth=8, name="reader-y") as r:
            for x in r:
                if x == 3:
                    raise RuntimeError("write failed")
    assert not any(t.name == "reader-y" for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ReadAhead([], depth=0)
