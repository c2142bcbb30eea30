"""Throwaway: proves tests/servers.py works. Delete after use."""

import io
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import psycopg
import pytest
import sqlalchemy
from minio import Minio
from minio.error import S3Error

from servers import postgres_server, s3_server


def _pids(pattern: str) -> str:
    out = subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True)
    return "\n".join(l for l in out.stdout.splitlines() if "pgrep" not in l)


@pytest.mark.parametrize("round_", [1, 2])
def test_postgres(round_):
    t0 = time.monotonic()
    with postgres_server() as url:
        print(f"\npostgres up in {time.monotonic() - t0:.2f}s: {url}")
        assert url.startswith("postgresql+psycopg://") and url.endswith("/seidra")
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("""SELECT '{"a":{"b":1}}'::jsonb->'a'""").fetchone() == ({"b": 1},)
            assert conn.execute("SELECT current_database()").fetchone() == ("seidra",)
            print("server:", conn.execute("SHOW server_version").fetchone(),
                  conn.execute("SHOW listen_addresses").fetchone())
        eng = sqlalchemy.create_engine(url)
        with eng.connect() as c:
            assert c.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
        eng.dispose()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        tmpdirs = [p for p in os.listdir("/tmp") if p.startswith("seidra-pg-")]
        assert len(tmpdirs) == 1
    t1 = time.monotonic()
    print(f"postgres stopped in {time.monotonic() - t1:.2f}s")
    assert _pids("postgres -D /tmp/seidra-pg") == ""
    assert not [p for p in os.listdir("/tmp") if p.startswith("seidra-pg-")]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_postgres_body_raises_leaves_nothing():
    with pytest.raises(ZeroDivisionError):
        with postgres_server() as url:
            psycopg.connect(url.replace("+psycopg", "")).close()
            1 / 0
    assert _pids("postgres -D /tmp/seidra-pg") == ""
    assert not [p for p in os.listdir("/tmp") if p.startswith("seidra-pg-")]


def test_postgres_external_override(monkeypatch):
    monkeypatch.setenv("SEIDRA_TEST_DATABASE_URL", "postgresql+psycopg://x@h:1/db")
    with postgres_server() as url:
        assert url == "postgresql+psycopg://x@h:1/db"


@pytest.mark.parametrize("round_", [1, 2])
def test_s3(round_):
    t0 = time.monotonic()
    with s3_server() as s3:
        print(f"\nweed up in {time.monotonic() - t0:.2f}s: {s3.endpoint}")
        tmp = [p for p in os.listdir("/tmp") if p.startswith("seidra-s3-")]
        assert len(tmp) == 1
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        weed_lines = [l for l in listening.splitlines() if '"weed"' in l]
        print("weed listens on:", sorted(l.split()[3] for l in weed_lines))
        assert weed_lines and all(l.split()[3].startswith("127.0.0.1:") for l in weed_lines)
        print("/tmp after start:", sorted(os.listdir("/tmp")))

        c = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
        t = time.monotonic()
        c.make_bucket("seidra-smoke")
        assert c.bucket_exists("seidra-smoke")
        data = b"hello seaweed" * 1000
        c.put_object("seidra-smoke", "dir/obj.bin", io.BytesIO(data), len(data),
                     content_type="application/octet-stream", metadata={"x-amz-meta-k": "v"})
        resp = c.get_object("seidra-smoke", "dir/obj.bin")
        try:
            assert resp.read() == data
        finally:
            resp.close()
            resp.release_conn()
        st = c.stat_object("seidra-smoke", "dir/obj.bin")
        assert st.size == len(data)
        print("stat:", st.size, st.content_type, st.etag, dict(st.metadata).get("x-amz-meta-k"))
        names = [o.object_name for o in c.list_objects("seidra-smoke", prefix="dir/", recursive=True)]
        assert names == ["dir/obj.bin"]
        url = c.presigned_get_object("seidra-smoke", "dir/obj.bin")
        assert urllib.request.urlopen(url, timeout=5).read() == data
        # anonymous access refused
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"http://{s3.endpoint}/seidra-smoke/dir/obj.bin", timeout=5)
        print("anonymous GET ->", ei.value.code)
        assert ei.value.code == 403
        bad = Minio(s3.endpoint, access_key=s3.access_key, secret_key="wrong", secure=False)
        with pytest.raises(S3Error) as ei2:
            bad.list_buckets()
        print("bad secret ->", ei2.value.code)
        c.remove_object("seidra-smoke", "dir/obj.bin")
        assert list(c.list_objects("seidra-smoke", recursive=True)) == []
        with pytest.raises(S3Error):
            c.stat_object("seidra-smoke", "dir/obj.bin")
        print(f"minio ops took {time.monotonic() - t:.2f}s")
        port = int(s3.endpoint.split(":")[1])
    t1 = time.monotonic()
    print(f"weed stopped in {t1 - t0:.2f}s total")
    assert _pids("weed") == ""
    assert not [p for p in os.listdir("/tmp") if p.startswith(("seidra-s3-", "seaweedfs-", "weed."))]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_s3_body_raises_leaves_nothing():
    with pytest.raises(ZeroDivisionError):
        with s3_server():
            1 / 0
    assert _pids("weed") == ""
    assert not [p for p in os.listdir("/tmp") if p.startswith("seidra-s3-")]


def test_s3_external_override(monkeypatch):
    monkeypatch.setenv("SEIDRA_TEST_S3_ENDPOINT", "http://example:9000")
    monkeypatch.setenv("SEIDRA_TEST_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("SEIDRA_TEST_S3_SECRET_KEY", "sk")
    with s3_server() as s3:
        assert (s3.endpoint, s3.access_key, s3.secret_key) == ("example:9000", "ak", "sk")
