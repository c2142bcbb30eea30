"""The waiting queue: pure Python, no Ray, so its orderings are unit-tested exactly.

Ordering lives on the request type, `(priority, arrival, job_id)`, as in vLLM's request queue, with
one rule on top, fair share: among jobs of the same priority, owners take turns, so one user's
100,000-job batch does not make another user's ten jobs wait behind it. Priorities stay strict, and
the lanes add strict precedence between queues: a job of a later lane is popped only when every
earlier lane is empty.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

from scheduling.lanes import Lane, lane_for


@dataclass(frozen=True, order=True)
class QueuedJob:
    priority: int
    arrival: float
    job_id: str
    owner: str = field(default="", compare=False)  # whose turn it is matters only within a priority

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


@dataclass
class _Level:
    """The jobs of one priority: each owner's own heap, and whose turn is next (the dict's order)."""

    turns: OrderedDict[str, list[QueuedJob]] = field(default_factory=OrderedDict)
    live: dict[str, int] = field(default_factory=dict)  # owner -> jobs still queued

    def push(self, job: QueuedJob) -> None:
        # A newcomer's first turn comes after everyone already waiting has had theirs.
        heapq.heappush(self.turns.setdefault(job.owner, []), job)
        self.live[job.owner] = self.live.get(job.owner, 0) + 1

    def discount(self, owner: str) -> None:
        self.live[owner] -= 1
        if not self.live[owner]:
            del self.live[owner], self.turns[owner]  # drops that owner's stale heap entries too


class FairShareJobQueue(JobQueue):
    """Strict priority; within a priority, owners round robin, each owner's jobs oldest first.

    Removal is lazy (a removed job stays in its owner's heap until popped past), so cancelling is O(1).
    """

    def __init__(self) -> None:
        self._levels: dict[int, _Level] = {}
        self._live: dict[str, QueuedJob] = {}

    def push(self, job: QueuedJob) -> None:
        if job.job_id in self._live:
            raise ValueError(f"job {job.job_id} is already queued")
        self._live[job.job_id] = job
        self._levels.setdefault(job.priority, _Level()).push(job)

    def pop(self) -> QueuedJob | None:
        for priority in sorted(self._levels):
            level = self._levels[priority]
            if not level.turns:
                continue
            owner, heap = next(iter(level.turns.items()))
            while True:
                job = heapq.heappop(heap)
                if self._live.get(job.job_id) is job:
                    break
            del self._live[job.job_id]
            level.discount(owner)
            if owner in level.turns:
                level.turns.move_to_end(owner)
            return job
        return None

    def remove(self, job_id: str) -> QueuedJob | None:
        job = self._live.pop(job_id, None)
        if job is not None:
            self._levels[job.priority].discount(job.owner)
        return job

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[QueuedJob]:
        by_level: dict[int, OrderedDict[str, list[QueuedJob]]] = {}
        for job in self._live.values():
            by_level.setdefault(job.priority, OrderedDict()).setdefault(job.owner, []).append(job)
        for priority in sorted(by_level):
            owners = by_level[priority]
            turns = [owner for owner in self._levels[priority].turns if owner in owners]
            yield from _round_robin([sorted(owners[owner], reverse=True) for owner in turns])


def _round_robin(stacks: list[list[QueuedJob]]) -> Iterator[QueuedJob]:
    """One job from each stack's end in turn, until all are empty."""
    while stacks:
        for stack in stacks:
            yield stack.pop()
        stacks = [stack for stack in stacks if stack]


class FifoJobQueue(JobQueue):
    """Oldest first, whatever the priority or owner: what a plain task queue does. It exists for
    comparison (the benchmarks' FIFO baseline), not for production."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._live: dict[str, QueuedJob] = {}

    def push(self, job: QueuedJob) -> None:
        if job.job_id in self._live:
            raise ValueError(f"job {job.job_id} is already queued")
        self._live[job.job_id] = job
        heapq.heappush(self._heap, (job.arrival, job.job_id))

    def pop(self) -> QueuedJob | None:
        while self._heap:
            _, job_id = heapq.heappop(self._heap)
            job = self._live.pop(job_id, None)
            if job is not None:
                return job
        return None

    def remove(self, job_id: str) -> QueuedJob | None:
        return self._live.pop(job_id, None)  # its heap entry is skipped when it surfaces

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[QueuedJob]:
        return iter(sorted(self._live.values(), key=lambda job: (job.arrival, job.job_id)))


class QueuePolicy(str, Enum):
    LANES = "lanes"  # realtime before batch, priorities, fair share: SEIDRA's order
    FIFO = "fifo"  # one queue, oldest first: the baseline the benchmarks compare with


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
    """One queue per lane, popped in lane precedence order, each with a depth limit.

    Under the FIFO policy every lane shares one oldest-first queue; limits still count per lane.
    """

    def __init__(self, limits: Mapping[Lane, int], retry_after_s: int = 5, policy: QueuePolicy = QueuePolicy.LANES) -> None:
        if policy is QueuePolicy.FIFO:
            shared = FifoJobQueue()
            self._queues: dict[Lane, JobQueue] = dict.fromkeys(Lane, shared)
        else:
            self._queues = {lane: FairShareJobQueue() for lane in Lane}
        self.policy = policy
        self._depths: Counter[Lane] = Counter()
        self._limits = dict(limits)
        self._retry_after_s = retry_after_s
        self.paused: set[Lane] = set()  # an operator stopped dispatching from these lanes

    def check_room(self, lane: Lane, count: int = 1) -> None:
        """Raise QueueFullError unless `count` more jobs fit in `lane`."""
        depth, limit = self._depths[lane], self._limits[lane]
        if depth + count > limit:
            raise QueueFullError(lane, depth, limit, self._retry_after_s)

    def push(self, job: QueuedJob) -> None:
        """Enqueue without a limit check: limits apply to new submissions, not to re-queued work."""
        if job.job_id in self:
            raise ValueError(f"job {job.job_id} is already queued")
        self._queues[job.lane].push(job)
        self._depths[job.lane] += 1

    def pop(self) -> QueuedJob | None:
        set_aside: list[QueuedJob] = []  # a shared FIFO queue's jobs of paused lanes
        popped = None
        for queue in self._distinct_queues(skip_paused=True):
            while (job := queue.pop()) is not None and job.lane in self.paused:
                set_aside.append(job)
            if job is not None:
                popped = job
                break
        for job in set_aside:
            self._queues[job.lane].push(job)
        if popped is not None:
            self._depths[popped.lane] -= 1
        return popped

    def _distinct_queues(self, skip_paused: bool = False) -> list[JobQueue]:
        """Each queue once, in lane precedence order; with `skip_paused`, without the paused lanes'
        own queues (a shared FIFO queue stays: `pop` sets their jobs aside)."""
        queues: list[JobQueue] = []
        for lane, queue in self._queues.items():
            paused = skip_paused and lane in self.paused and self.policy is QueuePolicy.LANES
            if not paused and not any(queue is seen for seen in queues):
                queues.append(queue)
        return queues

    def remove(self, job_id: str) -> QueuedJob | None:
        for queue in self._distinct_queues():
            job = queue.remove(job_id)
            if job is not None:
                self._depths[job.lane] -= 1
                return job
        return None

    def depth(self, lane: Lane) -> int:
        return self._depths[lane]

    def __contains__(self, job_id: object) -> bool:
        return any(job_id in queue for queue in self._distinct_queues())

    def __len__(self) -> int:
        return sum(self._depths.values())

    def __iter__(self) -> Iterator[QueuedJob]:
        for queue in self._distinct_queues():
            yield from queue
