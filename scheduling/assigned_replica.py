"""A Serve request router that sends each work item to the replica the job router chose for it.

The job router keeps per-replica slots, health and maintenance, so the handle must not pick a
replica by itself. A request whose replica has gone waits (Serve retries routing) until the job
router's inference timeout puts the job on hold.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from scheduling.work import WorkItem


class AssignedReplicaRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = _assigned_replica(pending_request)
        if target is None:  # not a work item (e.g. a probe): any replica will do
            return [candidate_replicas]
        return [[replica for replica in candidate_replicas if replica.replica_id.unique_id == target]]


def _assigned_replica(request: PendingRequest | None) -> str | None:
    if request is None or not request.args or not isinstance(request.args[0], WorkItem):
        return None
    return request.args[0].replica_id
