"""Waiting jobs by batch key, for filling a worker call with jobs that can be denoised together.

The dispatch order itself stays the queue's: the first job of a call is the queue's next one, and
its companions are the waiting jobs of the same lane and key, best priority then oldest first. The
index is lazy, like the queues: an entry whose job left the queue is dropped when it surfaces, so
removing a job costs O(1).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Hashable

from scheduling.job_queue import QueuedJob

# A heap is rebuilt from its live entries once it holds this many times more entries than live jobs.
COMPACT_RATIO = 4
COMPACT_MIN_ENTRIES = 64


class BatchIndex:
    def __init__(self) -> None:
        self._heaps: dict[Hashable, list[QueuedJob]] = {}
        self._live: Counter[Hashable] = Counter()

    def add(self, key: Hashable, job: QueuedJob) -> None:
        heapq.heappush(self._heaps.setdefault(key, []), job)
        self._live[key] += 1

    def discard(self, key: Hashable) -> None:
        """One job added under `key` left the queue."""
        self._live[key] -= 1
        if self._live[key] <= 0:
            del self._live[key], self._heaps[key]

    def take(self, key: Hashable, count: int, usable: Callable[[QueuedJob], bool | None]) -> list[QueuedJob]:
        """Up to `count` entries of `key`, best first, for which `usable` says True.

        `usable` says None for a stale entry (dropped) and False for a live job that cannot go now
        (kept). The caller then takes the jobs out of the queue, `discard`ing each.
        """
        heap = self._heaps.get(key, [])
        taken: list[QueuedJob] = []
        kept: list[QueuedJob] = []
        while heap and len(taken) < count:
            job = heapq.heappop(heap)
            verdict = usable(job)
            if verdict:
                taken.append(job)
            elif verdict is not None:
                kept.append(job)
        for job in kept:
            heapq.heappush(heap, job)
        if len(heap) > max(COMPACT_MIN_ENTRIES, COMPACT_RATIO * self._live[key]):
            heap[:] = [job for job in heap if usable(job) is not None]
            heapq.heapify(heap)
        return taken

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._heaps.values())
