"""Where the router of a Serve application lives, as a named Ray actor (stdlib only: the autoscaling
policy imports it inside the Serve controller)."""

ROUTER_NAMESPACE = "seidra"


def router_name(app_name: str) -> str:
    """One router per Serve application: `seidra-router` for the application `seidra`."""
    return f"{app_name}-router"
