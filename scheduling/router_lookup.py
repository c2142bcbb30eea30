"""Where the router of a Serve application lives, as a named Ray actor.

Light on purpose: worker replicas, batch drivers and the autoscaling policy (inside the Serve
controller) find the router through this module without importing the router, SQLAlchemy or the
storage layer; Ray itself is imported only by `get_router`.
"""

from __future__ import annotations

from typing import Any

ROUTER_NAMESPACE = "seidra"


def router_name(app_name: str) -> str:
    """One router per Serve application: `seidra-router` for the application `seidra`."""
    return f"{app_name}-router"


def get_router(app_name: str) -> Any:
    """The application's running router (a Ray actor handle); raises ValueError when there is none."""
    import ray

    return ray.get_actor(router_name(app_name), namespace=ROUTER_NAMESPACE)
