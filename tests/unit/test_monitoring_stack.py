"""The monitoring stack's Compose file and its start/stop scripts (no Docker engine runs here).

`docker compose config` cannot run here, so the file is read as Compose reads it: variables
interpolated (`${NAME:-default}`, `${NAME:?error}`, `$$`), then YAML.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "grafana" / "docker-compose.yml"
PASSWORD = "a-test-password"
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: `:-` and `:?` treat an empty value as unset."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if name is None:
            return "$"
        if env.get(name):
            return env[name]
        if operator == "?":
            raise MissingVariable(argument)
        return argument if operator == "-" else ""

    return INTERPOLATION.sub(value, text)


def compose_stack(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    stack: dict[str, Any] = yaml.safe_load(
        interpolate(COMPOSE.read_text(), {"SEIDRA_GRAFANA_ADMIN_PASSWORD": PASSWORD} if env is None else env)
    )
    return stack


def run(script: str, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script with `env` and no SEIDRA_* of the caller's own."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("SEIDRA_")}
    return subprocess.run(
        [str(ROOT / "scripts" / script)], capture_output=True, text=True, env={**inherited, "PATH": path, **env}
    )


def fake_docker(folder: Path, log: Path) -> str:
    """A `docker` that answers like one with Compose and a running engine, and records its calls
    with whether Grafana's password reached it."""
    docker = folder / "docker"
    docker.write_text(f'#!/bin/sh\necho "$* password=${{SEIDRA_GRAFANA_ADMIN_PASSWORD:+set}}" >> {log}\n')
    docker.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def test_scripts_say_plainly_when_docker_is_missing(tmp_path: Path) -> None:
    # A PATH with the shell and coreutils the scripts use, and no docker.
    for tool in ("bash", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    for script in ("start-monitoring.sh", "stop-monitoring.sh"):
        done = run(script, str(tmp_path), SEIDRA_GRAFANA_ADMIN_PASSWORD=PASSWORD)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("Docker is not installed")


def test_start_brings_the_stack_up_and_stop_keeps_the_volumes(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    path = fake_docker(tmp_path, log)
    assert run("start-monitoring.sh", path, SEIDRA_GRAFANA_ADMIN_PASSWORD=PASSWORD).returncode == 0
    # Stopping needs no password: Compose still interpolates the file, so the script supplies one.
    assert run("stop-monitoring.sh", path).returncode == 0
    calls = log.read_text().splitlines()
    assert f"compose -f {COMPOSE} up -d password=set" in calls
    assert f"compose -f {COMPOSE} down password=set" in calls
    assert not any(call.split(" password=")[0].endswith(("-v", "--volumes")) for call in calls)


@pytest.mark.parametrize(("password", "refusal"), [(None, "is not set"), ("", "is not set"), ("admin", "must not be 'admin'")])
def test_start_refuses_without_a_grafana_password_of_its_own(tmp_path: Path, password: str | None, refusal: str) -> None:
    log = tmp_path / "calls"
    path = fake_docker(tmp_path, log)
    done = run("start-monitoring.sh", path, **({} if password is None else {"SEIDRA_GRAFANA_ADMIN_PASSWORD": password}))
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("SEIDRA_GRAFANA_ADMIN_PASSWORD") and refusal in line
    assert not log.exists()  # refused before Docker was asked anything


def test_the_interpolation_is_composes() -> None:
    assert interpolate("$${a} ${B:-x} ${B:-x} ${C} ${D:?no D}", {"B": "b", "D": "d"}) == "${a} b b  d"
    assert interpolate("${B:-x}", {"B": ""}) == "x"
    with pytest.raises(MissingVariable, match="no D"):
        interpolate("${D:?no D}", {"D": ""})


def test_grafana_takes_its_password_from_the_environment_and_has_no_default() -> None:
    with pytest.raises(MissingVariable, match="SEIDRA_GRAFANA_ADMIN_PASSWORD"):
        compose_stack({})
    grafana = compose_stack()["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == PASSWORD
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_prometheus_has_no_lifecycle_or_admin_api() -> None:
    command = compose_stack()["services"]["prometheus"]["command"]
    assert not any(flag.startswith(("--web.enable-lifecycle", "--web.enable-admin-api")) for flag in command)


def listen_addresses(stack: dict[str, Any]) -> dict[str, set[str]]:
    """Where each service listens on the host: its published ports' addresses or, on the host
    network, the address its own configuration names."""
    services = stack["services"]
    addresses = {name: {port.rsplit(":", 2)[0] for port in service.get("ports", [])} for name, service in services.items()}
    host_network = {name for name, service in services.items() if service.get("network_mode") == "host"}
    # A service on the host network listens wherever its own settings say: each is read here.
    assert host_network == {"prometheus", "grafana"}
    [prometheus] = [flag for flag in services["prometheus"]["command"] if flag.startswith("--web.listen-address=")]
    addresses["prometheus"] = {prometheus.split("=", 1)[1].rsplit(":", 1)[0]}
    addresses["grafana"] = {services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"]}
    return addresses


def test_every_port_listens_on_loopback_unless_configured_otherwise() -> None:
    assert listen_addresses(compose_stack()) == {
        "prometheus": {"127.0.0.1"}, "grafana": {"127.0.0.1"}, "loki": {"127.0.0.1"}, "tempo": {"127.0.0.1"},
        "promtail": set(),
    }  # fmt: skip
    moved = compose_stack({"SEIDRA_GRAFANA_ADMIN_PASSWORD": PASSWORD, "SEIDRA_MONITORING_BIND": "10.0.0.5"})
    assert listen_addresses(moved) == {
        "prometheus": {"10.0.0.5"}, "grafana": {"10.0.0.5"}, "loki": {"10.0.0.5"}, "tempo": {"10.0.0.5", "127.0.0.1"},
        "promtail": set(),
    }  # fmt: skip
    otlp = compose_stack({"SEIDRA_GRAFANA_ADMIN_PASSWORD": PASSWORD, "SEIDRA_OTLP_BIND": "10.0.0.5"})
    assert set(otlp["services"]["tempo"]["ports"]) == {"127.0.0.1:3200:3200", "10.0.0.5:4317:4317", "10.0.0.5:4318:4318"}


def test_grafana_finds_the_stack_where_it_listens() -> None:
    grafana = compose_stack()["services"]["grafana"]["environment"]
    provisioned = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    urls = {source["name"]: interpolate(source["url"], grafana) for source in provisioned["datasources"]}
    assert urls == {"Prometheus": "http://127.0.0.1:9090", "Loki": "http://127.0.0.1:3100", "Tempo": "http://127.0.0.1:3200"}


def test_the_stack_is_the_runbooks() -> None:
    stack = compose_stack()
    assert set(stack["services"]) == {"prometheus", "grafana", "loki", "promtail", "tempo"}
    assert stack["services"]["grafana"]["environment"]["GF_SERVER_HTTP_PORT"] == "3001"
    assert {"127.0.0.1:3100:3100"} <= set(stack["services"]["loki"]["ports"])
    assert {"127.0.0.1:3200:3200", "127.0.0.1:4317:4317", "127.0.0.1:4318:4318"} <= set(stack["services"]["tempo"]["ports"])
    assert set(stack["volumes"]) == {"prometheus-data", "grafana-data", "loki-data", "tempo-data"}
    for service in stack["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), source
    prometheus = yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus.yml").read_text())
    [ray] = prometheus["scrape_configs"]
    assert ray["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_the_runbooks_dashboard() -> None:
    import json

    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "seidra.json").read_text())
    assert dashboard["title"] == "SEIDRA Ultimate - Observabilité"
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Jobs", "GPU", "Notifications"]
    titles = " | ".join(panel["title"] for panel in dashboard["panels"])
    for needed in ("Jobs actifs", "Durée p95 des jobs", "Température GPU (°C)", "Alertes actives", "Requêtes récentes",
                   "Queue depth", "Held jobs", "Ray Serve request latency", "Ray Serve healthy replicas"):  # fmt: skip
        assert needed in titles
    provisioning = yaml.safe_load((ROOT / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_log_lines_link_to_their_trace_in_grafana() -> None:
    """Loki's derived field finds the trace id in a log line as SEIDRA writes it, and Tempo's
    logs query searches for the same text."""
    import io
    import logging
    import re

    from opentelemetry.sdk.trace import TracerProvider

    from scheduling import tracing

    provisioned = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    sources = {source["name"]: source for source in provisioned["datasources"]}
    [derived] = sources["Loki"]["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == sources["Tempo"]["uid"]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(tracing.LOG_FORMAT))
    handler.addFilter(tracing.TraceIdFilter())
    logger = logging.getLogger("tests.monitoring")
    logger.addHandler(handler)
    try:
        with TracerProvider().get_tracer("test").start_as_current_span("seidra.hold") as span:
            logger.warning("Delaying job j due to GPU unavailability")
    finally:
        logger.removeHandler(handler)
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert re.search(derived["matcherRegex"], stream.getvalue())[1] == trace_id  # type: ignore[index]
    logs_query = sources["Tempo"]["jsonData"]["tracesToLogsV2"]["query"].replace("$${__trace.traceId}", trace_id)
    assert logs_query.split("|=")[1].strip().strip('"') in stream.getvalue()
