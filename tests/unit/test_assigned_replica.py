"""The Serve request router honours the job router's choice and backs off while it cannot."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from ray.serve._private.request_router.common import RequestRoutingContext

from scheduling.assigned_replica import AssignedReplicaRouter
from scheduling.work import GenerationParams, WorkBatch, WorkItem, YieldRequest

PARAMS = GenerationParams("p", None, 64, 64, 4, 7.5, 1)


def replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def request(*args: object) -> SimpleNamespace:
    return SimpleNamespace(args=list(args), routing_context=RequestRoutingContext())


def choose(candidates: list[SimpleNamespace], pending: SimpleNamespace) -> list[list[SimpleNamespace]]:
    router = AssignedReplicaRouter.__new__(AssignedReplicaRouter)  # no Serve machinery needed here
    return asyncio.run(router.choose_replicas(candidates, pending))  # type: ignore[arg-type]


def test_the_assigned_replica_and_no_other() -> None:
    a, b = replica("a"), replica("b")
    for addressed in (WorkBatch(1, "b", (WorkItem("job", PARAMS),)), YieldRequest("b", 1)):
        pending = request(addressed)
        assert choose([a, b], pending) == [[b]]
        assert pending.routing_context.should_backoff is False


def test_an_absent_replica_means_back_off() -> None:
    pending = request(WorkBatch(1, "gone", (WorkItem("job", PARAMS),)))
    assert choose([replica("a")], pending) == [[]]
    assert pending.routing_context.should_backoff is True


def test_other_calls_go_anywhere() -> None:
    a = replica("a")
    assert choose([a], request()) == [[a]]
