"""The event loop under the simulator: a heap of timed handler calls, nothing else."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    """A heap of (time, sequence, handler, argument); ``run`` calls each handler(time, argument)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[float, Any], None], Any]] = []
        self._sequence = 0

    def at(self, time_s: float, handler: Callable[[float, Any], None], argument: Any = None) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (time_s, self._sequence, handler, argument))

    def run(self) -> None:
        heap, pop = self._heap, heapq.heappop
        while heap:
            time_s, _, handler, argument = pop(heap)
            handler(time_s, argument)

