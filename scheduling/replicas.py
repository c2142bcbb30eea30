"""The router's view of the worker replicas: who is alive, usable, busy, in maintenance.

Replicas report a status snapshot every heartbeat; a replica silent for `ttl_s` is forgotten, so
the view is at most one heartbeat interval stale for reports and `ttl_s` for deaths. Pure Python
with an injected clock: unit-tested without Ray.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from scheduling.directives import InjectedFaults, Mode, ReplicaDirectives, ReplicaSnapshot


@dataclass
class Replica:
    replica_id: str
    slots: int
    last_seen: float
    snapshot: ReplicaSnapshot
    # This router's calls here (a slot each), by call id: the jobs each one advances.
    calls: dict[int, set[str]] = field(default_factory=dict)
    # What the replica said it runs, at its last report; calls of a previous router included.
    reported_running: set[str] = field(default_factory=set)
    # What the router saw itself (an inference timeout), until the replica's own reports agree.
    degraded_until: float = 0.0
    degraded_reason: str = ""
    # Models sent here since its last report: it holds them once it runs the call, so the next jobs
    # of that model go here too before its next report says so.
    sent_models: set[str] = field(default_factory=set)

    def holds(self) -> set[str]:
        return set(self.snapshot.models) | self.sent_models

    @property
    def running(self) -> set[str]:
        return set().union(*self.calls.values())

    def free_slots(self) -> int:
        # The replica's own list covers calls this router did not send: a previous router's, still
        # running after a restart. Not knowing how they were batched, each such job counts as a call.
        return self.slots - len(self.calls) - len(self.reported_running - self.running)


class ReplicaPool:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._replicas: dict[str, Replica] = {}
        self._maintenance: set[str] = set()
        self._maintenance_all = False
        self._faults: dict[str, InjectedFaults] = {}  # "*" targets every replica
        self._seen_any = False

    # ----- reports -----

    def report(self, replica_id: str, slots: int, snapshot: ReplicaSnapshot) -> bool:
        """Record a heartbeat; True when the replica is new."""
        self._seen_any = True
        running = set(snapshot.running_jobs)
        replica = self._replicas.get(replica_id)
        if replica is None:
            self._replicas[replica_id] = Replica(replica_id, slots, self._clock(), snapshot, reported_running=running)
            return True
        replica.slots, replica.last_seen, replica.snapshot = slots, self._clock(), snapshot
        replica.reported_running = running
        replica.sent_models.clear()
        return False

    def note_snapshot(self, replica_id: str, snapshot: ReplicaSnapshot) -> None:
        """A snapshot that came with a refusal rather than a heartbeat."""
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.snapshot = snapshot

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def expire(self) -> list[Replica]:
        deadline = self._clock() - self._ttl_s
        gone = [replica for replica in self._replicas.values() if replica.last_seen < deadline]
        for replica in gone:
            del self._replicas[replica.replica_id]
        return gone

    def next_expiry(self) -> float:
        """When the quietest replica expires if it stays silent (infinity without replicas)."""
        return min((r.last_seen + self._ttl_s for r in self._replicas.values()), default=float("inf"))

    def mark_degraded(self, replica_id: str, reason: str, for_s: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.degraded_until = self._clock() + for_s
            replica.degraded_reason = reason

    # ----- usability -----

    def unavailable_reason(self, replica: Replica) -> str | None:
        """Why no new work may go to this replica, or None when it may.

        A sick replica reports its sickness even in maintenance: "maintenance" means drain, and
        only a replica that can still run work drains.
        """
        if self._clock() < replica.degraded_until:
            return replica.degraded_reason
        snapshot = replica.snapshot
        if not snapshot.can_run:
            return snapshot.reason or f"mode {snapshot.mode.value}, health {snapshot.health.value}"
        if self.directives(replica.replica_id).maintenance or snapshot.mode is Mode.MAINTENANCE:
            return "maintenance"
        return None

    def plan(self) -> SlotPlan:
        """The usable replicas' free slots for one round of dispatch."""
        usable = [r for r in self._replicas.values() if r.free_slots() > 0 and self.unavailable_reason(r) is None]
        return SlotPlan(usable, self._replicas.values())

    def assign(self, call_id: int, job_ids: Collection[str], model: str | None = None) -> str | None:
        """Reserve a slot for call `call_id` of `job_ids` on a usable replica (see `SlotPlan.assign`)."""
        return self.plan().assign(call_id, job_ids, model)

    def is_draining(self, replica_id: str | None) -> bool:
        """In maintenance but otherwise fine: it finishes the jobs it started."""
        replica = self._replicas.get(replica_id) if replica_id else None
        return replica is not None and self.unavailable_reason(replica) == "maintenance"

    def any_draining(self) -> bool:
        return any(self.is_draining(replica_id) for replica_id in self._replicas)

    def assign_draining(self, call_id: int, job_id: str, replica_id: str) -> bool:
        """Let a job continue on the replica that started it while that replica drains."""
        if not self.is_draining(replica_id) or self._replicas[replica_id].free_slots() <= 0:
            return False
        self._replicas[replica_id].calls[call_id] = {job_id}
        return True

    def release(self, replica_id: str, call_id: int, job_id: str) -> None:
        """`job_id`'s part of the call ended; the slot is free once the call's last job's has."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            return
        replica.reported_running.discard(job_id)  # it answered: the next report will agree
        jobs = replica.calls.get(call_id)
        if jobs is not None:
            jobs.discard(job_id)
            if not jobs:
                del replica.calls[call_id]

    def is_usable(self, replica_id: str) -> bool:
        replica = self._replicas.get(replica_id)
        return replica is not None and self.unavailable_reason(replica) is None

    def usable_slots(self) -> int:
        return self.plan().free_slots

    def outage_reason(self) -> str | None:
        """Why nothing can run when no replica is usable; None otherwise.

        Before any replica has reported (start-up) there is nothing to say about GPU health; once
        some have, losing them all (a node lost, replicas crashing) is an outage too.
        """
        if not self._replicas:
            return "no worker replica is reporting" if self._seen_any else None
        reasons = {rid: self.unavailable_reason(replica) for rid, replica in self._replicas.items()}
        if any(reason is None for reason in reasons.values()):
            return None
        return "; ".join(f"replica {rid}: {reason}" for rid, reason in sorted(reasons.items()))

    # ----- operator controls -----

    def set_maintenance(self, replica_id: str | None, enabled: bool) -> None:
        if replica_id is None:
            self._maintenance_all = enabled
            if not enabled:
                self._maintenance.clear()
        elif enabled:
            self._maintenance.add(replica_id)
        else:
            self._maintenance.discard(replica_id)

    def set_faults(self, replica_id: str | None, faults: InjectedFaults | None) -> None:
        key = replica_id or "*"
        if faults is None:
            if replica_id is None:
                self._faults.clear()
            else:
                self._faults.pop(key, None)
        else:
            self._faults[key] = faults

    def directives(self, replica_id: str) -> ReplicaDirectives:
        return ReplicaDirectives(
            maintenance=self._maintenance_all or replica_id in self._maintenance,
            faults=self._faults.get(replica_id) or self._faults.get("*"),
        )

    # ----- views -----

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._replicas

    def describe(self) -> list[dict[str, Any]]:
        return [self._row(replica) for replica in sorted(self._replicas.values(), key=lambda r: r.replica_id)]

    def _row(self, replica: Replica) -> dict[str, Any]:
        reason = self.unavailable_reason(replica)
        return {
            **asdict(replica.snapshot),
            "replica_id": replica.replica_id,
            "slots": replica.slots,
            "running": sorted(replica.running),
            "calls": len(replica.calls),
            "seen_s_ago": round(self._clock() - replica.last_seen, 1),
            "maintenance": self.directives(replica.replica_id).maintenance,
            "usable": reason is None,
            "unavailable_reason": reason,
        }


@dataclass
class _Choice:
    """Heap order: the most free slots first, then the greatest replica id (`assign`'s preference)."""

    free_slots: int
    replica_id: str
    replica: Replica

    def __lt__(self, other: _Choice) -> bool:
        return (self.free_slots, self.replica_id) > (other.free_slots, other.replica_id)


class SlotPlan:
    """Free slots of the usable replicas for one round of dispatch.

    Time stands still within a round, so each replica's usability is judged once, not once per job
    dispatched: with a thousand replicas, that is the difference between a round costing a
    thousand checks and a million. One heap orders every usable replica, and one per model orders
    those that hold it; a heap's entry is checked against the replica's free slots when it comes
    up, so taking a slot updates one heap, not all of them.
    """

    def __init__(self, usable: list[Replica], everyone: Iterable[Replica]) -> None:
        self._free = {replica.replica_id: replica.free_slots() for replica in usable}
        self._anywhere = [_Choice(self._free[replica.replica_id], replica.replica_id, replica) for replica in usable]
        heapq.heapify(self._anywhere)
        self._holding: dict[str, list[_Choice]] = {}
        for choice in self._anywhere:
            # Disjoint: a model is sent here only when not held, and what was sent is forgotten at each report.
            for model in (*choice.replica.snapshot.models, *choice.replica.sent_models):
                self._holding.setdefault(model, []).append(choice)
        for heap in self._holding.values():
            heapq.heapify(heap)
        self.free_slots = sum(self._free.values())
        # Jobs a replica reports running on a call this router did not send (a previous router's).
        self._elsewhere = {job for replica in everyone for job in replica.reported_running - replica.running}

    def assign(self, call_id: int, job_ids: Collection[str], model: str | None = None) -> str | None:
        """Reserve a slot for call `call_id` of `job_ids`: on a replica that holds `model` when one
        has a free slot, else on any; among those, the one with the most free slots (then the
        greatest id). Which job goes next is the queue's decision, made before: a model only
        chooses where it goes."""
        holders = self._holding.get(model, []) if model else []
        heap, choice = holders, self._pop(holders)
        if choice is None:
            heap, choice = self._anywhere, self._pop(self._anywhere)
        if choice is None:
            return None
        replica = choice.replica
        replica.calls[call_id] = set(job_ids)
        self._free[replica.replica_id] -= 1
        self.free_slots -= 1
        if model and model not in replica.holds():
            replica.sent_models.add(model)
            self._put(self._holding.setdefault(model, []), replica)
        self._put(heap, replica)  # the other heaps' entries of it are put right when they come up
        return replica.replica_id

    def _put(self, heap: list[_Choice], replica: Replica) -> None:
        if self._free[replica.replica_id] > 0:
            heapq.heappush(heap, _Choice(self._free[replica.replica_id], replica.replica_id, replica))

    def _pop(self, heap: list[_Choice]) -> _Choice | None:
        """The heap's best replica with a free slot; entries made stale by slots taken meanwhile are
        put back with the replica's free slots of now."""
        while heap:
            choice = heapq.heappop(heap)
            free = self._free[choice.replica_id]
            if free == choice.free_slots and free > 0:
                return choice
            if free > 0:
                heapq.heappush(heap, _Choice(free, choice.replica_id, choice.replica))
        return None

    def runs_elsewhere(self, job_id: str) -> bool:
        return job_id in self._elsewhere
