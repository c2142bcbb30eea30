"""Per-user quotas and fair share in the scheduling core (no Ray, fake clock)."""

from __future__ import annotations

import pytest

from scheduling.job_queue import QueueFullError
from scheduling.lanes import Lane, lane_for
from scheduling.quota import Quota, QuotaExceeded, SubmissionTooLarge
from scheduling.scheduler import UnknownJob
from storage.job_status import JobStatus
from tests.unit.scheduler_harness import Core, job_ids, spec

QUOTA = Quota(max_unfinished={Lane.REALTIME: 2, Lane.BATCH: 3}, submissions_per_minute=4)


def submit_as(core: Core, owner: str, *specs_: tuple[str, int], quota: Quota = QUOTA) -> None:
    jobs = [spec(job_id, priority, owner=owner) for job_id, priority in specs_]
    reservation = core.scheduler.reserve([lane_for(job.priority) for job in jobs], owner, quota)
    core.scheduler.release(reservation)
    core.scheduler.submit(jobs)


def test_unfinished_jobs_are_limited_per_user_and_lane_and_free_up_as_jobs_end() -> None:
    core = Core()
    submit_as(core, "ann", ("r1", 2), ("r2", 2))
    with pytest.raises(
        QuotaExceeded, match="2 unfinished realtime job\\(s\\) already, 1 more asked for; the limit per user is 2"
    ) as refused:
        submit_as(core, "ann", ("r3", 2))
    assert refused.value.retry_after_s == 5
    submit_as(core, "bob", ("b-r1", 2), ("b-r2", 2))  # another user's room is their own
    submit_as(core, "ann", ("a-b1", 8), ("a-b2", 8), ("a-b3", 8))  # and another lane's
    with pytest.raises(QuotaExceeded):
        submit_as(core, "ann", ("a-b4", 8))
    core.record(core.scheduler.cancel("r1", owner="ann"))
    submit_as(core, "ann", ("r3", 2))


def test_a_submission_that_would_cross_the_limit_is_refused_whole() -> None:
    core = Core()
    submit_as(core, "ann", ("b1", 8), ("b2", 8))
    with pytest.raises(QuotaExceeded):
        submit_as(core, "ann", ("b3", 8), ("b4", 8))
    assert sorted(record.job_id for record in core.scheduler.records()) == ["b1", "b2"]


def test_room_reserved_by_a_submission_being_stored_counts_against_its_user() -> None:
    core = Core()
    storing = core.scheduler.reserve([Lane.REALTIME, Lane.REALTIME], "ann", QUOTA)
    with pytest.raises(QuotaExceeded):
        core.scheduler.reserve([Lane.REALTIME], "ann", QUOTA)
    core.scheduler.release(storing)  # its write failed: nothing was stored
    core.scheduler.release(core.scheduler.reserve([Lane.REALTIME], "ann", QUOTA))


def test_submissions_per_minute_is_a_token_bucket_with_a_retry_after_that_is_never_early() -> None:
    core = Core()
    quota = Quota(max_unfinished={Lane.REALTIME: 100, Lane.BATCH: 100}, submissions_per_minute=4)
    for index in range(4):  # a burst of a whole minute's worth
        submit_as(core, "ann", (f"r{index}", 2), quota=quota)
    with pytest.raises(QuotaExceeded, match="more than 4 submissions a minute") as refused:
        submit_as(core, "ann", ("r4", 2), quota=quota)
    assert refused.value.retry_after_s == 15  # one token every 15 s
    submit_as(core, "bob", ("bob-1", 2), quota=quota)  # buckets are per user
    core.clock.advance(14.9)
    with pytest.raises(QuotaExceeded) as still:
        submit_as(core, "ann", ("r4", 2), quota=quota)
    assert still.value.retry_after_s == 1
    core.clock.advance(0.1)
    submit_as(core, "ann", ("r4", 2), quota=quota)


def test_a_refused_submission_takes_no_token() -> None:
    core = Core()
    quota = Quota(max_unfinished={Lane.REALTIME: 1, Lane.BATCH: 100}, submissions_per_minute=2)
    submit_as(core, "ann", ("r1", 2), quota=quota)
    with pytest.raises(QuotaExceeded, match="unfinished"):
        submit_as(core, "ann", ("r2", 2), quota=quota)
    submit_as(core, "ann", ("b1", 8), quota=quota)  # the second token was still there


def test_without_a_quota_only_the_lane_limits_apply() -> None:
    core = Core()
    for index in range(10):
        core.scheduler.release(core.scheduler.reserve([Lane.REALTIME], "local", None))
        core.scheduler.submit([spec(f"r{index}", owner="local")])
    assert len(list(core.scheduler.records())) == 10


def test_a_user_cannot_cancel_another_users_job_in_the_core() -> None:
    core = Core()
    submit_as(core, "ann", ("r1", 2))
    with pytest.raises(UnknownJob):
        core.scheduler.cancel("r1", owner="bob")
    assert [record.job_id for record in core.scheduler.records()] == ["r1"]
    core.record(core.scheduler.cancel("r1"))  # an admin (no owner) may
    assert list(core.scheduler.records()) == []


def test_a_big_batch_does_not_make_another_users_jobs_wait_behind_it() -> None:
    core = Core(overrides={"queue_limits": {Lane.REALTIME: 10, Lane.BATCH: 1000}})
    unlimited = Quota(max_unfinished={Lane.REALTIME: 1000, Lane.BATCH: 1000}, submissions_per_minute=1000)
    submit_as(core, "big", *[(f"big-{index:03}", 8) for index in range(200)], quota=unlimited)
    submit_as(core, "small", *[(f"small-{index}", 8) for index in range(3)], quota=unlimited)
    core.report("gpu-a")
    started = []
    for _ in range(6):
        [start] = core.starts()
        started += job_ids([start])
        core.finish_slice(start, steps=100)
    assert started == ["big-000", "small-0", "big-001", "small-1", "big-002", "small-2"]


def test_a_retry_is_a_submission_it_needs_room_and_quota_in_its_new_lane() -> None:
    core = Core()
    quota = Quota(max_unfinished={Lane.REALTIME: 1, Lane.BATCH: 10}, submissions_per_minute=100)
    submit_as(core, "ann", ("rt", 2), quota=quota)
    for job_id in ("b1", "b2"):
        submit_as(core, "ann", (job_id, 8), quota=quota)
        core.record(core.scheduler.cancel(job_id, owner="ann"))
    cancelled = spec("b1", 8, status=JobStatus.CANCELLED, owner="ann")
    with pytest.raises(QuotaExceeded, match="limit per user is 1"):
        core.scheduler.retry(cancelled, quota=quota)  # it would come back as realtime: ann has one already
    assert [record.job_id for record in core.scheduler.records()] == ["rt"]
    core.record(core.scheduler.cancel("rt", owner="ann"))
    core.record(core.scheduler.retry(cancelled, quota=quota))
    assert {(record.job_id, record.lane) for record in core.scheduler.records()} == {("b1", Lane.REALTIME)}


def test_an_admin_retry_without_a_quota_still_needs_room_in_the_lane() -> None:
    core = Core(overrides={"queue_limits": {Lane.REALTIME: 1, Lane.BATCH: 10}})
    core.submit(spec("rt", 2))
    with pytest.raises(QueueFullError):
        core.scheduler.retry(spec("old", 8, status=JobStatus.FAILED))


def test_a_submission_larger_than_the_limit_itself_is_refused_as_never_fitting() -> None:
    core = Core()
    with pytest.raises(SubmissionTooLarge, match="4 batch jobs in one submission; the limit per user is 3"):
        submit_as(core, "ann", *[(f"b{n}", 8) for n in range(4)])


def test_a_submission_of_no_new_job_takes_no_token() -> None:
    core = Core()
    quota = Quota(max_unfinished={Lane.REALTIME: 10, Lane.BATCH: 10}, submissions_per_minute=1)
    core.scheduler.release(core.scheduler.reserve([], "ann", quota))  # a batch whose items all have their jobs
    core.scheduler.release(core.scheduler.reserve([Lane.BATCH], "ann", quota))  # the minute's token was still there
    with pytest.raises(QuotaExceeded, match="submissions a minute"):
        core.scheduler.reserve([Lane.BATCH], "ann", quota)


def test_a_submission_that_stores_nothing_gives_its_token_back() -> None:
    core = Core()
    quota = Quota(max_unfinished={Lane.REALTIME: 10, Lane.BATCH: 10}, submissions_per_minute=1)
    failed = core.scheduler.reserve([Lane.REALTIME], "ann", quota)
    core.scheduler.release(failed, stored=False)  # its database write failed
    stored = core.scheduler.reserve([Lane.REALTIME], "ann", quota)
    core.scheduler.release(stored)
    with pytest.raises(QuotaExceeded, match="submissions a minute"):
        core.scheduler.reserve([Lane.REALTIME], "ann", quota)
