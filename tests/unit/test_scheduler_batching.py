"""Batched denoising and slices decided by the core: which jobs share a call, when a call yields."""

from __future__ import annotations

from dataclasses import replace

from scheduling.job_queue import QueuePolicy
from scheduling.lanes import Lane
from scheduling.scheduler import CancelCall, DeleteImage, Finish, Place, YieldCall
from scheduling.work import YieldRequest
from storage.job_status import JobStatus
from tests.unit.scheduler_harness import PARAMS, Core, job_ids, of_type, spec, statuses


def test_a_call_takes_the_compatible_jobs_waiting_in_its_lane_in_queue_order() -> None:
    core = Core(overrides={"max_batch_size": 3})
    wide = replace(PARAMS, width=128)
    core.submit(
        spec("b1", 8, 1), spec("other-size", 8, 2, params=wide), spec("b3", 9, 3), spec("b4", 8, 4), spec("b5", 8, 5)
    )
    core.report("gpu")
    [start] = core.starts()
    assert start.batch.job_ids == ("b1", "b4", "b5")  # priority 8 before 9; another size cannot join
    assert [write.job_id for write in start.writes] == ["b1", "b4", "b5"]
    assert {r.job_id: r.place for r in core.scheduler.records()}["b3"] is Place.WAITING
    core.finish_slice(start)
    [second] = core.starts()
    assert second.batch.job_ids == ("other-size",)  # the queue's next job, and nobody to join it
    core.finish_slice(second)
    assert job_ids(core.starts()) == ["b3"]


def test_realtime_jobs_never_share_a_call_with_batch_jobs_nor_wait_to_fill_one() -> None:
    core = Core(overrides={"max_batch_size": 4})
    core.submit(spec("b1", 8, 1), spec("b2", 8, 2), spec("r1", 2, 3))
    core.report("gpu-a")
    core.report("gpu-b")
    first, second = core.starts()
    assert (first.batch.job_ids, second.batch.job_ids) == (("r1",), ("b1", "b2"))


def test_a_waiting_realtime_job_makes_a_running_batch_call_yield_once_then_takes_its_slot() -> None:
    core = Core()  # slices of 4 steps
    core.submit(spec("long", 8))
    core.report("gpu")
    [batch_call] = core.starts()
    core.submit(spec("urgent", 2, 1))
    [yield_call] = core.tick()
    assert yield_call == YieldCall(YieldRequest("gpu", batch_call.call_id), "realtime")
    assert core.tick() == []  # asked once
    core.finish_slice(batch_call, steps=4)  # it yielded at step 4
    [urgent] = core.starts()
    assert urgent.batch.job_ids == ("urgent",)
    core.finish_slice(urgent)
    [resumed] = core.starts()
    assert (resumed.batch.job_ids, resumed.batch.step, resumed.batch.items[0].latents) == (("long",), 4, "latents@4")
    assert resumed.writes == ()  # it never stopped running, as far as the database is concerned
    [finish] = core.finish_slice(resumed)
    assert isinstance(finish, Finish) and finish.write.metadata["inference_s"] == 0.2  # both of its calls


def test_with_slicing_off_or_a_fifo_queue_nothing_yields() -> None:
    for overrides in ({"steps_per_dispatch": 0}, {"queue_policy": QueuePolicy.FIFO}):
        core = Core(overrides=overrides)
        core.submit(spec("long", 8))
        core.report("gpu")
        core.starts()
        core.submit(spec("urgent", 2, 1))
        assert of_type(core.tick(), YieldCall) == []


def test_a_fifo_queue_runs_the_oldest_job_first_whatever_its_lane() -> None:
    core = Core(overrides={"queue_policy": QueuePolicy.FIFO})
    core.submit(spec("batch-old", 8, 1), spec("realtime-new", 0, 2))
    core.report("gpu")
    assert job_ids(core.starts()) == ["batch-old"]
    assert core.scheduler.status()["queues"] == {Lane.REALTIME.value: 1, Lane.BATCH.value: 0}


def test_cancelling_one_job_of_a_call_makes_the_call_yield_and_the_others_carry_on() -> None:
    core = Core(overrides={"max_batch_size": 2})
    core.submit(spec("keep", 8, 1), spec("drop", 8, 2))
    core.report("gpu")
    [call] = core.starts()
    actions = core.record(core.scheduler.cancel("drop"))
    assert statuses(actions) == [("drop", JobStatus.CANCELLED)]
    assert of_type(actions, YieldCall) == [YieldCall(YieldRequest("gpu", call.call_id), "stop")]
    assert of_type(actions, CancelCall) == []  # that would cost "keep" its steps
    core.finish_slice(call, steps=4)
    [again] = core.starts()
    assert (again.batch.job_ids, again.batch.step) == (("keep",), 4)
    assert [type(action) for action in core.finish_slice(again)] == [Finish]


def test_a_cancelled_job_alone_in_its_call_is_cancelled_and_an_image_it_stored_deleted() -> None:
    core = Core(overrides={"max_batch_size": 2})
    core.submit(spec("alone", 8))
    core.report("gpu")
    [call] = core.starts()
    assert of_type(core.scheduler.cancel("alone"), CancelCall) == [CancelCall("alone", call.call_id)]
    assert of_type(core.finish_slice(call), DeleteImage) == [DeleteImage("alone")]


def test_progress_follows_the_replicas_reports_between_slices() -> None:
    core = Core()
    core.submit(spec("j"))
    core.report("gpu")
    [call] = core.starts()
    core.scheduler.progress_report(call.call_id, 3)
    core.scheduler.progress_report(call.call_id, 2)  # reports may arrive out of order
    progress = core.scheduler.progress("j")
    assert progress is not None and (progress.place, progress.step, progress.total_steps) == (Place.RUNNING, 3, 8)


def test_batches_keep_fair_share_users_take_turns_within_a_call() -> None:
    core = Core(overrides={"max_batch_size": 4})
    core.submit(*[spec(f"gina-{n}", 8, n, owner="gina") for n in range(6)])
    core.submit(*[spec(f"hugo-{n}", 8, 10 + n, owner="hugo") for n in range(2)])
    core.report("gpu")
    [start] = core.starts()
    assert start.batch.job_ids == ("gina-0", "hugo-0", "gina-1", "hugo-1")  # gina's turn, then in turns
    core.finish_slice(start)
    assert job_ids(core.starts()) == ["gina-2", "gina-3", "gina-4", "gina-5"]
