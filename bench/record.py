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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_HEADING = "## Results"


@dataclass(frozen=True)
class Target:
    """A target of issue 11 and the same run's figure for it."""

    name: str  # as the issue states it, e.g. "batch images/s, slicing on / off >= 0.95"
    measured: float | None  # None: the run could not measure it
    threshold: float
    at_least: bool  # met when measured >= threshold; otherwise when measured <= threshold
    note: str = ""  # what the reader must know to weigh the figure (a setting the cluster ignored)

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        met = self.measured >= self.threshold if self.at_least else self.measured <= self.threshold
        return "met" if met else "missed"

    def as_dict(self) -> dict[str, object]:
        return {"target": self.name, "measured": self.measured, "verdict": self.verdict, "note": self.note}


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


def section(
    title: str,
    figures: Mapping[str, Any],
    report: Mapping[str, Any],
    command: str,
    when: datetime,
    targets: Sequence[Target] = (),
) -> str:
    table = ["| figure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in figures.items())]
    if targets:
        table += ["", "| target (issue 11) | measured, same run | verdict |", "|---|---|---|"]
        table += [f"| {t.name} | {t.measured} | {t.verdict}{f' ({t.note})' if t.note else ''} |" for t in targets]
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


def append(path: Path, title: str, figures: Mapping[str, Any], report: Mapping[str, Any], targets: Sequence[Target] = ()) -> None:
    """Append the result to `path`, under its `## Results` heading (added when missing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if RESULTS_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{RESULTS_HEADING}\n"
    command = shlex.join(["python", "-m", *_module_and_args()])
    text = text.rstrip("\n") + "\n\n" + section(title, figures, report, command, datetime.now(timezone.utc), targets)
    path.write_text(text)


def _module_and_args() -> list[str]:
    main = sys.modules["__main__"]
    module = getattr(main.__spec__, "name", None) if getattr(main, "__spec__", None) else None
    return [module or sys.argv[0], *sys.argv[1:]]
