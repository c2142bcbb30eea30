"""CLI mistakes end in one line and a non-zero exit code, without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.cli import format_jobs_table, main


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEIDRA_HOME", str(tmp_path))
    monkeypatch.delenv("SEIDRA_API_URL", raising=False)
    monkeypatch.delenv("SEIDRA_DEBUG", raising=False)
    return tmp_path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_down_without_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["down"]) == 1
    assert "nothing to stop" in one_error_line(capsys)


def test_up_without_a_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SEIDRA_MODEL", raising=False)
    assert main(["up"]) == 1
    assert "SEIDRA_MODEL is not set" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [["jobs"], ["status"], ["submit", "a cat"]])
def test_unreachable_api(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) has no HTTP server behind it on a test machine.
    assert main([*argv, "--url", "http://127.0.0.1:9"]) == 1
    assert "not reachable at http://127.0.0.1:9" in one_error_line(capsys)


def test_bad_arguments_exit_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["up", "--http-port", "70000"])
    assert exited.value.code == 2
    assert "70000 is not a TCP port" in capsys.readouterr().err


def test_jobs_table_shows_lane_priority_status_seconds_and_image() -> None:
    table = format_jobs_table(
        [
            {
                "id": "j1", "lane": "realtime", "priority": 2, "status": "completed",
                "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01.5+00:00",
                "image_url": "/jobs/j1/image",
            },
            {"id": "j2", "lane": "batch", "priority": 8, "status": "pending", "started_at": None, "finished_at": None},
        ]
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[0].split() == ["id", "lane", "priority", "status", "seconds", "image"]
    assert lines[1].split() == ["j1", "realtime", "2", "completed", "1.50", "/jobs/j1/image"]
    assert lines[2].split() == ["j2", "batch", "8", "pending", "-", "-"]
