"""The Serve config file and how settings reach the application."""

from __future__ import annotations

import os

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.settings import settings_from_args
from serve_app.cluster import SERVE_CONFIG, serve_config


def test_the_config_file_is_a_valid_serve_deploy_config() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    [app] = config.applications
    assert (app.name, app.import_path, app.route_prefix) == ("seidra", "serve_app.app:build_app", "/")
    assert settings_from_args(app.args)["SEIDRA_NUM_GPUS"] == "1"
    assert {d.name for d in app.deployments} == {"SeidraAPI", "DiffusionWorker"}


def test_args_become_seidra_variables_and_unknown_ones_are_refused() -> None:
    assert settings_from_args({"model": "m", "force_mock": True, "num_gpus": 1}) == {
        "SEIDRA_MODEL": "m", "SEIDRA_FORCE_MOCK": "true", "SEIDRA_NUM_GPUS": "1",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown SEIDRA setting.*'modle'"):
        settings_from_args({"modle": "m"})


def test_seidra_up_applies_this_shells_settings_over_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SEIDRA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SEIDRA_MODEL", "/models/tiny")
    monkeypatch.setenv("SEIDRA_HOME", "/srv/seidra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = serve_config("127.0.0.1", 8123, cluster_gpus=0)
    [app] = config["applications"]
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert (app["args"]["model"], app["args"]["home"], app["args"]["num_gpus"]) == ("/models/tiny", "/srv/seidra", "0")
    assert app["args"]["max_workers"] == "0"  # no GPUs: one CPU worker
    assert app["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    ServeDeploySchema.model_validate(config)

    monkeypatch.setenv("SEIDRA_NUM_GPUS", "2")
    assert serve_config("127.0.0.1", 8123, cluster_gpus=0)["applications"][0]["args"]["num_gpus"] == "2"
    on_gpus = serve_config("127.0.0.1", 8123, cluster_gpus=8)["applications"][0]["args"]
    assert (on_gpus["num_gpus"], on_gpus["max_workers"]) == ("2", 4)  # the file's autoscaling
