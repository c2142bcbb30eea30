"""A router left running by an older release (it is detached) is told apart from a current one."""

from __future__ import annotations

from typing import Any

from tests.ray_app import RunningApp


class RouterBeforeVersions:
    """What a router of the first release answered: no `api_version`."""

    async def submit(self, requests: list[dict[str, Any]], batch_id: str | None = None) -> list[dict[str, Any]]:
        return []


class RouterOfVersionOne(RouterBeforeVersions):
    async def api_version(self) -> int:
        return 1


def test_outdated_routers_are_recognised(app: RunningApp) -> None:
    import ray

    from scheduling.router_lookup import ROUTER_NAMESPACE
    from scheduling.router import get_router, router_is_outdated

    assert router_is_outdated(get_router("seidra")) is False  # the one the app runs
    for old in (RouterBeforeVersions, RouterOfVersionOne):
        router = ray.remote(old).options(name=f"stand-in-{old.__name__}", namespace=ROUTER_NAMESPACE).remote()
        try:
            assert router_is_outdated(ray.get_actor(f"stand-in-{old.__name__}", namespace=ROUTER_NAMESPACE)) is True
        finally:
            ray.kill(router)
