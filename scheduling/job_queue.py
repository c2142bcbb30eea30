"""The waiting queue: pure Python, no Ray, so its orderings are unit-tested exactly.

Ordering lives on the request type, `(priority, arrival, job_id)`, as in vLLM's request queue; the
lanes add strict precedence between queues: a job of a later lane is popped only when every
earlier lane is empty.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from scheduling.lanes import Lane, lane_for


@dataclass(frozen=True, order=True)
class QueuedJob:
    priority: int
    arrival: float
    job_id: str

    @property
    def lane(self) -> Lane:
        return lane_for(self.priority)


class JobQueue(ABC):
    """What the router needs from a queue of waiting jobs."""

    @abstractmethod
    def push(self, job: QueuedJob) -> None: ...

    @abstractmethod
    def pop(self) -> QueuedJob | None:
        """Remove and return the next job, or None when empty."""

    @abstractmethod
    def remove(self, job_id: str) -> QueuedJob | None:
        """Take a waiting job out of the queue; None when it is not waiting here."""

    @abstractmethod
    def __contains__(self, job_id: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[QueuedJob]:
        """Waiting jobs in the order they would be popped."""


class PriorityJobQueue(JobQueue):
    """A heap ordered by `QueuedJob`; removal is lazy so cancelling is O(1)."""

    def __init__(self) -> None:
        self._heap: list[QueuedJob] = []
        self._live: dict[str, QueuedJob] = {}

    def push(self, job: QueuedJob) -> None:
        if job.job_id in self._live:
            raise ValueError(f"job {job.job_id} is already queued")
        self._live[job.job_id] = job
        heapq.heappush(self._heap, job)

    def pop(self) -> QueuedJob | None:
        while self._heap:
            job = heapq.heappop(self._heap)
            if self._live.get(job.job_id) is job:
                del self._live[job.job_id]
                return job
        return None

    def remove(self, job_id: str) -> QueuedJob | None:
        return self._live.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[QueuedJob]:
        return iter(sorted(self._live.values()))


class QueueFullError(Exception):
    """A lane cannot take more jobs; the caller should come back after `retry_after_s`."""

    def __init__(self, lane: Lane, depth: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the {lane.value} queue is full ({depth} waiting, limit {limit})")
        self.lane = lane
        self.depth = depth
        self.limit = limit
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses Ray actor boundaries: rebuild from the fields, not from the message.
        return type(self), (self.lane, self.depth, self.limit, self.retry_after_s)


class LaneQueues:
    """One queue per lane, popped in lane precedence order, each with a depth limit."""

    def __init__(self, limits: Mapping[Lane, int], retry_after_s: int = 5) -> None:
        self._queues: dict[Lane, JobQueue] = {lane: PriorityJobQueue() for lane in Lane}
        self._limits = dict(limits)
        self._retry_after_s = retry_after_s
        self.paused: set[Lane] = set()  # an operator stopped dispatching from these lanes

    def check_room(self, lane: Lane, count: int = 1) -> None:
        """Raise QueueFullError unless `count` more jobs fit in `lane`."""
        depth, limit = len(self._queues[lane]), self._limits[lane]
        if depth + count > limit:
            raise QueueFullError(lane, depth, limit, self._retry_after_s)

    def push(self, job: QueuedJob) -> None:
        """Enqueue without a limit check: limits apply to new submissions, not to re-queued work."""
        if job.job_id in self:
            raise ValueError(f"job {job.job_id} is already queued")
        self._queues[job.lane].push(job)

    def pop(self) -> QueuedJob | None:
        for lane in Lane:
            if lane in self.paused:
                continue
            job = self._queues[lane].pop()
            if job is not None:
                return job
        return None

    def remove(self, job_id: str) -> QueuedJob | None:
        for queue in self._queues.values():
            job = queue.remove(job_id)
            if job is not None:
                return job
        return None

    def depth(self, lane: Lane) -> int:
        return len(self._queues[lane])

    def __contains__(self, job_id: object) -> bool:
        return any(job_id in queue for queue in self._queues.values())

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def __iter__(self) -> Iterator[QueuedJob]:
        for lane in Lane:
            yield from self._queues[lane]
