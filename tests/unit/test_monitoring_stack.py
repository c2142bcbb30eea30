"""The monitoring stack's Compose file and its start/stop scripts (no Docker engine runs here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "grafana" / "docker-compose.yml"


def run(script: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / script)], capture_output=True, text=True, env={**os.environ, "PATH": path})


def fake_docker(folder: Path, log: Path) -> str:
    """A `docker` that answers like one with Compose and a running engine, and records its calls."""
    docker = folder / "docker"
    docker.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    docker.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def test_scripts_say_plainly_when_docker_is_missing(tmp_path: Path) -> None:
    # A PATH with the shell and coreutils the scripts use, and no docker.
    for tool in ("bash", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    for script in ("start-monitoring.sh", "stop-monitoring.sh"):
        done = run(script, str(tmp_path))
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("Docker is not installed")


def test_start_brings_the_stack_up_and_stop_keeps_the_volumes(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    path = fake_docker(tmp_path, log)
    assert run("start-monitoring.sh", path).returncode == 0
    assert run("stop-monitoring.sh", path).returncode == 0
    calls = log.read_text().splitlines()
    assert f"compose -f {COMPOSE} up -d" in calls
    assert f"compose -f {COMPOSE} down" in calls
    assert not any(call.endswith(("-v", "--volumes")) for call in calls)


def test_the_stack_is_the_runbooks() -> None:
    stack = yaml.safe_load(COMPOSE.read_text())
    assert set(stack["services"]) == {"prometheus", "grafana", "loki", "promtail", "tempo"}
    assert stack["services"]["grafana"]["environment"]["GF_SERVER_HTTP_PORT"] == "3001"
    assert {"3100:3100"} <= set(stack["services"]["loki"]["ports"])
    assert {"3200:3200", "4317:4317", "4318:4318"} <= set(stack["services"]["tempo"]["ports"])
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
