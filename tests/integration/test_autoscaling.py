"""Worker replicas follow the router's backlog (the policy Serve runs in its controller)."""

from __future__ import annotations

import time

from deployments.settings import WorkerSettings
from scheduling.router_lookup import ROUTER_NAMESPACE, router_name
from serve_app.app import _replicas
from tests.ray_app import RunningApp

APP = "autoscale-probe"


def running_replicas(deployment: str) -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[deployment].replica_states.get("RUNNING", 0)


def eventually_running(deployment: str, count: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while running_replicas(deployment) != count:
        assert time.monotonic() < deadline, f"{deployment}: {running_replicas(deployment)} replicas, not {count}"
        time.sleep(0.5)


def test_a_backlog_adds_replicas_and_an_idle_period_removes_them(app: RunningApp) -> None:
    import ray
    from ray import serve

    # A stand-in router whose backlog the test sets, and a worker stand-in that costs nothing:
    # the autoscaling configuration and policy are the real ones.
    @ray.remote(num_cpus=0)
    class Backlog:
        def __init__(self) -> None:
            self.load = 0

        def set(self, load: int) -> None:
            self.load = load

        async def autoscaling_load(self) -> int:
            return self.load

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Worker:
        def __call__(self) -> str:
            return "idle"

    settings = WorkerSettings(model="m", num_workers=1, max_workers=3, worker_upscale_delay_s=0, worker_downscale_delay_s=1)
    backlog = Backlog.options(name=router_name(APP), namespace=ROUTER_NAMESPACE).remote()
    serve.run(Worker.options(**_replicas(settings)).bind(), name=APP, route_prefix=None)
    try:
        eventually_running("Worker", 1)
        ray.get(backlog.set.remote(5))  # more than max_workers can take
        eventually_running("Worker", 3)
        ray.get(backlog.set.remote(0))
        eventually_running("Worker", 1)  # back to min_replicas
    finally:
        serve.delete(APP)
        ray.kill(backlog)


def test_a_fixed_count_without_max_workers() -> None:
    assert _replicas(WorkerSettings(model="m", num_workers=2)) == {"num_replicas": 2}
