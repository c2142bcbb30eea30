"""Exact orderings of the waiting queue (no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduling.job_queue import FairShareJobQueue, LaneQueues, QueuedJob, QueueFullError
from scheduling.lanes import Lane

LIMITS = {Lane.REALTIME: 3, Lane.BATCH: 5}


def ids(queue: LaneQueues | FairShareJobQueue) -> list[str]:
    return [job.job_id for job in queue]


def drain(queue: LaneQueues | FairShareJobQueue) -> list[str]:
    order = []
    while (job := queue.pop()) is not None:
        order.append(job.job_id)
    return order


def test_within_a_lane_lower_priority_number_first_then_arrival_then_id() -> None:
    queue = FairShareJobQueue()
    for job in [
        QueuedJob(8, 3.0, "c"),
        QueuedJob(6, 5.0, "late-but-urgent"),
        QueuedJob(8, 1.0, "b"),
        QueuedJob(8, 1.0, "a"),  # same priority and arrival: the id breaks the tie
        QueuedJob(9, 0.0, "first-but-lowest"),
    ]:
        queue.push(job)
    assert ids(queue) == ["late-but-urgent", "a", "b", "c", "first-but-lowest"]
    assert drain(queue) == ["late-but-urgent", "a", "b", "c", "first-but-lowest"]
    assert queue.pop() is None


def test_any_waiting_realtime_job_goes_before_every_batch_job() -> None:
    queue = LaneQueues(LIMITS)
    queue.push(QueuedJob(5, 0.0, "batch-urgent-early"))
    queue.push(QueuedJob(8, 1.0, "batch-normal"))
    queue.push(QueuedJob(4, 9.0, "realtime-lowest-late"))
    queue.push(QueuedJob(0, 10.0, "realtime-high-latest"))
    assert drain(queue) == ["realtime-high-latest", "realtime-lowest-late", "batch-urgent-early", "batch-normal"]


def test_a_realtime_job_arriving_later_overtakes_waiting_batch_jobs() -> None:
    queue = LaneQueues(LIMITS)
    for index in range(3):
        queue.push(QueuedJob(8, float(index), f"batch-{index}"))
    assert queue.pop().job_id == "batch-0"
    queue.push(QueuedJob(2, 10.0, "realtime"))
    assert drain(queue) == ["realtime", "batch-1", "batch-2"]


def test_removed_jobs_are_never_popped_and_can_come_back() -> None:
    queue = LaneQueues(LIMITS)
    for job in [QueuedJob(2, 1.0, "r1"), QueuedJob(2, 2.0, "r2"), QueuedJob(8, 0.0, "b1")]:
        queue.push(job)
    assert queue.remove("r1") == QueuedJob(2, 1.0, "r1")
    assert queue.remove("r1") is None
    assert "r1" not in queue and len(queue) == 2
    queue.push(QueuedJob(2, 1.0, "r1"))  # a retried job takes its old place again
    assert drain(queue) == ["r1", "r2", "b1"]


def test_a_job_cannot_be_queued_twice() -> None:
    queue = LaneQueues(LIMITS)
    queue.push(QueuedJob(2, 1.0, "same"))
    with pytest.raises(ValueError, match="already queued"):
        queue.push(QueuedJob(8, 2.0, "same"))


def test_depth_limits_apply_per_lane_and_to_the_whole_submission() -> None:
    queue = LaneQueues(LIMITS, retry_after_s=7)
    for index in range(3):
        queue.check_room(Lane.REALTIME)
        queue.push(QueuedJob(2, float(index), f"r{index}"))
    with pytest.raises(QueueFullError) as refused:
        queue.check_room(Lane.REALTIME)
    assert (refused.value.lane, refused.value.depth, refused.value.limit, refused.value.retry_after_s) == (
        Lane.REALTIME,
        3,
        3,
        7,
    )
    queue.check_room(Lane.BATCH, 5)  # the batch lane has its own limit
    with pytest.raises(QueueFullError):
        queue.check_room(Lane.BATCH, 6)
    assert queue.depth(Lane.REALTIME) == 3 and queue.depth(Lane.BATCH) == 0


def test_requeued_work_is_not_refused_by_the_limit() -> None:
    queue = LaneQueues({Lane.REALTIME: 1, Lane.BATCH: 1})
    queue.push(QueuedJob(2, 1.0, "r1"))
    queue.push(QueuedJob(2, 0.5, "r0"))  # e.g. a job handed back by a dead worker
    assert drain(queue) == ["r0", "r1"]


def test_refusals_survive_pickling_across_actor_boundaries() -> None:
    import pickle

    from storage.job_status import IllegalTransition, JobStatus
    from storage.jobs import JobNotFound

    full = pickle.loads(pickle.dumps(QueueFullError(Lane.BATCH, 20, 20, 5)))
    assert (full.lane, full.depth, full.limit, full.retry_after_s, str(full)) == (
        Lane.BATCH,
        20,
        20,
        5,
        "the batch queue is full (20 waiting, limit 20)",
    )
    illegal = pickle.loads(pickle.dumps(IllegalTransition("j", JobStatus.COMPLETED, JobStatus.CANCELLED)))
    assert str(illegal) == "job j is completed; it cannot become cancelled"
    assert str(pickle.loads(pickle.dumps(JobNotFound("j")))) == "job j does not exist"


def test_a_paused_lane_keeps_its_jobs_and_lets_the_others_run() -> None:
    queue = LaneQueues(LIMITS)
    queue.push(QueuedJob(8, 0.0, "batch"))
    queue.push(QueuedJob(2, 1.0, "realtime"))
    queue.paused.add(Lane.BATCH)
    assert queue.pop().job_id == "realtime"
    assert queue.pop() is None and queue.depth(Lane.BATCH) == 1
    queue.paused.discard(Lane.BATCH)
    assert queue.pop().job_id == "batch"


# ----- fair share: owners take turns within a priority -----


def test_owners_take_turns_within_a_priority_each_oldest_first() -> None:
    queue = LaneQueues(LIMITS | {Lane.BATCH: 200})
    for index in range(100):
        queue.push(QueuedJob(8, float(index), f"big-{index:03}", owner="big"))
    for index in range(3):
        queue.push(QueuedJob(8, 1000.0 + index, f"small-{index}", owner="small"))
    expected = ["big-000", "small-0", "big-001", "small-1", "big-002", "small-2"]
    assert ids(queue)[:6] == expected
    assert drain(queue)[:7] == [*expected, "big-003"]


def test_a_newcomer_waits_for_one_turn_of_everyone_already_waiting() -> None:
    queue = FairShareJobQueue()
    for owner in ("a", "b"):
        for index in range(3):
            queue.push(QueuedJob(8, float(index), f"{owner}{index}", owner=owner))
    assert queue.pop().job_id == "a0"
    queue.push(QueuedJob(8, 0.5, "c0", owner="c"))
    assert drain(queue) == ["b0", "a1", "c0", "b1", "a2", "b2"]


def test_fair_share_never_crosses_priorities_or_lanes() -> None:
    queue = LaneQueues(LIMITS)
    queue.push(QueuedJob(8, 0.0, "big-8a", owner="big"))
    queue.push(QueuedJob(8, 1.0, "big-8b", owner="big"))
    queue.push(QueuedJob(9, 0.0, "small-9", owner="small"))
    queue.push(QueuedJob(2, 5.0, "small-realtime", owner="small"))
    assert drain(queue) == ["small-realtime", "big-8a", "big-8b", "small-9"]


def test_an_owner_whose_jobs_were_all_removed_loses_their_turn() -> None:
    queue = FairShareJobQueue()
    queue.push(QueuedJob(8, 0.0, "a0", owner="a"))
    queue.push(QueuedJob(8, 1.0, "b0", owner="b"))
    queue.push(QueuedJob(8, 2.0, "a1", owner="a"))
    assert queue.remove("a0") is not None and queue.remove("a1") is not None
    assert drain(queue) == ["b0"]
    queue.push(QueuedJob(8, 0.0, "a0", owner="a"))  # back again: a fresh turn
    assert drain(queue) == ["a0"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "push", "pop", "remove"]),
            st.integers(0, 9),
            st.integers(0, 40),
            st.sampled_from(["a", "b", "c"]),
        ),
        max_size=80,
    )
)
def test_iteration_shows_exactly_the_order_pop_would_take(operations: list[tuple[str, int, int, str]]) -> None:
    queue = FairShareJobQueue()
    for operation, priority, number, owner in operations:
        job_id = f"job-{number}"
        if operation == "push" and job_id not in queue:
            queue.push(QueuedJob(priority, float(number % 7), job_id, owner=owner))
        elif operation == "pop":
            queue.pop()
        elif operation == "remove":
            queue.remove(job_id)
    shown = ids(queue)
    assert len(shown) == len(queue) == len(set(shown))
    assert drain(queue) == shown
    assert len(queue) == 0
