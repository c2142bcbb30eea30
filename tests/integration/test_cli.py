"""The `seidra` CLI against the running application."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.cli import main
from tests.ray_app import RunningApp


@pytest.fixture
def as_admin(app: RunningApp, monkeypatch: pytest.MonkeyPatch) -> RunningApp:
    monkeypatch.setenv("SEIDRA_API_KEY", app.admin_key)
    return app


def test_submit_wait_then_list_and_status(as_admin: RunningApp, capsys: pytest.CaptureFixture[str]) -> None:
    app = as_admin
    small = ["--width", "64", "--height", "64", "--steps", "4"]
    assert main(["submit", "a paper boat", "--url", app.url, "--wait", "--json", *small]) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["status"], job["lane"], job["priority"]) == ("completed", "realtime", 2)

    assert main(["submit", "a paper crane", "--url", app.url, "--batch", "--priority", "low", "--wait", *small]) == 0
    line = capsys.readouterr().out.split()
    assert line[1:4] == ["completed", "batch", "p8"]

    assert main(["jobs", "--url", app.url, "--status", "completed", "--limit", "500"]) == 0
    table = capsys.readouterr().out
    assert job["id"] in table and line[0] in table

    assert main(["status", "--url", app.url]) == 0
    assert "worker" in capsys.readouterr().out


def test_submit_refused_by_the_api_is_one_line(as_admin: RunningApp, capsys: pytest.CaptureFixture[str]) -> None:
    app = as_admin
    assert main(["submit", "x", "--url", app.url, "--width", "100"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "HTTP 422" in err and "width" in err


def test_db_upgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from alembic.script import ScriptDirectory

    from storage.database import alembic_config

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("SEIDRA_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 0
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert capsys.readouterr().out == f"Database schema at revision {head}\n"
