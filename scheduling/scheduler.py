"""The scheduling core: every job's life is decided here, and only here.

No Ray, no database, no asyncio: events come in (`submit`, `heartbeat`, `result`, `error`, `cancel`,
`retry`, maintenance, `tick`, `recover`), and actions come out (start these jobs together on that
replica, write this transition, hold these jobs, ask that call to yield, cancel that call). The router actor is a
shell that carries the actions out and feeds what happened back in, as vLLM's scheduler does with
`schedule()` and `update_from_output()`. The clock is passed in, so tests drive time by hand.

Each job the router is responsible for has one `JobRecord`; its `place` says where it is. A job
that ends leaves the core (a cancelled one once its call has stopped), so everything the core holds
is unfinished work.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from itertools import count
from typing import Any

from scheduling.batch_index import BatchIndex
from scheduling.directives import InjectedFaults, Mode, ReplicaDirectives, ReplicaSnapshot
from scheduling.hold import Backoff, Delay, Hold, utc
from scheduling.job_queue import LaneQueues, QueuedJob, QueuePolicy
from scheduling.lanes import DEFAULT_REALTIME_PRIORITY, MAX_REALTIME_PRIORITY, Lane, lane_for
from scheduling.quota import Quota, QuotaExceeded, SubmissionTooLarge, TokenBucket, retry_after_s
from scheduling.replicas import ReplicaPool, SlotPlan
from scheduling.work import GenerationParams, WorkBatch, WorkItem, WorkResult, YieldRequest
from storage.job_status import IllegalTransition, JobStatus

logger = logging.getLogger(__name__)

GPU_TIMEOUT_REASON = "GPU inference timeout"


class Place(str, Enum):
    WAITING = "waiting"  # in its lane's queue
    HELD = "held"  # in its lane's queue, on hold for want of a healthy GPU
    DEFERRED = "deferred"  # out of the queue until `ready_at`: a retry countdown, a storage fault
    RUNNING = "running"  # a call on a replica
    STOPPING = "stopping"  # finished (cancelled) while its call still runs; leaves when the call ends


QUEUED = frozenset({Place.WAITING, Place.HELD})


class ErrorKind(str, Enum):
    """Why a call failed; the shell classifies, the core decides what follows."""

    GPU_TIMEOUT = "gpu-timeout"  # the replica did not answer in time: hold, count a failure
    REPLICA_UNAVAILABLE = "replica-unavailable"  # it refused or could not be reached: hold, uncounted
    REPLICA_LOST = "replica-lost"  # it died or went silent mid-call: re-queue, count a failure
    STORAGE = "storage"  # the image could not be stored: retry later, uncounted, replica stays healthy
    JOB_ERROR = "job-error"  # the pipeline raised: start over, count a failure


@dataclass(frozen=True)
class SchedulerConfig:
    queue_limits: Mapping[Lane, int]
    queue_full_retry_after_s: int = 5
    # The slice length: a running call stops at a multiple of this many steps when asked to, so that
    # a waiting realtime job gets its slot (0: slicing off, a call keeps its slot to the end).
    steps_per_dispatch: int = 0
    # Jobs denoised together in one call (same lane, size, steps, guidance, step): never waited for.
    max_batch_size: int = 1
    queue_policy: QueuePolicy = QueuePolicy.LANES
    max_attempts: int = 3
    degraded_cooldown_s: float = 60.0
    worker_ttl_s: float = 10.0
    hold_backoff: Backoff = field(default_factory=Backoff)
    storage_backoff: Backoff = field(default_factory=lambda: Backoff(base_s=2.0, cap_s=60.0))
    # A store that stays broken (wrong credentials, a folder never repaired) must not keep a job forever.
    max_storage_faults: int = 20
    # Queue positions are a walk of the whole queue: shown positions may be this old.
    queue_position_ttl_s: float = 1.0


@dataclass(frozen=True)
class JobSpec:
    """A stored job as the core needs it: new from `submit`, or read back by `recover`/`retry`."""

    job_id: str
    priority: int
    arrival: float  # created_at, epoch seconds: the older job goes first within a priority
    params: GenerationParams
    status: JobStatus = JobStatus.PENDING
    metadata: Mapping[str, Any] = field(default_factory=dict)
    owner: str = ""

    @property
    def trace_context(self) -> dict[str, str] | None:
        return self.metadata.get("trace_context")

    # What a stored job's metadata says of its past (read by `recover`):

    @property
    def failures(self) -> int:
        return int(self.metadata.get("failures", 0))

    @property
    def hold(self) -> Hold | None:
        return Hold.from_document(self.metadata.get("degraded"))

    @property
    def not_before_s(self) -> float:
        """When a retry with a countdown may run (epoch seconds; 0 when there is none)."""
        not_before = (self.metadata.get("retry") or {}).get("not_before")
        return datetime.fromisoformat(not_before).timestamp() if not_before else 0.0

    def check(self) -> JobSpec:
        """The spec itself, once every field `recover` reads is known to parse (raises otherwise)."""
        _ = (self.failures, self.hold, self.not_before_s)
        return self


# ----- actions -----


@dataclass(frozen=True)
class JobWrite:
    """One row's change, applied only while the row is in one of `from_status`.

    `metadata` keys replace the stored ones (None removes one); every other key stays.
    """

    job_id: str
    from_status: frozenset[JobStatus]
    to_status: JobStatus
    metadata: Mapping[str, Any] = field(default_factory=dict)
    attempts: int | None = None
    mark_started: bool = False
    mark_finished: bool = False
    reopen: bool = False  # clears error and finished_at: a retried job
    error: str | None = None
    result_key: str | None = None
    priority: int | None = None


@dataclass(frozen=True)
class Start:
    """Send `batch` to its replica, and meanwhile write `writes` (the database learns those jobs run)."""

    batch: WorkBatch
    lane: Lane
    writes: tuple[JobWrite, ...] = ()

    @property
    def call_id(self) -> int:
        return self.batch.call_id


@dataclass(frozen=True)
class Persist:
    write: JobWrite


@dataclass(frozen=True)
class Finish:
    write: JobWrite
    trace_context: dict[str, str] | None = None  # the job's trace, for the write's span


@dataclass(frozen=True)
class HeldJob:
    job_id: str
    lane: Lane
    hold: Hold
    trace_context: dict[str, str] | None

    @property
    def new_episode(self) -> bool:
        return self.hold.delays == 1


@dataclass(frozen=True)
class HoldJobs:
    """Record one delay on each job (still `pending`); notify those whose episode begins."""

    jobs: tuple[HeldJob, ...]


@dataclass(frozen=True)
class Resumed:
    """A held job runs again: its episode ends (tell its user once)."""

    job_id: str
    hold: Hold


@dataclass(frozen=True)
class CancelCall:
    job_id: str
    call_id: int


@dataclass(frozen=True)
class YieldCall:
    """Ask a running call to stop at its next slice boundary; its jobs then wait in their lanes again."""

    request: YieldRequest
    reason: str  # "realtime": a realtime job wants the slot; "stop": one of its jobs must stop


@dataclass(frozen=True)
class DeleteImage:
    """A cancelled job's call ended: whatever it stored must go."""

    job_id: str


Action = Start | Persist | Finish | HoldJobs | Resumed | CancelCall | YieldCall | DeleteImage


# ----- the record -----


@dataclass(frozen=True)
class Call:
    call_id: int
    replica_id: str


@dataclass
class RunningCall:
    """A call the core waits on: its replica, its jobs still in it, where they stand."""

    replica_id: str
    lane: Lane
    worst_priority: int
    jobs: set[str]
    step: int  # from the replica's progress reports
    yielding: bool = False


@dataclass(frozen=True)
class Checkpoint:
    """Where the job's denoising stands after its last good slice, and on which replica it ran."""

    step: int
    latents: Any
    replica_id: str


@dataclass
class JobRecord:
    job_id: str
    queued: QueuedJob
    params: GenerationParams
    trace_context: dict[str, str] | None
    place: Place
    db_status: JobStatus  # the status the core last wrote (or found)
    failures: int = 0
    storage_faults: int = 0
    checkpoint: Checkpoint | None = None
    call: Call | None = None
    hold: Hold | None = None
    next_delay_at: float = 0.0  # while held: when the next delay is recorded if the outage lasts
    ready_at: float = 0.0  # while deferred
    # Taken over from the database: a previous router may have run it (its `running` write lost
    # with that router, if it is pending), so its image may be stored already.
    recovered: bool = False
    batch_key: tuple[Any, ...] | None = None  # while indexed for batching
    inference_s: float = 0.0  # in the calls that brought it to its checkpoint

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint else 0

    @property
    def lane(self) -> Lane:
        return self.queued.lane

    @property
    def owner(self) -> str:
        return self.queued.owner


@dataclass(frozen=True)
class Progress:
    """What the core knows of an unfinished job right now (`GET /jobs/{id}`, its event stream).

    `step` is where its denoising stands, as its replica last reported it (or where its last call
    yielded); it may be a few hundred milliseconds old. `queue_position` counts the jobs
    that go before it, while it waits (held included); it may be `queue_position_ttl_s` old.
    """

    place: Place
    step: int
    total_steps: int
    queue_position: int | None
    hold: Hold | None
    replica_id: str | None


class UnknownJob(LookupError):
    """The core does not hold this job: it has ended, or never reached this router."""


@dataclass(frozen=True)
class Reservation:
    """Room taken for jobs about to be stored; `release` it once they are (or are not)."""

    owner: str
    lanes: Counter[Lane]
    token_taken: bool  # refunded when nothing was stored


# Users whose rate buckets are full again are forgotten, at most once a minute, past this many buckets.
MAX_IDLE_BUCKETS = 1024
BUCKET_SWEEP_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Divergence:
    """What the database and the core disagree on, confirmed by two reconciler rounds in a row."""

    adopt: frozenset[str]  # unfinished in the database, unknown here
    drop: frozenset[str]  # held here, ended or gone in the database


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float], rand: Callable[[], float] = random.random) -> None:
        self._config = config
        self._clock = clock
        self._rand = rand
        self._records: dict[str, JobRecord] = {}
        self._queue = LaneQueues(config.queue_limits, config.queue_full_retry_after_s, config.queue_policy)
        self._batchable = BatchIndex()
        self._calls: dict[int, RunningCall] = {}
        self._pool = ReplicaPool(config.worker_ttl_s, clock=clock)
        self._call_ids = count(1)
        self._reserved: Counter[Lane] = Counter()
        self._reserved_by_owner: Counter[tuple[str, Lane]] = Counter()
        self._unfinished: Counter[tuple[str, Lane]] = Counter()  # jobs held here, per owner and lane
        self._buckets: dict[str, TokenBucket] = {}
        self._next_bucket_sweep_at = 0.0
        self._deferred: list[tuple[float, str]] = []  # (ready_at, job id) heap; see `_next_deferred`
        self._suspects: frozenset[tuple[str, str | None, Any]] = frozenset()
        self._positions: dict[str, int] = {}
        self._positions_due = 0.0

    # ----- submissions and recovery -----

    def reserve(self, lanes: Collection[Lane], owner: str = "", quota: Quota | None = None) -> Reservation:
        """Room for one submission of `owner`'s jobs about to be stored (one lane per job).

        Raises QueueFullError when a lane has no room, QuotaExceeded when `owner` would go beyond
        `quota` (None: no per-user limit). Counting other reservations still being stored, two
        submissions cannot both take the last room, yet neither waits for the other's database
        write. `release` it once stored.
        """
        wanted = Counter(lanes)
        token_taken = self._admit(wanted, owner, quota)
        self._reserved.update(wanted)
        self._reserved_by_owner.update({(owner, lane): jobs for lane, jobs in wanted.items()})
        return Reservation(owner, wanted, token_taken)

    def release(self, reservation: Reservation, stored: bool = True) -> None:
        """Give the room back once the jobs are stored (they count as unfinished from `submit` on) or
        not (`stored` False: a failed write, a replay: the submission's token is refunded too)."""
        self._reserved.subtract(reservation.lanes)
        for lane, jobs in reservation.lanes.items():
            key = (reservation.owner, lane)
            self._reserved_by_owner[key] -= jobs
            if not self._reserved_by_owner[key]:
                del self._reserved_by_owner[key]
        bucket = self._buckets.get(reservation.owner)
        if not stored and reservation.token_taken and bucket is not None:
            bucket.tokens = min(float(bucket.per_minute), bucket.tokens + 1)

    def _admit(self, wanted: Counter[Lane], owner: str, quota: Quota | None) -> bool:
        """Raise unless `wanted` more jobs of `owner` fit their lanes and quota; takes a submission
        token when there is a quota (returns whether it did)."""
        for lane, jobs in wanted.items():
            self._queue.check_room(lane, jobs + self._reserved[lane])
        # No job wanted: a batch whose items are all stored already, submitted again, costs nothing.
        if quota is None or not wanted:
            return False
        self._check_unfinished(owner, wanted, quota)
        self._take_token(owner, quota)
        return True

    def _check_unfinished(self, owner: str, wanted: Counter[Lane], quota: Quota) -> None:
        for lane, jobs in wanted.items():
            have = self._unfinished[(owner, lane)] + self._reserved_by_owner[(owner, lane)]
            limit = quota.max_unfinished[lane]
            if jobs > limit:
                raise SubmissionTooLarge(f"{jobs} {lane.value} jobs in one submission; the limit per user is {limit}")
            if have + jobs > limit:
                raise QuotaExceeded(
                    f"{have} unfinished {lane.value} job(s) already, {jobs} more asked for; the limit per user is {limit}",
                    self._config.queue_full_retry_after_s,
                )

    def _take_token(self, owner: str, quota: Quota) -> None:
        now = self._clock()
        bucket = self._buckets.get(owner) or TokenBucket.full(quota.submissions_per_minute, now)
        bucket.refill(now, quota.submissions_per_minute)
        if bucket.tokens < 1:
            raise QuotaExceeded(f"more than {quota.submissions_per_minute} submissions a minute", retry_after_s(bucket.wait_s()))
        bucket.tokens -= 1
        self._buckets[owner] = bucket
        if len(self._buckets) > MAX_IDLE_BUCKETS and now >= self._next_bucket_sweep_at:
            self._next_bucket_sweep_at = now + BUCKET_SWEEP_INTERVAL_S
            self._forget_full_buckets(now)

    def _forget_full_buckets(self, now: float) -> None:
        """A full bucket is what a user without one gets: keep only those still refilling."""
        for user, bucket in list(self._buckets.items()):
            bucket.refill(now, bucket.per_minute)
            if bucket.is_full():
                del self._buckets[user]

    def submit(self, jobs: Collection[JobSpec]) -> None:
        """Stored jobs join their lanes (after `reserve`, and `release` once stored)."""
        for spec in jobs:
            self._enqueue(self._new_record(spec))

    def recover(self, jobs: Collection[JobSpec], reason: str) -> list[Action]:
        """Take over unfinished stored jobs (after a restart, or found by the reconciler).

        A job stored as running has no call here: its answer went to a router that is gone, so it
        runs again from the start. So may a job stored as pending: a router sends a call before its
        `running` write lands. Either way it waits until every live replica has reported (the
        worker TTL, deferred) and none reports it running (see `schedule`), and a replica that finds
        its image stored already just reports it done.
        """
        actions: list[Action] = []
        now = self._clock()
        for spec in jobs:
            if spec.job_id in self._records or spec.status.is_terminal:
                continue
            record = self._new_record(spec)
            record.failures = spec.failures
            record.hold = spec.hold
            if record.hold is not None:
                record.next_delay_at = now + record.hold.last.retry_after_s
            if spec.status is JobStatus.RUNNING:
                actions.append(Persist(self._write(record, JobStatus.PENDING, metadata={"requeued": reason})))
            record.recovered = True
            # A replica that has not reported yet may still run a previous router's call for it.
            # Every live replica reports within the TTL: after it, such a call shows in
            # `SlotPlan.runs_elsewhere`. Deferred, it costs nothing to dispatch meanwhile.
            self._defer(record, max(spec.not_before_s, now + self._config.worker_ttl_s))
        return actions

    def _new_record(self, spec: JobSpec) -> JobRecord:
        return JobRecord(
            job_id=spec.job_id,
            queued=QueuedJob(spec.priority, spec.arrival, spec.job_id, spec.owner),
            params=spec.params,
            trace_context=spec.trace_context,
            place=Place.WAITING,
            db_status=spec.status,
        )

    # ----- replicas and operators -----

    def heartbeat(self, replica_id: str, slots: int, snapshot: ReplicaSnapshot) -> ReplicaDirectives:
        if self._pool.report(replica_id, slots, snapshot):
            logger.info(
                "Worker replica %s joined with %d slot(s): %s/%s", replica_id, slots, snapshot.mode.value, snapshot.health.value
            )
            if snapshot.mode is Mode.MAINTENANCE:  # set before this router (re)started: keep draining
                self._pool.set_maintenance(replica_id, True)
        return self._pool.directives(replica_id)

    def set_maintenance(self, replica_id: str | None, enabled: bool) -> list[dict[str, Any]]:
        """Drain one replica (or all, with None): running jobs finish there, no new ones start."""
        if replica_id is not None and replica_id not in self._pool:
            raise KeyError(f"no worker replica {replica_id}")
        self._pool.set_maintenance(replica_id, enabled)
        return self._pool.describe()

    def set_lane_paused(self, lane: Lane, paused: bool) -> list[str]:
        (self._queue.paused.add if paused else self._queue.paused.discard)(lane)
        return sorted(lane.value for lane in self._queue.paused)

    def set_faults(self, replica_id: str | None, faults: InjectedFaults | None) -> list[dict[str, Any]]:
        self._pool.set_faults(replica_id, faults)
        return self._pool.describe()

    # ----- user requests -----

    def cancel(self, job_id: str, owner: str | None = None) -> list[Action]:
        """End a job `cancelled`; a running one stops at its next step boundary, its slot held until then.

        With `owner`, another owner's job is as unknown as a missing one.
        """
        record = self._records.get(job_id)
        if record is None or owner not in (None, record.owner):
            raise UnknownJob(job_id)
        if record.place is Place.STOPPING:
            raise IllegalTransition(job_id, JobStatus.CANCELLED, JobStatus.CANCELLED)
        actions: list[Action] = [Finish(self._write(record, JobStatus.CANCELLED, mark_finished=True), record.trace_context)]
        if record.call is not None:
            record.place = Place.STOPPING
            actions += self._stop_call(record.job_id, record.call)
        else:
            self._remove(record)
        return actions

    def _stop_call(self, job_id: str, call: Call) -> list[Action]:
        """Stop a call for one of its jobs: cancel it when the job is alone in it; otherwise the
        others keep what they did, so the call yields at its next slice boundary."""
        running = self._calls.get(call.call_id)
        if running is None or running.jobs == {job_id}:
            return [CancelCall(job_id, call.call_id)]
        return self._yield(call.call_id, running, "stop")

    def _yield(self, call_id: int, running: RunningCall, reason: str) -> list[Action]:
        if running.yielding:
            return []
        running.yielding = True
        return [YieldCall(YieldRequest(running.replica_id, call_id), reason)]

    def retry(self, job: JobSpec, countdown_s: float = 0.0, quota: Quota | None = None) -> list[Action]:
        """Queue a failed, cancelled or held job again at realtime priority, after `countdown_s`.

        Raises IllegalTransition for a job that runs (between two slices included), waits normally,
        is still stopping, or completed. A job that comes back, or moves to the realtime lane, is a
        submission of its owner's: it needs room there and within `quota`, as `reserve` does.
        """
        now = self._clock()
        priority = job.priority if job.priority <= MAX_REALTIME_PRIORITY else DEFAULT_REALTIME_PRIORITY
        not_before = now + countdown_s
        metadata = {"failures": 0, "retry": {"requested_at": utc(now).isoformat(), "not_before": utc(not_before).isoformat()}}
        record = self._records.get(job.job_id)
        self._check_retry(job, record)
        if record is None or record.lane is not lane_for(priority):
            self._admit(Counter({lane_for(priority): 1}), job.owner, quota)
        if record is None:
            record = self._new_record(replace(job, priority=priority))
            write = self._write(record, JobStatus.PENDING, metadata=metadata, reopen=True, priority=priority)
        else:  # held: it leaves its hold for the realtime lane
            self._unplace(record)
            self._untrack(record)
            record.queued = replace(record.queued, priority=priority)
            self._track(record)
            write = self._write(record, JobStatus.PENDING, metadata=metadata, priority=priority)
        record.failures = 0
        if countdown_s > 0:
            self._defer(record, not_before)
        else:
            self._enqueue(record)
        return [Persist(write)]

    @staticmethod
    def _check_retry(job: JobSpec, record: JobRecord | None) -> None:
        """Raise IllegalTransition unless the job is ended (failed, cancelled) or held here."""
        if record is None:
            if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise IllegalTransition(job.job_id, job.status, JobStatus.PENDING)
        elif not (record.place is Place.HELD or (record.place is Place.DEFERRED and record.hold is not None)):
            current = JobStatus.CANCELLED if record.place is Place.STOPPING else record.db_status
            raise IllegalTransition(job.job_id, current, JobStatus.PENDING)

    # ----- calls -----

    def result(self, job_id: str, call_id: int, result: WorkResult) -> list[Action]:
        """A slice ended well: the job completes, or waits in its place for its next slice."""
        ended = self._end_call(job_id, call_id)
        if ended is None:
            return []
        record, _ = ended
        if record.place is Place.STOPPING:
            self._remove(record)
            return [DeleteImage(job_id)] if result.done else []
        record.inference_s += result.duration_s
        if result.done:
            self._remove(record)
            metadata = {"replica_id": result.replica_id, "inference_s": round(record.inference_s, 3)}
            return [
                Finish(
                    self._write(record, JobStatus.COMPLETED, metadata=metadata, mark_finished=True, result_key=result.object_key),
                    record.trace_context,
                )
            ]
        # Keeps the replica it ran on: a replica draining for maintenance finishes what it started.
        record.checkpoint = Checkpoint(result.step, result.latents, result.replica_id)
        self._enqueue(record)
        return []

    def error(
        self, job_id: str, call_id: int, kind: ErrorKind, detail: str, snapshot: ReplicaSnapshot | None = None
    ) -> list[Action]:
        """A slice failed. The state before it (the job's checkpoint) is still good unless the job broke."""
        ended = self._end_call(job_id, call_id)
        if ended is None:
            return []
        record, replica_id = ended
        if record.place is Place.STOPPING:
            self._remove(record)
            return [DeleteImage(job_id)]  # the call may have stored the image as it was cancelled
        if kind is ErrorKind.GPU_TIMEOUT:
            self._pool.mark_degraded(replica_id, GPU_TIMEOUT_REASON, self._config.degraded_cooldown_s)
            return self._failed(record, GPU_TIMEOUT_REASON, hold_on=replica_id)
        if kind is ErrorKind.REPLICA_UNAVAILABLE:
            if snapshot is not None:
                self._pool.note_snapshot(replica_id, snapshot)
            else:  # no word from it: keep work away from it for a while
                self._pool.mark_degraded(replica_id, detail, self._config.degraded_cooldown_s)
            actions = self._back_to_pending(record, {})
            return [*actions, self._hold([record], snapshot.reason if snapshot and snapshot.reason else detail, replica_id)]
        if kind is ErrorKind.REPLICA_LOST:
            self._pool.forget(replica_id)
            return self._failed(record, detail)
        if kind is ErrorKind.STORAGE:
            record.storage_faults += 1
            metadata = {"storage_error": detail, "storage_faults": record.storage_faults}
            if record.storage_faults >= self._config.max_storage_faults:
                self._remove(record)
                message = f"its image could not be stored {record.storage_faults} times; last: {detail}"
                return [
                    Finish(
                        self._write(record, JobStatus.FAILED, metadata=metadata, mark_finished=True, error=message),
                        record.trace_context,
                    )
                ]
            actions = self._back_to_pending(record, metadata)
            delay_s = self._config.storage_backoff.delay_s(record.storage_faults, self._rand)
            self._defer(record, self._clock() + delay_s)
            return actions
        record.checkpoint, record.inference_s = None, 0.0  # a run that raised may have left bad state: start over
        return self._failed(record, detail)

    def _end_call(self, job_id: str, call_id: int) -> tuple[JobRecord, str] | None:
        """The record whose current call this is and the call's replica, its slot freed; None for a
        call the core no longer waits on (its replica expired, the job was let go)."""
        record = self._records.get(job_id)
        if record is None or record.call is None or record.call.call_id != call_id:
            return None
        replica_id = record.call.replica_id
        self._leave_call(job_id, record.call)
        record.call = None
        return record, replica_id

    def _leave_call(self, job_id: str, call: Call) -> None:
        """The job's part in `call` is over; the call's slot is free once every job's is."""
        self._pool.release(call.replica_id, call.call_id, job_id)
        running = self._calls.get(call.call_id)
        if running is not None:
            running.jobs.discard(job_id)
            if not running.jobs:
                del self._calls[call.call_id]

    def progress_report(self, call_id: int, step: int) -> None:
        """A replica says where a call's jobs stand (between slices: at most every few hundred ms)."""
        running = self._calls.get(call_id)
        if running is not None:
            running.step = max(running.step, step)

    def _failed(self, record: JobRecord, error: str, hold_on: str | None = None) -> list[Action]:
        """Count a failed run: at `max_attempts` the job ends `failed`, else it waits again (held on `hold_on`)."""
        record.failures += 1
        metadata = {"failures": record.failures, "last_error": error}
        if record.failures >= self._config.max_attempts:
            self._remove(record)
            message = f"failed {record.failures} times; last: {error}"
            failed = self._write(
                record, JobStatus.FAILED, metadata=metadata, mark_finished=True, error=message, attempts=record.failures
            )
            return [Finish(failed, record.trace_context)]
        logger.warning(
            "Job %s failed (%d of %d): %s; re-queued", record.job_id, record.failures, self._config.max_attempts, error
        )
        actions = self._back_to_pending(record, metadata)
        if hold_on is None:
            self._enqueue(record)
            return actions
        return [*actions, self._hold([record], error, hold_on)]

    def _back_to_pending(self, record: JobRecord, metadata: dict[str, Any]) -> list[Action]:
        if record.db_status is JobStatus.PENDING and not metadata:
            return []
        return [Persist(self._write(record, JobStatus.PENDING, metadata=metadata))]

    # ----- time -----

    def tick(self) -> list[Action]:
        """What time makes happen: silent replicas drop, countdowns end, holds, then dispatch."""
        actions = self._expire_replicas()
        now = self._clock()
        while (record := self._next_deferred()) is not None and record.ready_at <= now:
            self._enqueue(record)
        actions += self._hold_waiting(now)
        actions += self.schedule()
        return actions

    def _expire_replicas(self) -> list[Action]:
        actions: list[Action] = []
        for replica in self._pool.expire():
            logger.warning("Worker replica %s stopped reporting; it no longer counts", replica.replica_id)
            for call_id, jobs in sorted(replica.calls.items()):
                actions.append(CancelCall(min(jobs), call_id))
                for job_id in sorted(jobs):
                    actions += self.error(
                        job_id, call_id, ErrorKind.REPLICA_LOST, f"replica {replica.replica_id} stopped reporting"
                    )
        return actions

    def _hold_waiting(self, now: float) -> list[Action]:
        """With no usable replica, every waiting job is held, and held again when its retry time comes."""
        reason = self._pool.outage_reason()
        if reason is None:
            return []
        due = [
            record
            for record in self._records.values()
            if record.place in QUEUED and record.next_delay_at <= now and not self._continues_draining(record)
        ]
        if not due:
            return []
        actions: list[Action] = []
        for record in due:
            actions += self._back_to_pending(record, {})
        return [*actions, self._hold(due, reason, None)]

    def _hold(self, records: list[JobRecord], reason: str, replica_id: str | None) -> HoldJobs:
        now = self._clock()
        held = []
        for record in records:
            delays = record.hold.delays + 1 if record.hold else 1
            delay = Delay(utc(now), reason, replica_id, self._config.hold_backoff.delay_s(delays, self._rand))
            record.hold = record.hold.delayed(delay) if record.hold else Hold.begin(delay)
            record.next_delay_at = now + delay.retry_after_s
            if record.place is Place.WAITING:
                record.place = Place.HELD
            elif record.place not in QUEUED:
                self._enqueue(record)
            held.append(HeldJob(record.job_id, record.lane, record.hold, record.trace_context))
        return HoldJobs(tuple(held))

    def next_wakeup(self) -> float:
        """When `tick` next has something to do without any event: an expiry, a countdown, a delay."""
        times = [self._pool.next_expiry()]
        if (deferred := self._next_deferred()) is not None:
            times.append(deferred.ready_at)
        if self._pool.outage_reason() is not None:
            times += [r.next_delay_at for r in self._records.values() if r.place in QUEUED]
        return min(times)

    # ----- dispatch -----

    def schedule(self) -> list[Action]:
        """Fill free slots: draining replicas finish their jobs, then the lanes in precedence order."""
        starts: list[Action] = []
        if self._pool.any_draining():
            for record in [r for r in self._records.values() if self._continues_draining(r)]:
                assert record.checkpoint is not None
                call_id = next(self._call_ids)
                if self._pool.assign_draining(call_id, record.job_id, record.checkpoint.replica_id):
                    starts += self._start([record], record.checkpoint.replica_id, call_id)
        still_running: list[QueuedJob] = []
        plan = self._pool.plan()
        while plan.free_slots > 0:
            queued = self._queue.pop()
            if queued is None:
                break
            record = self._records[queued.job_id]
            if self._runs_elsewhere(record, plan):
                still_running.append(queued)
                continue
            batch = [record, *self._companions(record, plan)]
            call_id = next(self._call_ids)
            replica_id = plan.assign(call_id, [member.job_id for member in batch], record.params.model)
            assert replica_id is not None  # there was a usable slot
            starts += self._start(batch, replica_id, call_id)
        for queued in still_running:
            self._queue.push(queued)
        return starts + self._yield_to_realtime()

    def _runs_elsewhere(self, record: JobRecord, plan: SlotPlan) -> bool:
        """A previous router's call still runs it: running it twice would store its image twice."""
        return plan.runs_elsewhere(record.job_id)

    def _companions(self, first: JobRecord, plan: SlotPlan) -> list[JobRecord]:
        """Waiting jobs to denoise in one call with `first`, up to `max_batch_size` in all: same lane
        and batch key, in queue order. Nothing waits for a batch to fill."""
        if first.batch_key is None:
            return []
        chosen: dict[str, JobRecord] = {first.job_id: first}

        def usable(queued: QueuedJob) -> bool | None:
            if queued.job_id == first.job_id:
                return None  # on its way already
            record = self._records[queued.job_id]
            if self._runs_elsewhere(record, plan):
                return False
            chosen[queued.job_id] = record
            return True

        self._batchable.take(first.batch_key, self._config.max_batch_size - 1, usable)
        return list(chosen.values())[1:]

    def _yield_to_realtime(self) -> list[Action]:
        """With slicing on, realtime jobs left waiting once every free slot is taken get the slots
        of running batch calls, which yield at their next slice boundary: the lowest priority first,
        then the newest call."""
        if not self._config.steps_per_dispatch or self._queue.policy is QueuePolicy.FIFO or Lane.REALTIME in self._queue.paused:
            return []
        waiting = self._queue.depth(Lane.REALTIME)
        if not waiting:
            return []
        slots_wanted = -(-waiting // self._config.max_batch_size)
        batch_calls = [
            (call_id, running)
            for call_id, running in self._calls.items()
            if running.lane is Lane.BATCH and self._pool.is_usable(running.replica_id)
        ]
        slots_wanted -= sum(1 for _, running in batch_calls if running.yielding)
        actions: list[Action] = []
        ranked = sorted(batch_calls, key=lambda call: (call[1].worst_priority, call[0]), reverse=True)
        for call_id, running in ranked:
            if slots_wanted <= 0:
                break
            if not running.yielding:
                actions += self._yield(call_id, running, "realtime")
                slots_wanted -= 1
        return actions

    def _continues_draining(self, record: JobRecord) -> bool:
        return record.place in QUEUED and record.checkpoint is not None and self._pool.is_draining(record.checkpoint.replica_id)

    def _start(self, records: list[JobRecord], replica_id: str, call_id: int) -> list[Action]:
        """Reserve the call. Between two slices the database already says `running`: nothing to write."""
        writes: list[JobWrite] = []
        resumed: list[Action] = []
        for record in records:
            self._unplace(record)
            if record.db_status is JobStatus.PENDING:
                metadata: dict[str, Any] = {}
                if record.hold is not None:
                    metadata["degraded"] = record.hold.resumed_document(utc(self._clock()))
                    resumed.append(Resumed(record.job_id, record.hold))
                # `attempts` counts tries: each failure makes the next start another one. `started_at`
                # is the start of the run that is going on, from step 0.
                writes.append(self._write(
                    record, JobStatus.RUNNING, metadata=metadata, attempts=record.failures + 1,
                    mark_started=record.checkpoint is None,
                ))  # fmt: skip
            record.hold = None
            record.place = Place.RUNNING
            record.call = Call(call_id, replica_id)
        first = records[0]
        worst_priority = max(record.queued.priority for record in records)
        self._calls[call_id] = RunningCall(replica_id, first.lane, worst_priority, {r.job_id for r in records}, first.step)
        batch = WorkBatch(call_id, replica_id, tuple(self._item(record) for record in records), self._config.steps_per_dispatch)
        return [Start(batch, first.lane, tuple(writes)), *resumed]

    @staticmethod
    def _item(record: JobRecord) -> WorkItem:
        checkpoint = record.checkpoint
        return WorkItem(
            record.job_id,
            record.params,
            step=record.step,
            latents=checkpoint.latents if checkpoint else None,
            trace_context=record.trace_context,
            may_be_stored=record.storage_faults > 0 or (checkpoint is None and record.recovered),
        )

    # ----- the database's view -----

    def forget(self, job_id: str) -> list[Action]:
        """Let go of a job the database no longer agrees on (a refused write, a reconciled divergence).

        The reconciler takes it back if the database still holds it unfinished.
        """
        record = self._records.get(job_id)
        if record is None:
            return []
        actions: list[Action] = []
        if record.call is not None:
            actions += self._stop_call(job_id, record.call)
            self._leave_call(job_id, record.call)
        self._remove(record)
        return actions

    def reconcile(self, stored: Mapping[str, tuple[JobStatus, Any]]) -> Divergence:
        """Compare with the database: `stored` maps job ids to (status, updated_at) for every unfinished
        stored job and for every job this core holds (absent: the row is gone).

        A disagreement is acted on only when the next round sees it again unchanged, so writes in
        flight between the two views are never mistaken for divergence.
        """
        suspects: set[tuple[str, str | None, Any]] = set()
        for job_id, (status, updated_at) in stored.items():
            if job_id not in self._records and not status.is_terminal:
                suspects.add((job_id, status.value, updated_at))
        for job_id, record in self._records.items():
            if record.place is Place.STOPPING:
                continue
            if job_id not in stored:
                suspects.add((job_id, None, None))
            elif stored[job_id][0].is_terminal:
                suspects.add((job_id, stored[job_id][0].value, stored[job_id][1]))
        confirmed = suspects & self._suspects
        self._suspects = frozenset(suspects)
        adopt = frozenset(job_id for job_id, status, _ in confirmed if job_id not in self._records)
        drop = frozenset(job_id for job_id, _, _ in confirmed if job_id in self._records)
        return Divergence(adopt, drop)

    def is_running(self, job_id: str, call_id: int) -> bool:
        """Whether `call_id` is still the job's call and still wanted: the shell asks before sending it,
        since a cancel, a refused write or an expired replica may have come first."""
        record = self._records.get(job_id)
        return record is not None and record.place is Place.RUNNING and record.call is not None and record.call.call_id == call_id

    def job_ids(self) -> list[str]:
        return list(self._records)

    # ----- views -----

    def records(self) -> Iterator[JobRecord]:
        return iter(self._records.values())

    def load(self) -> int:
        """Jobs that want a worker slot (waiting, held, running): what the autoscaler follows."""
        return sum(1 for record in self._records.values() if record.place is not Place.DEFERRED)

    def status(self) -> dict[str, Any]:
        counts = {place: dict.fromkeys(Lane, 0) for place in Place}
        for record in self._records.values():
            counts[record.place][record.lane] += 1
        return {
            "queues": {lane.value: self._queue.depth(lane) for lane in Lane},
            "paused_lanes": sorted(lane.value for lane in self._queue.paused),
            "held": {lane.value: count for lane, count in counts[Place.HELD].items()},
            "deferred": sum(counts[Place.DEFERRED].values()),
            "running": sum(counts[Place.RUNNING].values()) + sum(counts[Place.STOPPING].values()),
            "usable_slots": self._pool.usable_slots(),
            "outage": self._pool.outage_reason(),
            "workers": self._pool.describe(),
        }

    def replicas(self) -> list[dict[str, Any]]:
        return self._pool.describe()

    def progress(self, job_id: str, owner: str | None = None) -> Progress | None:
        """The job's live state; None when the core does not hold it (with `owner`: not theirs either)."""
        record = self._records.get(job_id)
        if record is None or owner not in (None, record.owner):
            return None
        position = self._queue_position(job_id) if record.place in QUEUED else None
        call = record.call
        running = self._calls.get(call.call_id) if call else None
        return Progress(
            place=record.place,
            step=running.step if running else record.step,
            total_steps=record.params.num_inference_steps,
            queue_position=position,
            hold=record.hold,
            replica_id=call.replica_id if call else None,
        )

    def _queue_position(self, job_id: str) -> int | None:
        """Ranks from one walk of the queue, redone once they are `queue_position_ttl_s` old: the
        fair-share queue has no cheap rank, and a hundred watchers must not walk 100,000 jobs each."""
        now, ttl_s = self._clock(), self._config.queue_position_ttl_s
        # A job queued since the last walk has no rank in it: walk again, yet at most ten times a ttl.
        stale = job_id not in self._positions and now >= self._positions_due - ttl_s * 0.9
        if now >= self._positions_due or stale:
            self._positions = {queued.job_id: rank for rank, queued in enumerate(self._queue)}
            self._positions_due = now + ttl_s
        return self._positions.get(job_id)

    # ----- moving a record between places -----

    def _enqueue(self, record: JobRecord) -> None:
        self._unplace(record)
        self._track(record)
        record.place = Place.HELD if record.hold is not None else Place.WAITING
        self._queue.push(record.queued)
        if self._config.max_batch_size > 1:
            record.batch_key = (record.lane, *record.params.batch_key(), record.step)
            self._batchable.add(record.batch_key, record.queued)

    def _defer(self, record: JobRecord, until: float) -> None:
        self._unplace(record)
        self._track(record)
        record.place = Place.DEFERRED
        record.ready_at = until
        heapq.heappush(self._deferred, (until, record.job_id))

    def _next_deferred(self) -> JobRecord | None:
        """The deferred job that is ready first. Entries of jobs that left or were deferred again
        since are dropped as they reach the top: a tick costs the jobs it wakes, not all deferred."""
        while self._deferred:
            until, job_id = self._deferred[0]
            record = self._records.get(job_id)
            if record is not None and record.place is Place.DEFERRED and record.ready_at == until:
                return record
            heapq.heappop(self._deferred)
        return None

    def _unplace(self, record: JobRecord) -> None:
        if record.place in QUEUED:
            self._queue.remove(record.job_id)
        if record.batch_key is not None:
            self._batchable.discard(record.batch_key, record.job_id)
            record.batch_key = None

    def _remove(self, record: JobRecord) -> None:
        self._unplace(record)
        self._untrack(record)

    def _track(self, record: JobRecord) -> None:
        if record.job_id not in self._records:
            self._records[record.job_id] = record
            self._unfinished[(record.owner, record.lane)] += 1

    def _untrack(self, record: JobRecord) -> None:
        if self._records.pop(record.job_id, None) is not None:
            key = (record.owner, record.lane)
            self._unfinished[key] -= 1
            if not self._unfinished[key]:
                del self._unfinished[key]  # owners come and go: keep the counter to those with work

    def _write(self, record: JobRecord, target: JobStatus, **changes: Any) -> JobWrite:
        """The write that moves `record` to `target` in the database; the core assumes it lands."""
        write = JobWrite(record.job_id, frozenset({record.db_status}), target, **changes)
        record.db_status = target
        return write
