"""Random event sequences against the scheduling core, with its invariants checked after every step.

The test plays the router shell and the database: it carries out the core's actions (writes land
on a dict of statuses, calls stay outstanding until a rule answers them) and feeds back results,
errors, heartbeats, cancels, retries, maintenance, pauses and time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduling.directives import Health, Mode, ReplicaSnapshot
from scheduling.job_queue import QueueFullError
from scheduling.lanes import Lane
from scheduling.scheduler import (
    QUEUED,
    Action,
    CancelCall,
    ErrorKind,
    Finish,
    HoldJobs,
    JobWrite,
    Persist,
    Place,
    Start,
    UnknownJob,
    YieldCall,
)
from storage.job_status import ALLOWED, IllegalTransition, JobStatus
from tests.unit.scheduler_harness import HEALTHY, HOT, Core, spec

REPLICAS = ("r0", "r1", "r2")
SNAPSHOTS = {
    "healthy": HEALTHY,
    "hot": HOT,
    "unhealthy": ReplicaSnapshot(Mode.DEGRADED, Health.UNHEALTHY, "ECC errors"),
    "maintenance": ReplicaSnapshot(Mode.MAINTENANCE, Health.HEALTHY, "maintenance"),
}
MAX_ATTEMPTS = 3


def owner_of(number: int) -> str:
    """Two users, so that fair share and per-user counts are part of every sequence."""
    return ("ann", "bob")[number % 2]


@dataclass
class OutstandingCall:
    start: Start
    cancelled: bool = False

    @property
    def job_ids(self) -> tuple[str, ...]:
        return self.start.batch.job_ids


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = Core(
            overrides={"max_attempts": MAX_ATTEMPTS, "queue_limits": {Lane.REALTIME: 6, Lane.BATCH: 10}, "max_batch_size": 2}
        )
        self.db: dict[str, JobStatus] = {}
        self.calls: list[OutstandingCall] = []
        self.completed: set[str] = set()
        self.next_id = 0
        self.retrying: str | None = None
        self.replica_states = {"r0": "healthy", "r1": "silent", "r2": "silent"}
        self.report()

    # ----- carrying out actions, as the shell and the database would -----

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Start):
                batch = action.batch
                assert len({item.batch_key() for item in batch.items}) == 1, "jobs of one call must be compatible"
                for job_id in batch.job_ids:
                    running = [c for c in self.calls if job_id in c.job_ids and not c.cancelled]
                    assert not running, f"{job_id} started while a call of it still runs"
                for write in action.writes:
                    self.apply(write)
                for job_id in batch.job_ids:
                    assert self.db[job_id] is JobStatus.RUNNING, "sent, yet not running in the database"
                self.calls.append(OutstandingCall(action))
            elif isinstance(action, (Persist, Finish)):
                self.apply(action.write)
            elif isinstance(action, HoldJobs):
                for held in action.jobs:
                    assert self.db[held.job_id] is JobStatus.PENDING, "held while not pending in the database"
            elif isinstance(action, CancelCall):
                for call in self.calls:
                    if call.start.call_id == action.call_id:
                        call.cancelled = True
            elif isinstance(action, YieldCall):
                [call] = [c for c in self.calls if c.start.call_id == action.request.call_id]
                assert action.request.replica_id == call.start.batch.replica_id
                if action.reason == "realtime":
                    assert call.start.lane is Lane.BATCH, "only batch calls give their slot to realtime work"
                else:
                    assert any(self.db[job_id] is JobStatus.CANCELLED for job_id in call.job_ids), "a stop for no reason"

    def apply(self, write: JobWrite) -> None:
        current = self.db[write.job_id]
        assert current in write.from_status, f"{write.job_id}: write from {write.from_status} while {current}"
        if write.to_status is not current:
            assert write.to_status in ALLOWED[current], f"{write.job_id}: {current} -> {write.to_status}"
        if current.is_terminal:
            assert write.job_id == self.retrying, f"finished job {write.job_id} changed"
        assert current is not JobStatus.COMPLETED
        if write.attempts is not None:
            assert 1 <= write.attempts <= MAX_ATTEMPTS
        assert int(write.metadata.get("failures", 0)) <= MAX_ATTEMPTS
        self.db[write.job_id] = write.to_status
        if write.to_status is JobStatus.COMPLETED:
            self.completed.add(write.job_id)

    def tick(self) -> None:
        actions = self.core.tick()
        self.carry_out(actions)
        self.check_dispatch([a for a in actions if isinstance(a, Start)])

    # ----- events -----

    @rule(lane=st.sampled_from(list(Lane)), count=st.integers(1, 4))
    def submit(self, lane: Lane, count: int) -> None:
        priority = 2 if lane is Lane.REALTIME else 8
        specs = []
        for _ in range(count):
            self.next_id += 1
            specs.append(spec(f"{lane.value[0]}{self.next_id}", priority, self.next_id, owner=owner_of(self.next_id)))
        try:
            self.core.submit(*specs)
        except QueueFullError:
            return
        for job in specs:
            self.db[job.job_id] = JobStatus.PENDING

    @rule(replica=st.sampled_from(REPLICAS), state=st.sampled_from([*sorted(SNAPSHOTS), "silent"]))
    def replica_changes(self, replica: str, state: str) -> None:
        self.replica_states[replica] = state
        self.report()

    def report(self) -> None:
        """Every replica that is not silent reports, as each does every heartbeat interval."""
        for replica, state in self.replica_states.items():
            if state != "silent":
                self.core.report(replica, SNAPSHOTS[state])

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0, 11.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.core.clock.advance(seconds)
        self.report()
        self.tick()

    @rule()
    def tick_now(self) -> None:
        self.tick()

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), finished=st.booleans())
    def answer(self, data: st.DataObject, finished: bool) -> None:
        call = self.calls.pop(data.draw(st.integers(0, len(self.calls) - 1)))
        self.carry_out(self.core.finish_slice(call.start, steps=None if finished else 4))

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), kind=st.sampled_from(list(ErrorKind)), with_snapshot=st.booleans())
    def fail(self, data: st.DataObject, kind: ErrorKind, with_snapshot: bool) -> None:
        call = self.calls.pop(data.draw(st.integers(0, len(self.calls) - 1)))
        snapshot = HOT if with_snapshot and kind is ErrorKind.REPLICA_UNAVAILABLE else None
        for job_id in call.job_ids:
            self.carry_out(self.core.scheduler.error(job_id, call.start.call_id, kind, f"{kind.value}", snapshot))

    @precondition(lambda self: self.calls)
    @rule(kind=st.sampled_from([ErrorKind.JOB_ERROR, ErrorKind.GPU_TIMEOUT, ErrorKind.REPLICA_LOST]))
    def fail_the_newest_call(self, kind: ErrorKind) -> None:
        """Failures in a row on one job: the newest call is often the retry of the job that just failed."""
        call = self.calls.pop()
        for job_id in call.job_ids:
            self.carry_out(self.core.scheduler.error(job_id, call.start.call_id, kind, kind.value))

    @precondition(lambda self: self.db)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.db)))
        try:
            self.carry_out(self.core.scheduler.cancel(job_id))
        except UnknownJob:
            assert self.db[job_id].is_terminal
        except IllegalTransition:
            assert self.db[job_id] is JobStatus.CANCELLED

    @precondition(lambda self: self.db)
    @rule(data=st.data(), countdown_s=st.sampled_from([0.0, 3.0]))
    def retry(self, data: st.DataObject, countdown_s: float) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.db)))
        priority = 2 if job_id.startswith("r") else 8
        job = spec(job_id, priority, int(job_id[1:]), status=self.db[job_id], owner=owner_of(int(job_id[1:])))
        self.retrying = job_id
        try:
            self.carry_out(self.core.scheduler.retry(job, countdown_s))
        except IllegalTransition:
            place = {r.job_id: r.place for r in self.core.scheduler.records()}.get(job_id)
            assert place not in (Place.HELD,), "a held job must be retriable"
            assert self.db[job_id] in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.COMPLETED) or place is Place.STOPPING
        except QueueFullError as refused:  # a retry is a submission to the realtime lane: it needs room there
            assert refused.lane is Lane.REALTIME and refused.depth >= refused.limit
        finally:
            self.retrying = None

    @rule(replica=st.sampled_from((None, *REPLICAS)), enabled=st.booleans())
    def maintenance(self, replica: str | None, enabled: bool) -> None:
        try:
            self.core.scheduler.set_maintenance(replica, enabled)
        except KeyError:
            pass

    @rule(lane=st.sampled_from(list(Lane)), paused=st.booleans())
    def pause(self, lane: Lane, paused: bool) -> None:
        self.core.scheduler.set_lane_paused(lane, paused)

    # ----- invariants -----

    def _records(self) -> dict[str, Place]:
        return {record.job_id: record.place for record in self.core.scheduler.records()}

    @invariant()
    def every_job_is_in_exactly_one_place(self) -> None:
        places = self._records()
        unfinished = {job_id for job_id, status in self.db.items() if not status.is_terminal}
        assert {job_id for job_id, place in places.items() if place is not Place.STOPPING} == unfinished
        assert all(self.db[job_id] is JobStatus.CANCELLED for job_id, p in places.items() if p is Place.STOPPING)
        queued = {job.job_id for job in self.core.scheduler._queue}
        assert queued == {job_id for job_id, place in places.items() if place in QUEUED}

    @invariant()
    def per_user_counts_follow_the_records(self) -> None:
        records = list(self.core.scheduler.records())
        assert self.core.scheduler._unfinished == Counter((record.owner, record.lane) for record in records)

    @invariant()
    def replicas_never_hold_more_jobs_than_slots_and_a_job_runs_once(self) -> None:
        seen: set[str] = set()
        for row in self.core.scheduler.replicas():
            assert row["calls"] <= row["slots"] and len(row["running"]) <= 2 * row["calls"]
            assert not seen & set(row["running"])
            seen |= set(row["running"])
        for record in self.core.scheduler.records():
            assert (record.call is not None) == (record.place in (Place.RUNNING, Place.STOPPING))

    @invariant()
    def after_a_tick_free_slots_are_filled_realtime_first(self) -> None:
        self.tick()  # the shell ticks on every event; the checks run inside

    def check_dispatch(self, starts: list[Start]) -> None:
        """While a realtime job could start, no batch job starts; no usable slot idles beside waiting work."""
        core = self.core.scheduler
        records = {record.job_id: record for record in core.records()}
        paused = core._queue.paused
        waiting = [
            r for r in records.values() if r.place in QUEUED and r.lane not in paused and not core._continues_draining(r)
        ]  # fmt: skip
        fresh_batch = [
            s for s in starts
            if records[s.batch.items[0].job_id].lane is Lane.BATCH and not core._pool.is_draining(s.batch.replica_id)
        ]  # fmt: skip
        if fresh_batch:
            assert not [r for r in waiting if r.lane is Lane.REALTIME], "batch before realtime"
        if core.status()["usable_slots"] > 0:
            assert not waiting, f"{[r.job_id for r in waiting]} wait beside a free usable slot"

    def teardown(self) -> None:
        """With healthy replicas answering, every job ends, whatever came before."""
        for lane in Lane:
            self.core.scheduler.set_lane_paused(lane, False)
        self.core.scheduler.set_maintenance(None, False)
        self.replica_states = dict.fromkeys(REPLICAS, "healthy")
        for _ in range(200):
            self.core.clock.advance(31)
            self.report()
            self.tick()
            for call in list(self.calls):
                self.calls.remove(call)
                self.carry_out(self.core.finish_slice(call.start))
            if all(status.is_terminal for status in self.db.values()) and not self.calls:
                break
        assert all(status.is_terminal for status in self.db.values()), {j: s for j, s in self.db.items() if not s.is_terminal}
        assert list(self.core.scheduler.records()) == []


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_replace_is_enough_for_snapshots() -> None:
    """The machine reports running calls through `replace`: the snapshot type must stay a dataclass."""
    assert replace(HEALTHY, running_jobs=("j",)).running_jobs == ("j",)
