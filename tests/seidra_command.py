"""`seidra` as an operator runs it, in a shell of its own: for the tests that bring SEIDRA up and
down with the installed command (a Ray head of their own, own SEIDRA_HOME and free ports)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEIDRA = Path(sys.executable).with_name("seidra")
# What this session's own cluster put in the environment must not leak into these `seidra up`s.
NOT_INHERITED = ("SEIDRA_", "HF_", "OTEL_", "RAY_ADDRESS")


@dataclass
class Seidra:
    """The `seidra` command in a shell of its own: SEIDRA_HOME, model, ports."""

    home: Path
    env: dict[str, str]
    gcs_port: int
    up_args: list[str]

    def run(self, *argv: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SEIDRA), *argv], env={**self.env, **env}, capture_output=True, text=True, timeout=timeout_s)

    def up(self, *argv: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("up", *self.up_args, *argv, timeout_s=timeout_s, **env)

    def state(self) -> dict[str, Any] | None:
        path = self.home / "run" / "up.json"
        return json.loads(path.read_text()) if path.exists() else None

    def leftovers(self) -> list[int]:
        """Pids of this test's Ray head: `ray start`, the GCS, the raylet and the agents name its GCS port on their
        command lines (workers, renamed `ray::...`, exit with their raylet)."""
        mentions_port = re.compile(rf"[=:]{self.gcs_port}(\D|$)")
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            if mentions_port.search(text) and int(cmdline.parent.name) != os.getpid():
                pids.append(int(cmdline.parent.name))
        return pids

    def session_dir(self) -> Path:
        """The Ray session folder of this test's head (its logs, the jobs' working dirs), from its
        raylet's command line: other Ray clusters on the host have folders of their own there."""
        gcs_address = re.compile(rf"--gcs-address=\S+:{self.gcs_port}$")
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue  # gone meanwhile
            folders = [arg.removeprefix("--session_dir=") for arg in argv if arg.startswith("--session_dir=")]
            if folders and any(gcs_address.match(arg) for arg in argv):
                return Path(folders[0])
        raise AssertionError(f"no raylet of the Ray head on GCS port {self.gcs_port} is running")


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """`seidra`'s own error: the last line on stderr (Ray's client logs its connection above it)."""
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("seidra: error: "), done.stdout[-3000:] + done.stderr[-3000:]
    return lines[-1]
