"""The router's replica view: assignment, usability, expiry, maintenance, with a fake clock."""

from __future__ import annotations

from dataclasses import replace

from scheduling.directives import Health, InjectedFaults, Mode, ReplicaSnapshot
import zlib

from scheduling.replicas import ReplicaPool

HEALTHY = ReplicaSnapshot(Mode.CUDA, Health.HEALTHY)
HOT = ReplicaSnapshot(Mode.DEGRADED, Health.DEGRADED, "GPU temperature 95 °C >= 85 °C")


def call_of(job_id: str) -> int:
    """One call per job in these tests; its id follows from the job's."""
    return zlib.crc32(job_id.encode())


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def pool_with(*replica_ids: str, slots: int = 1) -> tuple[ReplicaPool, Clock]:
    clock = Clock()
    pool = ReplicaPool(ttl_s=10, clock=clock)
    for replica_id in replica_ids:
        assert pool.report(replica_id, slots, HEALTHY) is True
    return pool, clock


def test_assignment_fills_free_slots_on_usable_replicas_only() -> None:
    pool, _ = pool_with("a", "b")
    pool.report("b", 1, HOT)
    assert pool.assign(call_of("j1"), ["j1"]) == "a"
    assert pool.assign(call_of("j2"), ["j2"]) is None  # a is busy, b is hot
    assert pool.usable_slots() == 0
    pool.release("a", call_of("j1"), "j1")
    assert pool.assign(call_of("j3"), ["j3"]) == "a"


def test_most_free_slots_first() -> None:
    pool, _ = pool_with("a", "b", slots=2)
    assert [pool.assign(call_of(f"j{i}"), [f"j{i}"]) for i in range(4)] == ["b", "a", "b", "a"]
    assert pool.assign(call_of("j5"), ["j5"]) is None


def test_outage_reason_only_when_every_replica_is_unusable() -> None:
    pool, _ = pool_with()
    assert pool.outage_reason() is None  # no replicas: nothing known about GPUs
    pool.report("a", 1, HOT)
    assert pool.outage_reason() == "replica a: GPU temperature 95 °C >= 85 °C"
    pool.report("b", 1, HEALTHY)
    assert pool.outage_reason() is None
    pool.assign(call_of("j"), ["j"])  # busy is not unusable
    assert pool.outage_reason() is None


def test_a_timeout_degrades_a_replica_until_it_cools_down() -> None:
    pool, clock = pool_with("a")
    pool.mark_degraded("a", "GPU inference timeout", for_s=30)
    assert pool.outage_reason() == "replica a: GPU inference timeout"
    clock.now = 29.9
    assert pool.assign(call_of("j"), ["j"]) is None
    clock.now = 30
    assert pool.assign(call_of("j"), ["j"]) == "a"


def test_silent_replicas_expire() -> None:
    pool, clock = pool_with("a", "b")
    clock.now = 5
    pool.report("b", 1, HEALTHY)
    clock.now = 10.5
    assert [replica.replica_id for replica in pool.expire()] == ["a"]
    assert "a" not in pool and "b" in pool


def test_maintenance_one_or_all_drains_without_touching_running_work() -> None:
    pool, _ = pool_with("a", "b")
    assert pool.assign(call_of("running"), ["running"]) == "b"
    pool.set_maintenance("b", True)
    assert pool.directives("b").maintenance and not pool.directives("a").maintenance
    pool.release("b", call_of("running"), "running")
    assert pool.assign(call_of("next"), ["next"]) == "a"
    pool.set_maintenance(None, True)
    pool.report("c", 1, HEALTHY)  # joins while everything is in maintenance
    assert pool.directives("c").maintenance
    assert pool.outage_reason() == "replica a: maintenance; replica b: maintenance; replica c: maintenance"
    pool.set_maintenance(None, False)
    assert not any(pool.directives(r).maintenance for r in "abc")


def test_faults_target_one_replica_or_all() -> None:
    pool, _ = pool_with("a", "b")
    hot, sick = InjectedFaults(temperature_c=95), InjectedFaults(health=Health.UNHEALTHY)
    pool.set_faults(None, hot)
    pool.set_faults("b", sick)
    assert (pool.directives("a").faults, pool.directives("b").faults) == (hot, sick)
    pool.set_faults("b", None)
    assert pool.directives("b").faults == hot
    pool.set_faults(None, None)
    assert pool.directives("a").faults is None and pool.directives("b").faults is None


def test_describe_lists_each_replica() -> None:
    pool, clock = pool_with("a")
    pool.assign(call_of("j"), ["j"])
    clock.now = 1.25
    [row] = pool.describe()
    assert {k: row[k] for k in ("replica_id", "mode", "health", "running", "seen_s_ago", "usable", "maintenance")} == {
        "replica_id": "a", "mode": "cuda", "health": "healthy", "running": ["j"], "seen_s_ago": 1.2,
        "usable": True, "maintenance": False,
    }


def test_a_draining_replica_finishes_only_the_jobs_it_started() -> None:
    pool, _ = pool_with("a")
    assert pool.assign(call_of("started-here"), ["started-here"]) == "a"
    pool.release("a", call_of("started-here"), "started-here")  # between two step slices
    pool.set_maintenance("a", True)
    assert pool.assign(call_of("new"), ["new"]) is None
    assert pool.is_draining("a") and not pool.is_draining("gone") and pool.any_draining()
    assert pool.assign_draining(call_of("started-here"), "started-here", "a") is True
    assert pool.assign_draining(call_of("another"), "another", "a") is False  # its only slot is taken
    pool.report("a", 1, HOT)
    pool.release("a", call_of("started-here"), "started-here")
    assert pool.assign_draining(call_of("started-here"), "started-here", "a") is False  # degraded: not draining any more


def test_losing_every_replica_is_an_outage() -> None:
    pool, clock = pool_with("a")
    assert pool.next_expiry() == 10
    clock.now = 11
    pool.expire()
    assert pool.outage_reason() == "no worker replica is reporting"
    assert pool.next_expiry() == float("inf")


def test_calls_a_replica_reports_count_until_they_end() -> None:
    pool, _ = pool_with("a", slots=2)
    pool.report("a", 2, replace(HEALTHY, running_jobs=("from-the-previous-router",)))
    assert pool.assign(call_of("j1"), ["j1"]) == "a"
    assert pool.assign(call_of("j2"), ["j2"]) is None  # one slot is still taken by a call this router never sent
    pool.release("a", call_of("j1"), "j1")
    assert pool.usable_slots() == 1  # released at once, not at the next report


def test_one_plan_hands_out_slots_as_one_assignment_at_a_time_would() -> None:
    pool, _ = pool_with("a", "b", "c", slots=2)
    pool.report("c", 2, HOT)
    pool.report("b", 2, replace(HEALTHY, running_jobs=("previous-router",)))  # a call this router never sent
    plan = pool.plan()
    assert plan.free_slots == 3 and plan.runs_elsewhere("previous-router") and not plan.runs_elsewhere("j0")
    assert [plan.assign(call_of(f"j{i}"), [f"j{i}"]) for i in range(4)] == ["a", "b", "a", None]
    assert plan.free_slots == 0
    assert pool.assign(call_of("j4"), ["j4"]) is None  # the plan's assignments are the pool's own
