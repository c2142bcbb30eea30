"""Model affinity: a job goes to a replica that holds its model when one has a free slot, loads it
elsewhere only when none has, and never jumps the queue for it. Jobs of different models or
adapters never share a call."""

from __future__ import annotations

from dataclasses import replace

from scheduling.directives import Health, Mode, ReplicaSnapshot
from scheduling.replicas import ReplicaPool
from scheduling.work import GenerationParams, Lora
from tests.unit.scheduler_harness import PARAMS, Core, spec

SNAPSHOT = ReplicaSnapshot(Mode.CUDA, Health.HEALTHY)


def holding(*models: str) -> ReplicaSnapshot:
    return replace(SNAPSHOT, models={model: () for model in models})


def model(name: str, *loras: Lora) -> GenerationParams:
    return replace(PARAMS, model=name, loras=loras)


class Clock:
    def __call__(self) -> float:
        return 0.0


def test_a_call_goes_where_its_model_is_even_when_another_replica_has_more_free_slots() -> None:
    pool = ReplicaPool(ttl_s=10, clock=Clock())
    pool.report("z-empty", 3, holding())
    pool.report("a-turbo", 1, holding("turbo"))
    pool.report("b-xl", 2, holding("xl"))
    plan = pool.plan()
    assert plan.assign(1, ["j1"], "xl") == "b-xl"
    assert plan.assign(2, ["j2"], "turbo") == "a-turbo"
    assert plan.assign(3, ["j3"], "turbo") == "z-empty"  # its holder is busy: loaded elsewhere, not waited for
    assert plan.assign(4, ["j4"], "turbo") == "z-empty"  # ...where it is now, before any report says so
    assert plan.assign(5, ["j5"], "xl") == "b-xl"
    assert plan.assign(6, ["j6"], None) == "z-empty"
    assert plan.assign(7, ["j7"], "xl") is None and plan.free_slots == 0


def test_what_a_replica_was_sent_counts_as_held_until_its_next_report() -> None:
    pool = ReplicaPool(ttl_s=10, clock=Clock())
    pool.report("a", 1, holding())
    pool.report("b", 1, holding())
    assert pool.assign(1, ["j1"], "xl") == "b"
    pool.release("b", 1, "j1")
    assert pool.assign(2, ["j2"], "xl") == "b"
    pool.release("b", 2, "j2")
    pool.report("b", 1, holding("turbo"))  # it evicted xl meanwhile: its report wins
    assert pool.assign(3, ["j3"], "xl") == "b"  # no holder: the most free slots, then the greatest id
    pool.release("b", 3, "j3")
    pool.report("b", 1, holding("turbo"))
    assert pool.assign(4, ["j4"], "turbo") == "b"


def test_status_shows_the_models_and_adapters_each_replica_holds() -> None:
    pool = ReplicaPool(ttl_s=10, clock=Clock())
    pool.report("a", 1, replace(SNAPSHOT, models={"turbo": ("ink",), "xl": ()}))
    [row] = pool.describe()
    assert row["models"] == {"turbo": ("ink",), "xl": ()}


def test_the_queue_decides_which_job_goes_next_its_model_only_where() -> None:
    core = Core()
    core.submit(spec("batch-xl", 8, 1, params=model("xl")), spec("realtime-turbo", 2, 2, params=model("turbo")))
    core.report("gpu-xl", holding("xl"))
    # The one free replica holds the batch job's model, yet the realtime job takes it and loads turbo.
    [start] = core.starts()
    assert (start.batch.job_ids, start.batch.replica_id) == (("realtime-turbo",), "gpu-xl")


def test_jobs_of_different_models_or_adapters_never_share_a_call() -> None:
    core = Core(overrides={"max_batch_size": 4})
    ink, ink_half = Lora("ink"), Lora("ink", 0.5)
    core.submit(
        spec("a1", 8, 1, params=model("a")),
        spec("b1", 8, 2, params=model("b")),
        spec("a-ink", 8, 3, params=model("a", ink)),
        spec("a2", 8, 4, params=model("a")),
        spec("a-ink-half", 8, 5, params=model("a", ink_half)),
        spec("a-ink2", 8, 6, params=model("a", ink)),
    )
    for replica in ("r1", "r2", "r3", "r4"):
        core.report(replica, holding("a"))
    calls = {start.batch.job_ids for start in core.starts()}
    assert calls == {("a1", "a2"), ("b1",), ("a-ink", "a-ink2"), ("a-ink-half",)}
