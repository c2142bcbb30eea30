"""Writing a benchmark's result down: a dated section of docs/benchmarks.md with the machine, the
exact command, a table of the figures that matter and the raw JSON.

Results are appended under `## Results`, newest last, so the file keeps its history.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_HEADING = "## Results"


def machine() -> str:
    """One line: CPU model and cores, memory, Python; what a reader needs to weigh the figures."""
    cpu = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    memory_gib = _meminfo_kib("MemTotal") / 1024**2
    return f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def _cpuinfo_field(name: str) -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), None)


def _meminfo_kib(name: str) -> float:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return 0.0
    return next((float(line.split()[1]) for line in lines if line.startswith(name + ":")), 0.0)


def section(title: str, figures: Mapping[str, Any], report: Mapping[str, Any], command: str, when: datetime) -> str:
    table = ["| figure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in figures.items())]
    return "\n".join([
        f"### {title}, {when:%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "",
        *table,
        "",
        "<details><summary>raw JSON</summary>",
        "",
        "```json",
        json.dumps(report, indent=2),
        "```",
        "",
        "</details>",
        "",
    ])  # fmt: skip


def append(path: Path, title: str, figures: Mapping[str, Any], report: Mapping[str, Any]) -> None:
    """Append the result to `path`, under its `## Results` heading (added when missing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if RESULTS_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{RESULTS_HEADING}\n"
    command = shlex.join(["python", "-m", *_module_and_args()])
    text = text.rstrip("\n") + "\n\n" + section(title, figures, report, command, datetime.now(timezone.utc))
    path.write_text(text)


def _module_and_args() -> list[str]:
    main = sys.modules["__main__"]
    module = getattr(main.__spec__, "name", None) if getattr(main, "__spec__", None) else None
    return [module or sys.argv[0], *sys.argv[1:]]
