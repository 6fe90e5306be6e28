"""An ordered, bounded parallel map over a stream of jobs and markers.

Jobs go to worker processes; markers (plain values the caller uses to delimit files) pass through in order.
At most ``window`` jobs are in flight, so a large export never piles up in memory.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


class Marker:
    """Base class for items that are passed through instead of computed."""


def ordered_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int | None = None
) -> Iterator[Any]:
    if workers <= 1:
        for item in items:
            yield item if isinstance(item, Marker) else fn(item)
        return
    window = window or 2 * workers
    # fork: workers inherit the already-imported fhir.resources models instead of importing them again.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque[tuple[bool, Any]] = deque()
        in_flight = 0
        for item in items:
            if isinstance(item, Marker):
                pending.append((False, item))
            else:
                pending.append((True, pool.submit(fn, item)))
                in_flight += 1
            while pending and (in_flight >= window or not pending[0][0]):
                is_job, value = pending.popleft()
                if is_job:
                    in_flight -= 1
                    yield value.result()
                else:
                    yield value
        while pending:
            is_job, value = pending.popleft()
            yield value.result() if is_job else value


def prefetch(items: Iterable[Any], ahead: int = 1) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, at most ``ahead`` items ahead of the consumer.

    For I/O such as database reads (libpq releases the GIL): the next chunk is fetched while this one is
    processed. An exception in the producer is raised in the consumer; closing the iterator early stops it.
    """
    import queue
    import threading

    slots: queue.Queue = queue.Queue(maxsize=ahead)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((True, item))
        except BaseException as exc:  # handed to the consumer
            slots.put((False, exc))
            return
        slots.put((True, done))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting for a free slot
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.05)
