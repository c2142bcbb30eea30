"""A real Prometheus scrapes the running app through Ray's service-discovery file; every PromQL
expression of the dashboard and the alert rules runs, and the job and queue panels have data."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ray_app import RunningApp

GRAFANA = Path(__file__).parents[2] / "grafana"
# Every panel must show data after some traffic, but the active alerts (none should fire here).
NO_DATA_EXPECTED = ("Alertes actives",)


def dashboard_exprs() -> dict[str, str]:
    dashboard = json.loads((GRAFANA / "dashboards" / "seidra.json").read_text())
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    }


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((GRAFANA / "prometheus" / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def grafana_alert_exprs() -> dict[str, str]:
    """The PromQL queries of the Grafana-managed alert rules (their refId A), which mirror alert_exprs()."""
    rules = yaml.safe_load((GRAFANA / "provisioning" / "alerting" / "alerts.yml").read_text())
    return {f"Grafana {rule['title']}": query["model"]["expr"] for group in rules["groups"] for rule in group["rules"]
            for query in rule["data"] if query["refId"] == "A"}  # fmt: skip


@pytest.fixture
def prometheus(app: RunningApp, tmp_path: Path) -> Iterator[str]:
    import os

    import ray

    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is required under CI (scripts/install-test-services.sh)")
        pytest.skip("prometheus is not installed")
    discovery = Path(ray._private.worker._global_node.get_temp_dir_path()) / "prom_metrics_service_discovery.json"
    shutil.copy(GRAFANA / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = yaml.safe_load((GRAFANA / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "2s", "evaluation_interval": "2s"}
    config["scrape_configs"][0]["file_sd_configs"][0] = {"files": [str(discovery)], "refresh_interval": "2s"}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def query(url: str, expr: str) -> list[Any]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_dashboard_and_alerts_against_a_real_prometheus(app: RunningApp, prometheus: str) -> None:
    # A hot GPU first, so that delays and notifications happen too; then a reading below every
    # threshold, so that this GPU-less machine still exports GPU gauges.
    app.inject(temperature_c=95)
    try:
        held = app.submit(prompt="held while the GPU is hot")["id"]
        app.eventually(lambda: app.job(held)["metadata"].get("degraded"), "a delay")
        app.inject(temperature_c=50)
        app.wait_for([held])
        # A failed job, for the failures series. Faults are cleared between two injections: `inject`
        # waits for `faults_injected`, which would not change from one set of faults to another.
        app.clear_faults()
        app.inject(temperature_c=50, fail_inference=True)
        failed = app.submit(prompt="fails every attempt")["id"]
        app.wait_for([failed], statuses=("failed",))
        app.clear_faults()
        app.inject(temperature_c=50)
        for index in range(3):
            response = app.http.post("/generation/single?wait=true", json={"prompt": f"scraped {index}"})
            assert response.status_code == 200
        exprs = dashboard_exprs()
        deadline = time.monotonic() + 120
        while True:
            empty = [t for t, expr in exprs.items() if not t.startswith(NO_DATA_EXPECTED) and not query(prometheus, expr)]
            if not empty:
                break
            assert time.monotonic() < deadline, f"panels without data: {empty}"
            time.sleep(2)
    finally:
        app.clear_faults()
    for title, expr in {**exprs, **alert_exprs(), **grafana_alert_exprs()}.items():
        query(prometheus, expr)  # every expression is valid PromQL on real data
    exported = {metric for metric in httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"]}
    for title, expr in exprs.items():
        for name in {word for word in expr.replace("(", " ").replace(")", " ").replace("{", " ").split() if word.startswith("ray_")}:
            base = name.split("[")[0]
            assert base in exported, f"panel {title!r} queries {base}, which nobody exports"
