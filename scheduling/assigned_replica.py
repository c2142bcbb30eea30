"""A Serve request router that sends each call (and each yield request) to the replica the job router chose.

The job router keeps per-replica slots, health and maintenance, so the handle must not pick a
replica by itself. While the chosen replica is not in the handle's replica list (it is still being
announced, or it has gone), routing backs off and tries again; the job router's routing timeout
then gives the job back to its lane.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from scheduling.work import WorkBatch, YieldRequest


class AssignedReplicaRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = _assigned_replica(pending_request)
        if target is None:  # not a work item (e.g. a status probe): any replica will do
            return [candidate_replicas]
        chosen = [replica for replica in candidate_replicas if replica.replica_id.unique_id == target]
        if not chosen and pending_request is not None:
            # Without a backoff Serve retries at once, never yielding its event loop: the replica
            # list it waits for could then never arrive.
            pending_request.routing_context.should_backoff = True
        return [chosen]


def _assigned_replica(request: PendingRequest | None) -> str | None:
    if request is None or not request.args or not isinstance(request.args[0], (WorkBatch, YieldRequest)):
        return None
    return request.args[0].replica_id
