"""Fixtures shared by every tier: real PostgreSQL and S3 servers, and the tiny offline model.

Without PostgreSQL or S3 binaries the tests that need them skip on a laptop, but fail under CI
(`CI` set): CI must run them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import pytest

from tests.ray_app import app, free_port, otlp_collector  # noqa: F401  (the session's Ray cluster, for the tests that ask)
from tests.seidra_command import NOT_INHERITED, Seidra
from tests.servers import PostgresServer, S3Server, ServiceUnavailable, postgres_server, s3_server

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T = TypeVar("T")


def _service(start: Callable[[], AbstractContextManager[T]], what: str) -> Iterator[T]:
    try:
        manager = start()
        value = manager.__enter__()
    except ServiceUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required under CI: {error}")
        pytest.skip(f"{what} unavailable: {error}")
    try:
        yield value
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from _service(postgres_server, "PostgreSQL")


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer) -> str:
    return postgres.url


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    yield from _service(s3_server, "an S3 server")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deployments.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def without_session_models() -> Iterator[None]:
    """For a module whose tests name their models themselves: the session cluster's SEIDRA_MODELS
    stays in this process's environment, where it would serve its models to settings made here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SEIDRA_MODELS", raising=False)
        yield


@pytest.fixture
def seidra(tmp_path: Path, tiny_model: Path) -> Iterator[Seidra]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(NOT_INHERITED)}
    env.update(
        SEIDRA_HOME=str(tmp_path / "home"),
        SEIDRA_MODEL=str(tiny_model),
        SEIDRA_TORCH_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",  # the SIGKILL test follows `seidra up`'s progress line by line
    )
    gcs_port = free_port()
    up_args = ["--gcs-port", str(gcs_port), "--dashboard-port", str(free_port()), "--http-port", str(free_port())]
    cli = Seidra(tmp_path / "home", env, gcs_port, [*up_args, "--num-cpus", "2"])
    try:
        yield cli
    finally:
        if cli.state() is not None:
            cli.run("down", timeout_s=120)
        for pid in cli.leftovers():  # only after a failed test: its workers exit with their raylet
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
