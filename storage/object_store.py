"""Where generated images live: MinIO/S3 through the `minio` client, or a local folder."""

from __future__ import annotations

import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from storage.settings import StorageSettings

if TYPE_CHECKING:
    import urllib3

S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 10.0
S3_RETRIES = 1
# The longest one put may take before it fails: callers' deadlines leave room for one more attempt.
PUT_ATTEMPT_MAX_S = (S3_RETRIES + 1) * (S3_CONNECT_TIMEOUT_S + S3_READ_TIMEOUT_S) + 1.0


def image_key(job_id: str) -> str:
    """One key per job, so a re-run overwrites its image instead of adding a second one."""
    return f"images/{job_id}.png"


class ObjectNotFound(LookupError):
    pass


@dataclass(frozen=True)
class StoredObject:
    key: str
    last_modified: datetime  # UTC
    size_bytes: int


class ObjectStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Raise ObjectNotFound when `key` is absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def location(self, key: str) -> str:
        """Where a person or a program can fetch the object: a presigned URL or a file path."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[StoredObject]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...


class LocalObjectStore(ObjectStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} escapes the media folder")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half an image.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def location(self, key: str) -> str:
        return str(self._path(key))

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        root = self.root.resolve()
        if not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            key = path.relative_to(root).as_posix()
            if path.is_file() and key.startswith(prefix):
                stat = path.stat()
                yield StoredObject(key, datetime.fromtimestamp(stat.st_mtime, timezone.utc), stat.st_size)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3ObjectStore(ObjectStore):
    def __init__(self, settings: StorageSettings) -> None:
        from minio import Minio

        self.bucket = settings.s3_bucket
        self._presign_expiry = timedelta(seconds=settings.s3_presign_expiry_s)
        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            http_client=_http_client(),
        )
        if not self._client.bucket_exists(self.bucket):
            self._create_bucket()

    def _create_bucket(self) -> None:
        from minio.error import S3Error

        try:
            self._client.make_bucket(self.bucket)
        except S3Error as error:
            # Another replica created it between our check and our call.
            if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self._client.get_object(self.bucket, key)
        except S3Error as error:
            if error.code == "NoSuchKey":
                raise ObjectNotFound(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self._client.stat_object(self.bucket, key)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise
        return True

    def location(self, key: str) -> str:
        return self._client.presigned_get_object(self.bucket, key, expires=self._presign_expiry)

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        for item in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
            yield StoredObject(item.object_name, item.last_modified.astimezone(timezone.utc), item.size)

    def delete(self, key: str) -> None:
        self._client.remove_object(self.bucket, key)


def _http_client() -> urllib3.PoolManager:
    """Minio's default client has no timeouts: a stalled S3 server would hang an upload for good.

    Callers retry with their own backoff (the worker for `upload_timeout_s`), so few retries here.
    """
    import urllib3  # minio's own HTTP library

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=S3_CONNECT_TIMEOUT_S, read=S3_READ_TIMEOUT_S),
        retries=urllib3.Retry(total=S3_RETRIES, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


def open_object_store(settings: StorageSettings) -> ObjectStore:
    if settings.s3_endpoint:
        return S3ObjectStore(settings)
    return LocalObjectStore(settings.media_dir)
