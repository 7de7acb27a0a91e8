"""Read-ahead: run an iterator in a background thread, a bounded number of items ahead.

The shard worker reads and decodes the next samples (tar read, JPEG/PNG decode and resize, which
release the GIL in zlib/libjpeg/Pillow) while the current batch is computed on the device and
encoded to Parquet (torch and Arrow release the GIL too). With a GPU, or with more than one CPU
per actor, decode and compute/encode then overlap; with one CPU the thread only hides I/O waits
(remote shards, ``pipe:`` readers).

Semantics are those of the wrapped iterator: items arrive in order, and an exception it raises is
re-raised by the consumer at the same position (after every item yielded before it). Closing the
reader (``with ReadAhead(...)``, or :meth:`ReadAhead.close`) stops the thread and closes the
wrapped generator in that thread, so its files are released.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()  # the producer's last message: (_END, exception or None)


class ReadAhead(Generic[T]):
    """Iterate ``iterable`` in a daemon thread, at most ``depth`` items ahead of the consumer."""

    def __init__(self, iterable: Iterable[T], depth: int, name: str = "read-ahead"):
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=self._produce, args=(iter(iterable),), name=name, daemon=True
        )
        self._thread.start()

    def _put(self, message: tuple) -> bool:
        """Queue a message unless the consumer closed the reader (then False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, it: Iterator[T]) -> None:
        try:
            for item in it:
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((_END, exc))
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:  # a generator: release its files in the thread that ran it
                close()
        self._put((_END, None))

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item, exc = self._queue.get()
        if item is _END:
            self._finished = True
            self._thread.join()
            if exc is not None:
                raise exc
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it finishes the item in hand) and wait for its thread."""
        self._finished = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
