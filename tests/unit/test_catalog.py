"""The served catalog: SEIDRA_MODELS as the application's args carry it (JSON text), and what a
submission may name: unknown models and adapters are refused at their place in the body."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError

from deployments.settings import ModelSpec, WorkerSettings
from serve_app.catalog import Catalog


def test_models_come_as_json_text_the_first_the_default() -> None:
    settings = WorkerSettings(models='{"turbo": "stabilityai/sd-turbo", "xl": {"path": "/models/xl", "dtype": "float16"}}')
    assert settings.catalog() == {
        "turbo": ModelSpec(path="stabilityai/sd-turbo"),
        "xl": ModelSpec(path="/models/xl", dtype="float16"),
    }
    assert settings.default_model() == "turbo"
    assert WorkerSettings(model="stabilityai/sd-turbo", models="").catalog() == {
        "sd-turbo": ModelSpec(path="stabilityai/sd-turbo")
    }


def test_models_given_as_args_replace_the_variables_models_not_join_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEIDRA_MODELS", '{"from-env": "/env"}')
    assert list(WorkerSettings(models={"from-args": "/args"}).catalog()) == ["from-args"]
    assert list(WorkerSettings().catalog()) == ["from-env"]


def test_a_submission_gets_the_default_model_and_unknown_names_are_refused_where_they_are(tmp_path: Path) -> None:
    (tmp_path / "ink").mkdir()
    catalog = Catalog(WorkerSettings(models={"turbo": "a", "xl": "b"}, lora_dir=str(tmp_path)))
    jobs = [{"model": ""}, {"model": "xl", "loras": [{"name": "ink", "scale": 0.5}]}]
    assert [job["model"] for job in catalog.resolve(jobs, [("body", "items", 0), ("body", "items", 1)])] == ["turbo", "xl"]
    with pytest.raises(RequestValidationError) as refused:
        catalog.resolve(
            [{"model": "sdxl"}, {"model": "", "loras": [{"name": "ink"}, {"name": "oil"}]}],
            [("body", "items", 0), ("body", "items", 1)],
        )
    assert [(error["loc"], error["msg"]) for error in refused.value.errors()] == [
        (("body", "items", 0, "model"), "unknown model 'sdxl'; served: turbo, xl"),
        (("body", "items", 1, "loras", 1, "name"), "unknown LoRA adapter 'oil'"),
    ]
