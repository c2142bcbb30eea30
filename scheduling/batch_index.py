"""Waiting jobs by batch key, for filling a worker call with jobs that can be denoised together.

The first job of a call is the queue's next one; its companions are waiting jobs of the same lane
and key, taken in the queue's own order (best priority first, users taking turns, each user's
oldest first), so a batch does not undo fair share.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from scheduling.job_queue import FairShareJobQueue, QueuedJob


class BatchIndex:
    def __init__(self) -> None:
        self._queues: dict[Hashable, FairShareJobQueue] = {}

    def add(self, key: Hashable, job: QueuedJob) -> None:
        self._queues.setdefault(key, FairShareJobQueue()).push(job)

    def discard(self, key: Hashable, job_id: str) -> None:
        """The job left the waiting queue (or is about to run)."""
        queue = self._queues.get(key)
        if queue is not None:
            queue.remove(job_id)
            if not queue:
                del self._queues[key]

    def take(self, key: Hashable, count: int, usable: Callable[[QueuedJob], bool | None]) -> list[QueuedJob]:
        """Up to `count` waiting jobs of `key` for which `usable` says True, in queue order.

        False keeps a job waiting (it cannot go now); None drops it from the index (the caller takes
        it out of the queue itself).
        """
        queue = self._queues.get(key)
        if queue is None:
            return []
        taken: list[QueuedJob] = []
        kept: list[QueuedJob] = []
        while len(taken) < count and (job := queue.pop()) is not None:
            verdict = usable(job)
            if verdict:
                taken.append(job)
            elif verdict is not None:
                kept.append(job)
        for job in kept:
            queue.push(job)
        if not queue:
            del self._queues[key]
        return taken
