"""The Prometheus config and alert rules, checked and unit-tested by promtool (Debian's `prometheus`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS_DIR = Path(__file__).parents[2] / "grafana" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (scripts/install-test-services.sh installs it)")
        pytest.skip("promtool is not installed")
    return found


@pytest.mark.parametrize(
    "arguments",
    [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")],
)
def test_promtool(promtool: str, arguments: tuple[str, ...]) -> None:
    done = subprocess.run([promtool, *arguments], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_runbook_alert_is_defined_and_tested() -> None:
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    defined = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert defined == {"BackendDown", "HighCPUUsage", "GPUTemperatureHigh", "JobLatencyP95High", "StorageErrors", "JobsHeldTooLong"}
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == defined


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_to_a_section_of_the_incident_runbook() -> None:
    import yaml

    runbook = PROMETHEUS_DIR.parents[1] / "docs" / "runbook.md"
    anchors = {github_anchor(line.lstrip("#")) for line in runbook.read_text().splitlines() if line.startswith("## ")}
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for rule in (rule for group in rules["groups"] for rule in group["rules"]):
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, (rule["alert"], rule["annotations"]["runbook"])
