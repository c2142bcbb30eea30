"""The README documents every setting and opens with the two commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from deployments.settings import WorkerSettings
from scheduling.settings import RouterSettings
from serve_app.settings import ApiSettings
from storage.settings import StorageSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("settings", [StorageSettings, WorkerSettings, RouterSettings, ApiSettings])
def test_every_setting_is_documented(settings: type[BaseSettings]) -> None:
    prefix = settings.model_config["env_prefix"]
    missing = [f"{prefix}{name.upper()}" for name in settings.model_fields if f"`{prefix}{name.upper()}`" not in README]
    assert missing == []


def test_readme_opens_with_the_two_commands() -> None:
    opening = README.splitlines()[:6]
    assert any(line.startswith("make demo") for line in opening)
    assert any(line.startswith("make test") for line in opening)
