"""The Serve config file and how settings reach the application: secrets never travel, and no API
without keys listens beyond loopback."""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import yaml
from ray import cloudpickle
from ray.serve.schema import ServeDeploySchema

from scheduling import tracing
from serve_app import cluster
from serve_app.cluster import (
    SERVE_CONFIG,
    ClusterError,
    UpState,
    auth_off_refusal,
    check_auth_binding,
    check_settings,
    deploy_serve_config,
    forwarded_env,
    is_loopback,
    serve_config,
)
from serve_app.settings import settings_from_args
from storage.settings import SecretSettingError, StorageSettings


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


# ----- secrets never travel -----

SECRETS = {
    "SEIDRA_DATABASE_URL": "postgresql+psycopg://seidra:db-sentinel@db.internal:5432/seidra",
    "SEIDRA_S3_ACCESS_KEY": "access-sentinel",
    "SEIDRA_S3_SECRET_KEY": "secret-sentinel",
    "SEIDRA_API_KEY": "seidra_0123456789ab_key-sentinel",
    "HF_TOKEN": "hf-sentinel",
    "HUGGING_FACE_HUB_TOKEN": "hub-sentinel",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=otlp-sentinel",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=traces-sentinel",
}


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A shell with a model, a home of its own and nothing else of SEIDRA's, HF's or OTEL's."""
    for key in [k for k in os.environ if k.startswith(("SEIDRA_", "HF_", "HUGGING_FACE_", "OTEL_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SEIDRA_MODEL", "/models/tiny")
    monkeypatch.setenv("SEIDRA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # `seidra up` would otherwise make a Ray token
    return monkeypatch


def test_seidra_up_forwards_no_secret_and_no_secret_file(shell: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in SECRETS.items():
        shell.setenv(name, value)
    shell.setenv("SEIDRA_S3_ENDPOINT", "s3.internal:9000")
    shell.setenv("HF_HUB_OFFLINE", "1")
    shell.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4318")
    config = yaml.safe_dump(serve_config("127.0.0.1", 8123, cluster_gpus=0))
    assert [value for value in SECRETS.values() if value in config] == []
    assert "s3.internal:9000" in config and "http://tempo:4318" in config and "HF_HUB_OFFLINE" in config
    assert [value for value in SECRETS.values() if value in str(tracing.environment())] == []

    # The _FILE variants are paths on this machine: not settings to forward, nor unknown ones to refuse.
    shell.delenv("SEIDRA_S3_SECRET_KEY")
    shell.setenv("SEIDRA_S3_SECRET_KEY_FILE", str(tmp_path / "s3-secret"))
    shell.setenv("SEIDRA_API_KEY_FILE", str(tmp_path / "api-key"))
    shell.delenv("SEIDRA_API_KEY")
    assert not [name for name in forwarded_env() if name.endswith("_FILE")]
    check_settings(forwarded_env())


def test_seidra_up_writes_its_files_for_its_owner_alone(shell: pytest.MonkeyPatch, tmp_path: Path) -> None:
    derived = tmp_path / "home" / "run" / "serve_config.yaml"
    derived.parent.mkdir(parents=True)
    derived.write_text("left by an older release\n")
    derived.chmod(0o644)
    # `serve deploy` fails at once; the config was written before it ran.
    shell.setattr(cluster, "_executable", lambda name: "/bin/false")
    with pytest.raises(ClusterError, match="serve deploy"):
        deploy_serve_config("http://127.0.0.1:1", "127.0.0.1", 8123, cluster_gpus=0, timeout_s=1)
    assert stat.S_IMODE(derived.stat().st_mode) == 0o600
    assert yaml.safe_load(derived.read_text())["http_options"]["port"] == 8123

    UpState("http://127.0.0.1:8123", "127.0.0.1:6379", None, None).save()
    assert stat.S_IMODE(UpState.path().stat().st_mode) == 0o600
    assert list(UpState.path().parent.glob("*.partial")) == []


def test_storage_settings_pickle_without_secrets_and_read_the_receivers_own(shell: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text("secret-from-file\n")
    shell.setenv("SEIDRA_DATABASE_URL", SECRETS["SEIDRA_DATABASE_URL"])
    shell.setenv("SEIDRA_S3_ENDPOINT", "s3.internal:9000")
    shell.setenv("SEIDRA_S3_ACCESS_KEY", "access-sentinel")
    shell.setenv("SEIDRA_S3_SECRET_KEY_FILE", str(secret_file))
    sent = StorageSettings()
    assert (sent.database_url, sent.s3_secret_key) == (SECRETS["SEIDRA_DATABASE_URL"], "secret-from-file")
    shipped = cloudpickle.dumps(sent)  # what Ray stores for `.bind()` and actor arguments
    for shown in (shipped, repr(sent).encode(), str(sent.model_dump()).encode()):
        assert not [secret for secret in (b"db-sentinel", b"access-sentinel", b"secret-from-file") if secret in shown]

    # The receiving process reads its own environment.
    shell.setenv("SEIDRA_DATABASE_URL", "postgresql+psycopg://seidra:other@db.internal:5432/seidra")
    received = pickle.loads(shipped)
    assert received.database_url.endswith(":other@db.internal:5432/seidra")
    assert (received.s3_endpoint, received.s3_access_key, received.s3_secret_key) == (
        "s3.internal:9000", "access-sentinel", "secret-from-file",
    )  # fmt: skip
    # Another database, or none (a SQLite file of its own): refused, not used.
    shell.setenv("SEIDRA_DATABASE_URL", "postgresql+psycopg://seidra:other@elsewhere:5432/seidra")
    with pytest.raises(SecretSettingError, match="set SEIDRA_DATABASE_URL .* alike in every node's environment"):
        pickle.loads(shipped)
    shell.delenv("SEIDRA_DATABASE_URL")
    with pytest.raises(SecretSettingError, match="this process's database is sqlite:///"):
        pickle.loads(shipped)
    shell.setenv("SEIDRA_DATABASE_URL", SECRETS["SEIDRA_DATABASE_URL"])
    shell.delenv("SEIDRA_S3_SECRET_KEY_FILE")
    with pytest.raises(ValueError, match="SEIDRA_S3_SECRET_KEY"):
        pickle.loads(shipped)


def test_a_secret_set_twice_or_unreadable_is_one_clear_line(shell: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shell.setenv("SEIDRA_DATABASE_URL", "sqlite:///one.db")
    shell.setenv("SEIDRA_DATABASE_URL_FILE", str(tmp_path / "url"))
    with pytest.raises(SecretSettingError, match="^both SEIDRA_DATABASE_URL and SEIDRA_DATABASE_URL_FILE are set"):
        StorageSettings()
    shell.delenv("SEIDRA_DATABASE_URL")
    with pytest.raises(SecretSettingError, match=r"^SEIDRA_DATABASE_URL_FILE: cannot read .*/url: No such file"):
        StorageSettings()


def test_secrets_as_application_args_are_refused_naming_the_variable(shell: pytest.MonkeyPatch) -> None:
    from serve_app.app import build_app

    for name in ("database_url", "s3_access_key", "s3_secret_key"):
        with pytest.raises(ValueError, match=rf"^{name} is a secret .* set SEIDRA_{name.upper()} or SEIDRA_{name.upper()}_FILE"):
            build_app({name: "x"})


# ----- auth off only on loopback -----


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), (None, True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("head.internal", False)],
)  # fmt: skip
def test_loopback_hosts(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_shipped_config_asks_for_keys() -> None:
    [app] = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    assert app["args"]["auth"] == "keys"


def test_seidra_up_without_keys_beyond_loopback_is_refused_before_anything_starts(
    shell: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_app.cli import main

    shell.setenv("SEIDRA_AUTH", "off")
    assert main(["up", "--http-host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"seidra: error: {auth_off_refusal('0.0.0.0')}"
    assert UpState.load() is None
    check_auth_binding("127.0.0.1")  # loopback: allowed
    shell.setenv("SEIDRA_AUTH", "keys")
    check_auth_binding("0.0.0.0")


def test_the_builder_refuses_auth_off_when_serves_proxy_listens_beyond_loopback(shell: pytest.MonkeyPatch) -> None:
    from ray.serve.config import HTTPOptions

    from serve_app.app import build_app

    shell.setattr(cluster, "serve_http_options", lambda: HTTPOptions(host="0.0.0.0", port=8000))
    with pytest.raises(ValueError, match=f"^{re.escape(auth_off_refusal('0.0.0.0'))}$"):
        build_app({"auth": "off"})
    shell.setattr(cluster, "serve_http_options", lambda: None)  # no Serve instance to ask
    with pytest.raises(ValueError, match="no running Serve instance says where it listens"):
        build_app({"auth": "off"})
    shell.setattr(cluster, "serve_http_options", lambda: HTTPOptions(host="127.0.0.1", port=8000))
    assert build_app({"auth": "off"}) is not None
