"""The job life cycle. Every status change in the system is checked against `ALLOWED`."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    # Back to pending: the job is put on hold or re-queued after its worker or the router died.
    # Cancelled: the router stops the call at the next denoising step.
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.PENDING, JobStatus.CANCELLED}),
    # Failed and cancelled jobs can be retried; completed ones are final.
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),
    JobStatus.CANCELLED: frozenset({JobStatus.PENDING}),
    JobStatus.COMPLETED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, job_id: str, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id} is {current.value}; it cannot become {target.value}")
        self.job_id = job_id
        self.current = current
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses Ray actor boundaries: rebuild from the fields, not from the message.
        return type(self), (self.job_id, self.current, self.target)


def check_transition(job_id: str, current: JobStatus, target: JobStatus) -> None:
    if target not in ALLOWED[current]:
        raise IllegalTransition(job_id, current, target)
