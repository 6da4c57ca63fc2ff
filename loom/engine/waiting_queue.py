"""The scheduler's queue of waiting requests, in policy order."""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from loom.engine.request import Request


class WaitingQueue:
    """Waiting requests in policy order: arrival (fcfs) or (priority, arrival) (priority)."""

    def __init__(self, by_priority: bool):
        self.by_priority = by_priority
        self._heap: list[tuple[int, float, int, Request]] = []
        self._fifo: deque[Request] = deque()
        self._tie = itertools.count()

    def _key(self, req: Request) -> tuple[int, float, int, Request]:
        return (req.priority, req.arrival_time, next(self._tie), req)

    def add(self, req: Request) -> None:
        if self.by_priority:
            heapq.heappush(self._heap, self._key(req))
        else:
            self._fifo.append(req)

    def add_front(self, req: Request) -> None:
        """Put a preempted request back where it came from: ahead of later arrivals."""
        if self.by_priority:
            heapq.heappush(self._heap, self._key(req))
        else:
            self._fifo.appendleft(req)

    def peek(self) -> Request:
        return self._heap[0][3] if self.by_priority else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.by_priority else self._fifo.popleft()

    def remove(self, req: Request) -> bool:
        if self.by_priority:
            for i, entry in enumerate(self._heap):
                if entry[3] is req:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    return True
            return False
        try:
            self._fifo.remove(req)
            return True
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._heap) if self.by_priority else len(self._fifo)

    def __iter__(self):
        return iter([e[3] for e in sorted(self._heap)] if self.by_priority else list(self._fifo))

    def first(self, k: int) -> list[Request]:
        """The first k requests in policy order, without copying the whole queue."""
        if self.by_priority:
            return [e[3] for e in heapq.nsmallest(k, self._heap)]
        return list(itertools.islice(self._fifo, k))
