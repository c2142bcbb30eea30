"""A Serve autoscaling policy for the worker deployment: replicas follow the router's backlog.

The backlog lives in the router actor, not in replica queues, so Serve's request-based policy
cannot see it. This policy runs in the Serve controller's event loop every control-loop tick; it
must never block there, so it reads the router's load in a background task at most every
`poll_interval_s` and decides from the last value. Serve then applies the deployment's min/max and
upscale/downscale delays. Imports: Ray and the standard library only (it runs in the controller).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import ray

from scheduling.router_lookup import ROUTER_NAMESPACE, router_name

logger = logging.getLogger("ray.serve")


class RouterBacklogPolicy:
    def __init__(self, jobs_per_replica: float = 1.0, poll_interval_s: float = 1.0) -> None:
        self._jobs_per_replica = jobs_per_replica
        self._poll_interval_s = poll_interval_s
        self._router: Any = None
        self._load: float | None = None
        self._poll: asyncio.Task[None] | None = None
        self._last_poll = 0.0

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        if (self._poll is None or self._poll.done()) and now - self._last_poll >= self._poll_interval_s:
            self._last_poll = now
            self._poll = asyncio.get_running_loop().create_task(self._read_load(router_name(ctx.app_name)))
        if self._load is None:  # nothing read yet: keep what Serve has
            return ctx.target_num_replicas, {}
        return math.ceil(self._load / self._jobs_per_replica), {"router_load": self._load}

    async def _read_load(self, name: str) -> None:
        try:
            if self._router is None:
                self._router = ray.get_actor(name, namespace=ROUTER_NAMESPACE)
            self._load = float(await self._router.autoscaling_load.remote())
        except Exception as error:  # no router yet, or restarting: look it up again next time
            self._router = None
            logger.warning("Autoscaling policy could not read %s: %r", name, error)
