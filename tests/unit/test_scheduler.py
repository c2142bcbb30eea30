"""The scheduling core, event by event, with a fake clock: what starts, what is written, what is held.

These are the degraded-GPU scenarios of tests/test_generation_fallback.py (hold on timeout, ordered
resume, drain, attempts, retry with countdown, cancel during a slice, retry during a run) at the
level where they are decided; the live-cluster file keeps the runbook's tests and the wiring.
"""

from __future__ import annotations

import pytest

from scheduling.job_queue import QueueFullError
from scheduling.lanes import Lane
from scheduling.scheduler import (
    GPU_TIMEOUT_REASON,
    CancelCall,
    DeleteImage,
    ErrorKind,
    Finish,
    HoldJobs,
    Persist,
    Place,
    Resumed,
    Start,
    UnknownJob,
)
from storage.job_status import IllegalTransition, JobStatus
from tests.unit.scheduler_harness import HOT, PARAMS, Core, job_ids, of_type, spec, statuses


def places(core: Core) -> dict[str, Place]:
    return {record.job_id: record.place for record in core.scheduler.records()}


def test_realtime_first_then_each_lane_in_order_one_per_free_slot() -> None:
    core = Core()
    core.submit(spec("b1", 8, 1), spec("b2", 8, 2), spec("r1", 2, 3), spec("r2", 0, 4))
    assert core.starts() == []  # no replica yet: nothing runs, nothing is held either
    assert of_type(core.actions, HoldJobs) == []
    core.report("gpu-a")
    core.report("gpu-b")
    first = core.starts()
    assert job_ids(first) == ["r2", "r1"]
    assert [start.batch.replica_id for start in first] == ["gpu-b", "gpu-a"]  # most free slots, then id
    assert [(w.to_status, w.attempts, w.mark_started) for s in first for w in s.writes] == [
        (JobStatus.RUNNING, 1, True)
    ] * 2
    core.finish_slice(first[0])
    assert job_ids(core.starts()) == ["b1"]


def test_a_job_runs_in_slices_and_completes_with_one_write_per_change() -> None:
    core = Core()
    core.submit(spec("j"))
    core.report("gpu")
    [start] = core.starts()
    assert (start.batch.items[0].step, start.batch.slice_steps, start.batch.items[0].latents) == (0, 4, None)
    assert core.finish_slice(start, steps=4) == []  # between slices the database already says running
    [second] = core.starts()
    assert second.writes == () and (second.batch.items[0].step, second.batch.items[0].latents) == (4, "latents@4")
    [finish] = core.finish_slice(second)
    assert isinstance(finish, Finish)
    assert (finish.write.from_status, finish.write.to_status, finish.write.result_key) == (
        {JobStatus.RUNNING}, JobStatus.COMPLETED, "images/j.png",
    )  # fmt: skip
    assert finish.write.mark_finished and finish.write.metadata == {"replica_id": "gpu", "inference_s": 0.2}  # two calls
    assert places(core) == {}


def test_a_gpu_timeout_holds_the_job_degrades_the_replica_and_it_resumes_when_the_replica_recovers() -> None:
    core = Core()
    core.submit(spec("slow"))
    core.report("gpu")
    [start] = core.starts()
    actions = core.record(core.scheduler.error("slow", start.call_id, ErrorKind.GPU_TIMEOUT, "no answer in 4 s"))
    persist, holds = actions
    assert isinstance(persist, Persist) and isinstance(holds, HoldJobs)
    assert (persist.write.to_status, persist.write.metadata) == (
        JobStatus.PENDING, {"failures": 1, "last_error": GPU_TIMEOUT_REASON},
    )  # fmt: skip
    [held] = holds.jobs
    assert held.new_episode and held.hold.document() == {
        "reason": GPU_TIMEOUT_REASON,
        "since": held.hold.first.at.isoformat(),
        "retry_after_seconds": 5,
        "replica_id": "gpu",
        "delays": 1,
        "history": [held.hold.first.document()],
    }
    assert places(core) == {"slow": Place.HELD}
    assert core.scheduler.status()["outage"] == f"replica gpu: {GPU_TIMEOUT_REASON}"

    core.clock.advance(4)
    assert core.tick() == []  # cooling down, and not yet time for the next delay
    core.clock.advance(1)
    core.report("gpu")
    [again] = of_type(core.tick(), HoldJobs)
    assert not again.jobs[0].new_episode and again.jobs[0].hold.delays == 2  # no second notification
    assert again.jobs[0].hold.last.retry_after_s == 10

    core.clock.advance(25)  # the 30 s cooldown is over
    core.report("gpu")
    start, resumed = core.tick()
    assert isinstance(start, Start) and isinstance(resumed, Resumed)
    assert start.writes and start.writes[0].attempts == 2 and start.writes[0].mark_started  # from step 0 again
    assert start.writes[0].metadata["degraded"]["resumed_at"] == "2027-01-15T08:00:30+00:00"
    assert start.writes[0].metadata["degraded"]["delays"] == 2


def test_after_an_outage_held_jobs_resume_realtime_first_each_lane_in_order() -> None:
    core = Core()
    core.report("gpu", HOT)
    core.submit(*[spec(f"b{i}", 8, i) for i in range(3)], *[spec(f"r{i}", 2, 10 + i) for i in range(2)])
    [holds] = core.tick()
    assert isinstance(holds, HoldJobs)  # every waiting job, in one round
    assert sorted(held.job_id for held in holds.jobs) == ["b0", "b1", "b2", "r0", "r1"]
    assert all(held.new_episode and held.hold.last.reason == f"replica gpu: {HOT.reason}" for held in holds.jobs)
    assert core.scheduler.status()["held"] == {"realtime": 2, "batch": 3}

    core.report("gpu")
    order = []
    while starts := core.starts():
        [start] = starts
        order.append(start.batch.items[0].job_id)
        core.finish_slice(start)
    assert order == ["r0", "r1", "b0", "b1", "b2"]
    resumed = of_type(core.actions, Resumed)
    assert sorted(r.job_id for r in resumed) == sorted(order)  # one "running again" per episode


def test_maintenance_drains_started_jobs_and_holds_new_ones() -> None:
    core = Core()
    core.submit(spec("long"))
    core.report("gpu")
    [start] = core.starts()
    core.scheduler.set_maintenance(None, True)
    core.finish_slice(start, steps=4)
    core.submit(spec("newcomer"))
    actions = core.tick()
    [resume] = of_type(actions, Start)
    [holds] = of_type(actions, HoldJobs)
    assert (resume.batch.items[0].job_id, resume.batch.replica_id, resume.batch.items[0].step) == ("long", "gpu", 4)
    assert [held.job_id for held in holds.jobs] == ["newcomer"]
    assert holds.jobs[0].hold.last.reason == "replica gpu: maintenance"
    core.finish_slice(resume)
    core.scheduler.set_maintenance(None, False)
    assert job_ids(core.starts()) == ["newcomer"]
    with pytest.raises(KeyError):
        core.scheduler.set_maintenance("nope", True)


def test_three_failures_end_the_job_failed_then_a_retry_with_countdown_runs_it_again() -> None:
    core = Core()
    core.submit(spec("broken", 8))
    core.report("gpu")
    for attempt in (1, 2, 3):
        [start] = core.starts()
        assert start.writes and start.writes[0].attempts == attempt
        actions = core.record(core.scheduler.error("broken", start.call_id, ErrorKind.JOB_ERROR, "RuntimeError: boom"))
    [finish] = actions
    assert isinstance(finish, Finish)
    assert (finish.write.to_status, finish.write.error, finish.write.attempts) == (
        JobStatus.FAILED, "failed 3 times; last: RuntimeError: boom", 3,
    )  # fmt: skip
    assert places(core) == {}

    failed = spec("broken", 8, status=JobStatus.FAILED, metadata={"failures": 3})
    [persist] = core.scheduler.retry(failed, countdown_s=2)
    assert isinstance(persist, Persist)
    write = persist.write
    assert (write.from_status, write.to_status, write.priority, write.reopen) == (
        {JobStatus.FAILED}, JobStatus.PENDING, 2, True,
    )  # fmt: skip
    assert write.metadata["failures"] == 0 and write.metadata["retry"]["not_before"] == "2027-01-15T08:00:02+00:00"
    assert places(core) == {"broken": Place.DEFERRED}
    core.clock.advance(1.9)
    assert core.starts() == []
    core.clock.advance(0.1)
    [start] = core.starts()
    assert start.writes and start.writes[0].attempts == 1 and start.batch.items[0].job_id == "broken"


def test_a_held_job_retried_moves_to_the_realtime_lane_ahead_of_older_batch_work() -> None:
    core = Core()
    core.report("gpu", HOT)
    core.submit(spec("older", 8, 1), spec("retried", 8, 2))
    core.tick()
    [persist] = core.scheduler.retry(spec("retried", 8))
    assert (persist.write.from_status, persist.write.to_status, persist.write.priority) == (
        {JobStatus.PENDING}, JobStatus.PENDING, 2,
    )  # fmt: skip
    core.report("gpu")
    assert job_ids(core.starts()) == ["retried"]


def test_retrying_a_running_job_is_refused_whatever_its_slice() -> None:
    core = Core()
    core.submit(spec("busy"), spec("queued", 8))
    core.report("gpu")
    [start] = core.starts()
    with pytest.raises(IllegalTransition) as running:
        core.scheduler.retry(spec("busy"))
    assert running.value.current is JobStatus.RUNNING
    core.finish_slice(start, steps=4)  # between two slices: waiting again, but running in the database
    with pytest.raises(IllegalTransition):
        core.scheduler.retry(spec("busy"))
    with pytest.raises(IllegalTransition):  # waiting normally: nothing to retry
        core.scheduler.retry(spec("queued", 8))
    with pytest.raises(IllegalTransition):  # unknown to the core and completed in the database
        core.scheduler.retry(spec("done", status=JobStatus.COMPLETED))
    assert places(core) == {"busy": Place.WAITING, "queued": Place.WAITING}
    assert core.actions == [start]  # nothing was written


def test_cancelling_a_running_job_keeps_its_slot_until_the_call_stops() -> None:
    core = Core()
    core.submit(spec("running"), spec("next", arrival=1))
    core.report("gpu")
    [start] = core.starts()
    finish, cancel_call = core.scheduler.cancel("running")
    assert isinstance(finish, Finish) and isinstance(cancel_call, CancelCall)
    assert (finish.write.from_status, finish.write.to_status) == ({JobStatus.RUNNING}, JobStatus.CANCELLED)
    assert cancel_call.call_id == start.call_id
    assert core.starts() == []  # the slot is still taken: the replica stops at its next step boundary
    with pytest.raises(IllegalTransition):
        core.scheduler.cancel("running")
    with pytest.raises(IllegalTransition):
        core.scheduler.retry(spec("running", status=JobStatus.CANCELLED))
    assert core.scheduler.error("running", start.call_id, ErrorKind.JOB_ERROR, "Interrupted") == [DeleteImage("running")]
    assert job_ids(core.starts()) == ["next"]
    with pytest.raises(UnknownJob):
        core.scheduler.cancel("running")


def test_cancelling_a_waiting_or_held_job_removes_it_at_once() -> None:
    core = Core()
    core.submit(spec("w"))
    [finish] = core.scheduler.cancel("w")
    assert (finish.write.from_status, finish.write.to_status) == ({JobStatus.PENDING}, JobStatus.CANCELLED)
    assert places(core) == {}


def test_a_storage_fault_costs_no_attempt_keeps_the_replica_and_the_checkpoint() -> None:
    core = Core()
    core.submit(spec("j"))
    core.report("gpu")
    [first] = core.starts()
    core.finish_slice(first, steps=4)
    [last] = core.starts()
    [persist] = core.scheduler.error("j", last.call_id, ErrorKind.STORAGE, "S3 unreachable")
    assert persist.write.to_status is JobStatus.PENDING
    assert persist.write.metadata == {"storage_error": "S3 unreachable", "storage_faults": 1}
    assert core.scheduler.status()["outage"] is None and core.scheduler.status()["usable_slots"] == 1
    assert places(core) == {"j": Place.DEFERRED}
    core.clock.advance(2)  # the storage backoff
    [again] = core.starts()
    assert (again.batch.items[0].step, again.batch.items[0].latents, again.batch.items[0].may_be_stored) == (4, "latents@4", True)
    assert again.writes and again.writes[0].attempts == 1  # still the first try


def test_a_store_that_stays_broken_ends_the_job_failed_with_its_reason() -> None:
    core = Core(overrides={"max_storage_faults": 3})
    core.submit(spec("j"))
    core.report("gpu")
    for fault in (1, 2, 3):
        core.clock.advance(10)
        core.report("gpu")
        [start] = core.starts()
        actions = core.scheduler.error("j", start.call_id, ErrorKind.STORAGE, "PermissionError: media folder")
    [finish] = actions
    assert isinstance(finish, Finish)
    assert (finish.write.to_status, finish.write.error) == (
        JobStatus.FAILED, "its image could not be stored 3 times; last: PermissionError: media folder",
    )  # fmt: skip
    assert places(core) == {} and core.scheduler.status()["outage"] is None


def test_a_replica_that_stops_reporting_gives_its_job_back_with_a_failure_counted() -> None:
    core = Core()
    core.submit(spec("j"))
    core.report("gpu-a")
    [start] = core.starts()
    core.finish_slice(start, steps=4)
    [second] = core.starts()
    core.clock.advance(10.1)
    core.report("gpu-b")
    actions = core.tick()
    assert of_type(actions, CancelCall) == [CancelCall("j", second.call_id)]
    assert statuses(actions)[0] == ("j", JobStatus.PENDING)
    [restart] = of_type(actions, Start)
    assert (restart.batch.replica_id, restart.batch.items[0].step) == ("gpu-b", 4)  # from the last good slice
    assert core.scheduler.result("j", second.call_id, None) == []  # type: ignore[arg-type]  # the lost call is ignored


def test_an_unavailable_replica_holds_without_a_failure() -> None:
    core = Core()
    core.submit(spec("j"))
    core.report("gpu")
    [start] = core.starts()
    actions = core.scheduler.error("j", start.call_id, ErrorKind.REPLICA_UNAVAILABLE, "refused", HOT)
    assert statuses(actions) == [("j", JobStatus.PENDING)]
    assert actions[0].write.metadata == {}  # type: ignore[union-attr]
    [holds] = of_type(actions, HoldJobs)
    assert holds.jobs[0].hold.last.reason == HOT.reason


def test_recovery_requeues_running_rows_and_keeps_hold_episodes() -> None:
    core = Core()
    held_before = {
        "degraded": {
            "reason": "hot", "since": "2027-01-15T07:00:00+00:00", "retry_after_seconds": 40, "replica_id": None,
            "delays": 7, "history": [
                {"at": "2027-01-15T07:00:00+00:00", "reason": "hot", "replica_id": None, "retry_after_seconds": 5},
                {"at": "2027-01-15T07:59:00+00:00", "reason": "hot", "replica_id": None, "retry_after_seconds": 40},
            ],
        },
    }  # fmt: skip
    actions = core.scheduler.recover(
        [
            spec("was-running", status=JobStatus.RUNNING, metadata={"failures": 1}),
            spec("held", 8, metadata=held_before),
            spec("done", status=JobStatus.COMPLETED),
        ],
        reason="router restarted",
    )
    [persist] = actions
    assert (persist.write.job_id, persist.write.to_status, persist.write.metadata) == (
        "was-running", JobStatus.PENDING, {"requeued": "router restarted"},
    )  # fmt: skip
    assert places(core) == {"was-running": Place.DEFERRED, "held": Place.DEFERRED}  # until every replica reported
    core.clock.advance(10)  # the worker TTL
    core.tick()
    assert places(core) == {"was-running": Place.WAITING, "held": Place.HELD}
    core.report("gpu", HOT)
    core.clock.advance(30)
    [holds] = of_type(core.tick(), HoldJobs)
    by_id = {held.job_id: held for held in holds.jobs}
    assert by_id["held"].hold.delays == 8 and not by_id["held"].new_episode
    assert by_id["held"].hold.first.at.isoformat() == "2027-01-15T07:00:00+00:00"
    core.report("gpu")
    start = next(s for s in of_type(core.tick(), Start) if s.batch.items[0].job_id == "was-running")
    assert start.writes and start.writes[0].attempts == 2


def test_the_hold_record_stays_bounded_however_long_the_outage() -> None:
    core = Core()
    core.report("gpu", HOT)
    core.submit(spec("j"))
    for _ in range(500):
        core.tick()
        core.clock.advance(40)
        core.report("gpu", HOT)
    holds = [held for action in of_type(core.actions, HoldJobs) for held in action.jobs]
    assert len(holds) == 500 and sum(held.new_episode for held in holds) == 1
    document = holds[-1].hold.document()
    assert document["delays"] == 500 and len(document["history"]) == 2
    assert [entry["retry_after_seconds"] for entry in document["history"]] == [5, 40]


def test_a_write_the_database_refuses_lets_the_job_go_and_frees_its_slot() -> None:
    core = Core()
    core.submit(spec("deleted-row"), spec("next"))
    core.report("gpu")
    [start] = core.starts()
    assert core.scheduler.forget("deleted-row") == [CancelCall("deleted-row", start.call_id)]
    assert job_ids(core.starts()) == ["next"]


def test_the_reconciler_acts_only_on_divergences_seen_twice() -> None:
    core = Core()
    core.submit(spec("known"), spec("ended-behind-our-back"))
    updated = "2027-01-15T08:00:00+00:00"
    view = {
        "known": (JobStatus.PENDING, updated),
        "ended-behind-our-back": (JobStatus.FAILED, updated),
        "unknown": (JobStatus.PENDING, updated),
        "unknown-but-moving": (JobStatus.RUNNING, updated),
    }
    first = core.scheduler.reconcile(view)
    assert first.adopt == first.drop == frozenset()
    view["unknown-but-moving"] = (JobStatus.RUNNING, "2027-01-15T08:00:05+00:00")
    second = core.scheduler.reconcile(view)
    assert (second.adopt, second.drop) == ({"unknown"}, {"ended-behind-our-back"})


def test_a_full_lane_refuses_the_whole_submission() -> None:
    core = Core(overrides={"queue_limits": {lane: 2 for lane in Lane}})
    core.submit(spec("a", 8))
    with pytest.raises(QueueFullError) as full:
        core.submit(spec("b", 8), spec("c", 8), spec("r", 2))
    assert (full.value.depth, full.value.limit) == (1, 2)
    assert sorted(places(core)) == ["a"]


def test_room_reserved_for_a_submission_being_stored_counts_against_the_lane() -> None:
    core = Core(overrides={"queue_limits": {lane: 3 for lane in Lane}})
    storing = core.scheduler.reserve([Lane.BATCH, Lane.BATCH])  # its database write is in flight
    with pytest.raises(QueueFullError):
        core.scheduler.reserve([Lane.BATCH, Lane.BATCH])
    core.scheduler.reserve([Lane.REALTIME])  # another lane's room is its own
    core.scheduler.release(storing)  # stored (or failed): its jobs are in the queue now, or nowhere
    core.scheduler.reserve([Lane.BATCH] * 3)


def test_paused_lanes_keep_their_jobs_in_place() -> None:
    core = Core()
    core.scheduler.set_lane_paused(Lane.BATCH, True)
    core.submit(spec("b", 8), spec("r", 2, 1))
    core.report("gpu")
    [start] = core.starts()
    core.finish_slice(start)
    assert core.starts() == [] and places(core) == {"b": Place.WAITING}
    core.scheduler.set_lane_paused(Lane.BATCH, False)
    assert job_ids(core.starts()) == ["b"]


def test_work_items_carry_the_jobs_parameters_and_trace() -> None:
    core = Core()
    core.submit(spec("j", metadata={"trace_context": {"traceparent": "00-ab-cd-01"}}))
    core.report("gpu")
    [start] = core.starts()
    assert start.batch.items[0].params == PARAMS and start.batch.items[0].trace_context == {"traceparent": "00-ab-cd-01"}
    assert not start.batch.items[0].may_be_stored  # a new job: nothing to look for in the store


def test_jobs_a_previous_router_may_still_run_wait_for_every_replica_then_for_that_call() -> None:
    core = Core()
    # The dead router's last job is pending in the database: it sent the call before its write landed.
    core.scheduler.recover([spec("inherited", status=JobStatus.RUNNING), spec("sent-unrecorded", arrival=1)], reason="router restarted")
    core.report("gpu-b")  # gpu-a, busy with the dead router's call, has not reported yet
    assert core.starts() == []  # either may run on gpu-a: neither runs a second time on gpu-b
    core.report("gpu-a", running=("sent-unrecorded",))
    core.clock.advance(10)  # the worker TTL: every live replica has reported since the restart
    core.report("gpu-a", running=("sent-unrecorded",))
    core.report("gpu-b")
    [start] = core.starts()
    assert (start.batch.replica_id, start.batch.items[0].job_id) == ("gpu-b", "inherited")
    assert start.batch.items[0].may_be_stored  # the replica looks in the store first
    core.report("gpu-a")  # the dead router's call ended (its image stored, if it was the last slice)
    [again] = core.starts()
    assert (again.batch.replica_id, again.batch.items[0].job_id) == ("gpu-a", "sent-unrecorded")
    assert again.batch.items[0].may_be_stored
    core.finish_slice(again, steps=4)
    [resumed] = core.starts()
    assert not resumed.batch.items[0].may_be_stored  # from this router's own checkpoint


def test_progress_shows_the_step_reached_the_queue_position_and_the_hold() -> None:
    core = Core()
    core.submit(spec("rt-1", priority=2), spec("batch-1", priority=8, arrival=1), spec("batch-2", priority=8, arrival=2))
    waiting = core.scheduler.progress("batch-2")
    assert waiting is not None and (waiting.place, waiting.queue_position, waiting.step) == (Place.WAITING, 2, 0)
    assert core.scheduler.progress("batch-2", owner="someone else") is None
    core.report("r1")
    [start] = core.starts()
    running = core.scheduler.progress("rt-1")
    assert running is not None and (running.place, running.queue_position, running.replica_id) == (Place.RUNNING, None, "r1")
    core.finish_slice(start, steps=4)
    core.clock.advance(1.0)  # positions are walked again once they are a ttl old
    sliced = core.scheduler.progress("rt-1")
    assert sliced is not None and (sliced.step, sliced.total_steps, sliced.queue_position) == (4, 8, 0)
    assert core.scheduler.progress("batch-2").queue_position == 2  # type: ignore[union-attr]
    core.report("r1", HOT)
    core.clock.advance(10.0)
    core.tick()
    held = core.scheduler.progress("batch-1")
    assert held is not None and held.place is Place.HELD and held.hold is not None and held.hold.delays == 1
