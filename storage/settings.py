"""Storage settings, read from `SEIDRA_*` environment variables.

Some values are secrets (`SECRET_VARIABLES`: the database URL, which may hold a password, and the S3
keys among them). A process reads them from its own environment, as `SEIDRA_X` or from the file
`SEIDRA_X_FILE` names (the Docker/Kubernetes secret-file convention), and they never travel:
`StorageSettings` pickles without them (Ray stores `.bind()` and actor arguments where any client of
the cluster can read them) and reads them again, from its own environment, in the process that
unpickles it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy.engine.url as sa_url
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HOME_FIELD = Field("~/.seidra", description="Folder for the embedded database, media and run state.")
FILE_SUFFIX = "_FILE"
# Secrets of SEIDRA's own settings, and of the libraries its processes use (huggingface_hub reads
# the HF token, the OTLP exporters their headers). None is ever written by SEIDRA or forwarded.
STORAGE_SECRET_FIELDS = ("database_url", "s3_access_key", "s3_secret_key")
SECRET_VARIABLES = (
    *(f"SEIDRA_{name.upper()}" for name in STORAGE_SECRET_FIELDS),
    "SEIDRA_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
)


class SecretSettingError(Exception):
    """A secret set twice, or its file unreadable. Not a ValueError: pydantic passes it through
    unwrapped, so the operator reads one line."""


def is_secret_variable(name: str) -> bool:
    """A variable whose value is a secret, or names the file holding one: it is never forwarded."""
    base = name.removesuffix(FILE_SUFFIX)
    # Every signal's OTLP headers (traces, metrics, logs) carry the same kind of credential.
    return base in SECRET_VARIABLES or (base.startswith("OTEL_EXPORTER_OTLP_") and base.endswith("HEADERS"))


def environment_secret(variable: str) -> str | None:
    """`variable` from this process's environment, or the content of the file `<variable>_FILE`
    names (its trailing newline stripped); None when neither is set."""
    value, path = os.environ.get(variable), os.environ.get(variable + FILE_SUFFIX)
    if value is not None and path is not None:
        raise SecretSettingError(f"both {variable} and {variable}{FILE_SUFFIX} are set: unset one of them")
    if path is None:
        return value
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as error:
        raise SecretSettingError(f"{variable}{FILE_SUFFIX}: cannot read {path}: {error.strerror}") from None


def seidra_home() -> Path:
    """Where the embedded defaults live (SQLite file, media folder, run state): SEIDRA_HOME."""
    return _resolved(_HomeSettings().home)


def _resolved(home: str) -> Path:
    return Path(home).expanduser().resolve()


class _HomeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")
    home: str = HOME_FIELD


def _secret_field(description: str) -> Any:
    # Kept out of repr (logs, tracebacks) and model_dump (anything serialised from the settings).
    return Field("", description=description, repr=False, exclude=True)


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")

    home: str = HOME_FIELD

    database_url: str = _secret_field(
        "SQLAlchemy URL; empty means a SQLite file in SEIDRA_HOME. PostgreSQL: postgresql+psycopg://user:pass@host:5432/db"
    )
    s3_endpoint: str = Field("", description="host:port of a MinIO/S3 server; empty means a local folder.")
    s3_access_key: str = _secret_field("S3 access key.")
    s3_secret_key: str = _secret_field("S3 secret key.")
    s3_bucket: str = Field("seidra-media", min_length=3, max_length=63, description="Bucket, created if missing.")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 server.")
    s3_presign_expiry_s: int = Field(
        900, ge=60, le=7 * 24 * 3600, description="Lifetime of the presigned image URLs minted for a job's owner."
    )
    upload_timeout_s: float = Field(
        30.0, gt=0, description="How long a worker retries storing an image before the job waits and tries again later."
    )
    media_dir: str = Field("", description="Folder for images when no S3 endpoint is set; empty means SEIDRA_HOME/media.")

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """`SEIDRA_X_FILE` for a secret not given otherwise (pydantic reads `SEIDRA_X` itself)."""
        if not isinstance(data, dict):
            return data
        secrets = {name: environment_secret(f"SEIDRA_{name.upper()}") for name in STORAGE_SECRET_FIELDS}
        return {**{name: value for name, value in secrets.items() if value is not None}, **data}

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> StorageSettings:
        return self._completed()

    def _completed(self) -> StorageSettings:
        home = _resolved(self.home)
        self.home = str(home)
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'seidra.db'}"
        if not self.media_dir:
            self.media_dir = str(home / "media")
        if self.s3_endpoint and not (self.s3_access_key and self.s3_secret_key):
            raise ValueError(
                "SEIDRA_S3_ENDPOINT is set: SEIDRA_S3_ACCESS_KEY and SEIDRA_S3_SECRET_KEY (or their _FILE variants) "
                "are required in the environment of every SEIDRA process"
            )
        return self

    # ----- pickling: what Ray stores and ships carries no secret -----

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        return {
            **state,
            "__dict__": {**state["__dict__"], **dict.fromkeys(STORAGE_SECRET_FIELDS, "")},
            # Which database, its password masked: the receiver must find the same one.
            _DATABASE_SENT: masked_url(self.database_url),
        }

    def __setstate__(self, state: dict[Any, Any]) -> None:
        """The receiving process's own secrets, as if it had read its environment itself.

        Raises SecretSettingError when its database is not the sender's: a node whose environment
        lacks SEIDRA_DATABASE_URL would otherwise keep its jobs in a SQLite file of its own.
        """
        state = dict(state)
        sent = state.pop(_DATABASE_SENT, None)
        super().__setstate__(state)
        secrets = {name: environment_secret(f"SEIDRA_{name.upper()}") or "" for name in STORAGE_SECRET_FIELDS}
        self.__dict__.update(secrets)
        self._completed()
        if sent is not None and masked_url(self.database_url) != sent:
            raise SecretSettingError(
                f"this process's database is {masked_url(self.database_url)}, the application's is {sent}: "
                "set SEIDRA_DATABASE_URL (or SEIDRA_DATABASE_URL_FILE) alike in every node's environment"
            )


_DATABASE_SENT = "seidra_database_url_masked"


def masked_url(database_url: str) -> str:
    """The URL with its password hidden: safe to ship, log and compare."""
    return sa_url.make_url(database_url).render_as_string(hide_password=True)
