"""`seidra keys ...` against the database directly (SQLite and PostgreSQL), and the CLI's API key:
from SEIDRA_API_KEY or SEIDRA_API_KEY_FILE to `Authorization: Bearer`, and what a refused key says."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from serve_app import cli
from serve_app.cli import KEY_FIELDS, main
from serve_app.client import ApiError, SeidraClient
from serve_app.cluster import forwarded_env
from storage.api_keys import ApiKeyStore, KeyLimits, Principal
from storage.settings import StorageSettings
from tests.integration.test_storage import database_url  # noqa: F401  (a fixture: SQLite and PostgreSQL)
from tests.seidra_command import NOT_INHERITED, SEIDRA

KEY = "seidra_0123456789ab_" + "k" * 43


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEIDRA_HOME", str(tmp_path / "home"))
    for name in ("SEIDRA_DATABASE_URL", "SEIDRA_API_URL", "SEIDRA_API_KEY", "SEIDRA_API_KEY_FILE", "SEIDRA_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def keys_json(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    assert main(["keys", "list", "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


# ----- seidra keys -----


def test_keys_create_list_and_revoke(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    monkeypatch.setenv("SEIDRA_DATABASE_URL", database_url)
    store = ApiKeyStore(database_url)
    assert main(["keys", "create", "--user", "alice"]) == 0  # on an empty database: the schema comes first
    out, err = capsys.readouterr()
    alice_key = out.strip()
    assert out == alice_key + "\n"
    alice = store.authenticate(alice_key)
    assert alice == Principal("alice", False, alice_key.split("_")[1], KeyLimits())
    assert err == f"API key {alice.key_id} (user alice, does not expire). It is not shown again: keep it now.\n"

    argv = ["--admin", "--expires", "30", "--max-waiting-realtime", "5", "--submissions-per-minute", "10"]
    assert main(["keys", "create", "--user", "ops@example.org", *argv]) == 0
    ops_key = capsys.readouterr().out.strip()
    ops = store.authenticate(ops_key)
    assert ops == Principal("ops@example.org", True, ops_key.split("_")[1], KeyLimits(5, None, 10))

    listed = keys_json(capsys)
    assert [tuple(key) for key in listed] == [KEY_FIELDS] * 2
    assert [(key["key_id"], key["user"], key["admin"], key["revoked_at"]) for key in listed] == [
        (alice.key_id, "alice", False, None), (ops.key_id, "ops@example.org", True, None)
    ]  # fmt: skip
    assert (listed[1]["max_waiting_realtime"], listed[1]["max_waiting_batch"], listed[1]["submissions_per_minute"]) == (
        5,
        None,
        10,
    )
    assert listed[0]["expires_at"] is None and str(listed[1]["expires_at"]).endswith("+00:00")

    assert main(["keys", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["key", "id", "user", "admin", "created", "expires", "revoked", "webhook", "overrides"]
    assert table[1].split()[:3] == [alice.key_id, "alice", "no"] and table[1].endswith("-")
    assert table[2].split()[:3] == [ops.key_id, "ops@example.org", "yes"] and table[2].endswith("realtime=5 per-minute=10")

    assert main(["keys", "revoke", alice.key_id]) == 0
    assert capsys.readouterr().out.startswith(f"API key {alice.key_id} (alice) is revoked since ")
    assert store.authenticate(alice_key) is None
    assert store.authenticate(ops_key) == ops
    assert [key["revoked_at"] is not None for key in keys_json(capsys)] == [True, False]


def test_keys_webhook_default_and_secret(
    database_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SEIDRA_DATABASE_URL", database_url)
    store = ApiKeyStore(database_url)
    assert main(["keys", "create", "--user", "alice", "--webhook-url", "https://hooks.example/a"]) == 0
    out, err = capsys.readouterr()
    key_id = out.strip().split("_")[1]
    assert f"seidra keys webhook-secret {key_id}" in err  # how to get the secret that verifies deliveries
    made = store.webhook(key_id)
    assert made is not None and made.url == "https://hooks.example/a"
    [listed] = keys_json(capsys)
    assert listed["webhook_url"] == "https://hooks.example/a"

    assert main(["keys", "webhook-secret", key_id]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("whsec_") and secret != made.secret
    assert store.webhook(key_id).secret == secret  # type: ignore[union-attr]
    assert secret not in err and "It is not shown again" in err
    for argv in (["keys", "list"], ["keys", "list", "--json"]):
        assert main(argv) == 0
        assert secret not in capsys.readouterr().out

    assert main(["keys", "set-webhook", key_id, "http://hooks.example/b"]) == 0
    assert capsys.readouterr().out.endswith("are delivered to http://hooks.example/b\n")
    assert main(["keys", "set-webhook", key_id, "--clear"]) == 0
    assert "has no default webhook" in capsys.readouterr().out
    assert store.webhook(key_id).url is None  # type: ignore[union-attr]

    with pytest.raises(SystemExit) as exited:
        main(["keys", "set-webhook", key_id, "https://user:pass@hooks.example/"])
    assert exited.value.code == 2 and "must not carry credentials" in capsys.readouterr().err
    for argv in (["keys", "webhook-secret", "feedfeedfeed"], ["keys", "set-webhook", "feedfeedfeed", "--clear"]):
        assert main(argv) == 1
        assert one_error_line(capsys) == "seidra: error: API key 'feedfeedfeed' does not exist"


def test_neither_keys_nor_hashes_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--user", "alice"]) == 0
    key = capsys.readouterr().out.strip()
    [stored] = ApiKeyStore(StorageSettings().database_url).list()
    for argv in (["keys", "list"], ["keys", "list", "--json"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert stored.key_id in out
        assert key not in out and key.split("_", 2)[2] not in out and stored.secret_hash not in out


def test_revoking_an_unknown_key_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "revoke", "feedfeedfeed"]) == 1
    assert one_error_line(capsys) == "seidra: error: API key 'feedfeedfeed' does not exist"


def test_a_bad_user_name_is_one_line_and_stores_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--user", "alice smith"]) == 1
    assert one_error_line(capsys).startswith("seidra: error: user 'alice smith' is not a user name")
    assert keys_json(capsys) == []


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--expires", "0"], "--expires"),
        (["--expires", "-1"], "--expires"),
        (["--expires", "nan"], "--expires"),
        (["--expires", "soon"], "--expires"),
        (["--max-waiting-realtime", "0"], "--max-waiting-realtime"),
        (["--max-waiting-batch", "1.5"], "--max-waiting-batch"),
        (["--submissions-per-minute", "-2"], "--submissions-per-minute"),
    ],
)
def test_bad_options_are_refused_before_anything_is_stored(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--user", "alice", *argv])
    assert exited.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err
    assert keys_json(capsys) == []


def test_the_first_admin_key_before_the_service_is_up(tmp_path: Path, isolated_home: Path) -> None:
    """The installed command on a fresh SEIDRA_HOME: its SQLite database is made; the key alone goes to stdout."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(NOT_INHERITED)}
    env["SEIDRA_HOME"] = str(isolated_home)
    key_file = tmp_path / "admin.key"
    with key_file.open("w") as out:
        done = subprocess.run(
            [str(SEIDRA), "keys", "create", "--user", "root", "--admin"],
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert "It is not shown again" in done.stderr
    key = key_file.read_text().strip()
    principal = ApiKeyStore(f"sqlite:///{isolated_home / 'seidra.db'}").authenticate(key)
    assert principal is not None and (principal.user, principal.admin) == ("root", True)
    listed = subprocess.run([str(SEIDRA), "keys", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and principal.key_id in listed.stdout


# ----- the CLI's key, on the wire -----


def fake_api(monkeypatch: pytest.MonkeyPatch, answer: Callable[[httpx.Request], httpx.Response]) -> list[httpx.Request]:
    """Send the CLI's requests to `answer`; returns the requests it got."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answer(request)

    monkeypatch.setattr(cli, "SeidraClient", functools.partial(SeidraClient, transport=httpx.MockTransport(handler)))
    return requests


def empty_list(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=[])


def test_the_key_from_seidra_api_key_is_sent_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    requests = fake_api(monkeypatch, empty_list)
    monkeypatch.setenv("SEIDRA_API_KEY", KEY)
    assert main(["jobs", "--url", "http://seidra.test"]) == 0
    assert [request.headers["Authorization"] for request in requests] == [f"Bearer {KEY}"]


def test_the_key_from_seidra_api_key_file_is_stripped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = fake_api(monkeypatch, empty_list)
    (tmp_path / "key").write_text(f"  {KEY}\n\n")
    monkeypatch.setenv("SEIDRA_API_KEY_FILE", str(tmp_path / "key"))
    assert main(["notifications", "--url", "http://seidra.test"]) == 0
    assert [request.headers["Authorization"] for request in requests] == [f"Bearer {KEY}"]


def test_without_a_key_no_authorization_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    requests = fake_api(monkeypatch, empty_list)
    assert main(["jobs", "--url", "http://seidra.test"]) == 0
    assert ["authorization" in request.headers for request in requests] == [False]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SEIDRA_API_KEY_FILE": "{tmp}/missing"}, "SEIDRA_API_KEY_FILE: cannot read {tmp}/missing: No such file or directory"),
        ({"SEIDRA_API_KEY_FILE": "{tmp}"}, "SEIDRA_API_KEY_FILE: cannot read {tmp}: Is a directory"),
        ({"SEIDRA_API_KEY_FILE": "{tmp}/empty"}, "SEIDRA_API_KEY_FILE: {tmp}/empty is empty"),
        ({"SEIDRA_API_KEY_FILE": "{tmp}/binary"}, "SEIDRA_API_KEY_FILE: {tmp}/binary is not a text file"),
        ({"SEIDRA_API_KEY_FILE": "{tmp}/empty", "SEIDRA_API_KEY": KEY}, "SEIDRA_API_KEY and SEIDRA_API_KEY_FILE are both set"),
    ],
)  # fmt: skip
def test_a_key_that_cannot_be_had_is_one_line_and_nothing_is_sent(
    env: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = fake_api(monkeypatch, empty_list)
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert main(["jobs", "--url", "http://seidra.test"]) == 1
    assert one_error_line(capsys).startswith("seidra: error: " + message.format(tmp=tmp_path))
    assert requests == []


@pytest.mark.parametrize(
    ("status", "detail", "hint"),
    [
        (401, "missing or invalid API key", "set SEIDRA_API_KEY (or SEIDRA_API_KEY_FILE) to a valid API key"),
        (403, "this route needs an admin key", "this needs an admin API key: set SEIDRA_API_KEY"),
    ],
)
def test_a_refused_key_says_to_set_seidra_api_key(
    status: int, detail: str, hint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_api(
        monkeypatch, lambda _request: httpx.Response(status, headers={"WWW-Authenticate": "Bearer"}, json={"detail": detail})
    )
    monkeypatch.setenv("SEIDRA_API_KEY", KEY)
    assert main(["lane", "pause", "batch", "--url", "http://seidra.test"]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"seidra: error: POST /admin/lanes/batch failed with HTTP {status}: {detail}; {hint}")
    assert KEY not in line


def test_the_client_sends_its_key_on_every_request_and_keeps_it_out_of_errors() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(401 if request.method == "POST" else 200, json={"detail": "no"})

    api = SeidraClient("http://seidra.test", transport=httpx.MockTransport(handler), api_key=KEY)
    api.get("/status")
    with pytest.raises(ApiError) as refused:
        api.post("/generation/single", json={})
    assert seen == [f"Bearer {KEY}"] * 2
    assert refused.value.status_code == 401 and KEY not in str(refused.value)


def test_the_clis_key_variables_stay_in_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEIDRA_API_KEY", KEY)
    monkeypatch.setenv("SEIDRA_API_KEY_FILE", "/run/secrets/seidra")
    assert not {"SEIDRA_API_KEY", "SEIDRA_API_KEY_FILE"} & set(forwarded_env())
