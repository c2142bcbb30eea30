"""A smoke run of the scale-on-paper benchmark at a small size (bench/core_scale.py), and its record.

Checks what the run did, never how fast it was: speed is measured by `make bench`, not in tests.
"""

from __future__ import annotations

from pathlib import Path

from bench import record
from bench.core_scale import Fleet, main, run


def test_every_replica_gets_a_call_each_slice_and_every_decision_is_counted() -> None:
    fleet = Fleet(replicas=20, jobs=1_000, users=7, slices_per_job=3)
    report = run(fleet, steps=6)
    assert report["calls_dispatched"] == 20 * 6  # more jobs than slots: no slot ever idles
    # After the first slice, each slice ends 20 calls and starts 20; a quarter of the replicas report.
    assert report["decisions"] == 20 + 5 * (20 + 20) + 6 * 5
    assert report["decisions_needed_per_s"] == 20 * (2 / 0.5 + 1 / 2.0)


def test_replicas_report_in_turn_and_none_expires_over_a_long_run() -> None:
    fleet = Fleet(replicas=8, jobs=2_000, users=3, slices_per_job=2)
    steps = 4 * 20  # 40 simulated seconds: twice the replicas' TTL
    assert run(fleet, steps=steps)["calls_dispatched"] == 8 * steps


def test_a_recorded_run_appends_a_dated_section_with_machine_command_table_and_json(tmp_path: Path) -> None:
    document = tmp_path / "benchmarks.md"
    document.write_text("# Benchmarks\n\nHow to read them.\n")
    assert main(["--replicas", "5", "--jobs", "50", "--steps", "2", "--record", str(document)]) == 0
    assert main(["--replicas", "5", "--jobs", "50", "--steps", "2", "--record", str(document)]) == 0
    text = document.read_text()
    assert text.startswith("# Benchmarks\n\nHow to read them.\n\n## Results\n")
    assert text.count("### Scheduling core at scale (bench.core_scale), ") == 2
    assert "- machine: " in text and "cores" in text
    assert "| core decisions per second |" in text and '"calls_dispatched": 10' in text
    assert record.RESULTS_HEADING in text
