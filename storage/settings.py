"""Storage settings, read from `SEIDRA_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HOME_FIELD = Field("~/.seidra", description="Folder for the embedded database, media and run state.")


def seidra_home() -> Path:
    """Where the embedded defaults live (SQLite file, media folder, run state): SEIDRA_HOME."""
    return _resolved(_HomeSettings().home)


def _resolved(home: str) -> Path:
    return Path(home).expanduser().resolve()


class _HomeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")
    home: str = HOME_FIELD


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")

    home: str = HOME_FIELD

    database_url: str = Field(
        "",
        description="SQLAlchemy URL; empty means a SQLite file in SEIDRA_HOME. "
        "PostgreSQL: postgresql+psycopg://user:pass@host:5432/db",
    )
    s3_endpoint: str = Field("", description="host:port of a MinIO/S3 server; empty means a local folder.")
    s3_access_key: str = Field("", description="S3 access key.")
    s3_secret_key: str = Field("", description="S3 secret key.")
    s3_bucket: str = Field("seidra-media", min_length=3, max_length=63, description="Bucket, created if missing.")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 server.")
    s3_presign_expiry_s: int = Field(
        900, ge=60, le=7 * 24 * 3600, description="Lifetime of the presigned image URLs minted for a job's owner."
    )
    upload_timeout_s: float = Field(
        30.0, gt=0, description="How long a worker retries storing an image before the job waits and tries again later."
    )
    media_dir: str = Field("", description="Folder for images when no S3 endpoint is set; empty means SEIDRA_HOME/media.")

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> StorageSettings:
        home = _resolved(self.home)
        self.home = str(home)
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'seidra.db'}"
        if not self.media_dir:
            self.media_dir = str(home / "media")
        if self.s3_endpoint and not (self.s3_access_key and self.s3_secret_key):
            raise ValueError("SEIDRA_S3_ENDPOINT is set: SEIDRA_S3_ACCESS_KEY and SEIDRA_S3_SECRET_KEY are required")
        return self
