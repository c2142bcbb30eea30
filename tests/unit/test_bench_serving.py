"""The serving benchmarks' arithmetic and bookkeeping (bench/harness.py, bench/serving.py, bench/record.py):
percentiles, ratios, throughput from job records, which deployment gets which settings, targets and
their verdicts. No Ray: the real runs are smoke-tested in tests/integration/test_bench_smoke.py."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from bench import core_scale
from bench.batching import BatchingPlan, breakdown, measure_rounds
from bench.harness import Client, JobTiming, images_per_s, ratio, split_settings, steady_images_per_s, summary_ms
from bench.record import Target, section
from bench.serving import Plan, Report, common_settings, figures, release_slice_steps, stages, targets
from scheduling.settings import RouterSettings


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    values_s = [n / 1000 for n in range(1, 101)]  # 1..100 ms
    assert summary_ms(values_s) == {"count": 100, "p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert summary_ms([0.2]) == {"count": 1, "p50": 200.0, "p95": 200.0, "p99": 200.0}
    assert summary_ms([]) == {"count": 0, "p50": None, "p95": None, "p99": None}


def test_a_ratio_without_both_figures_is_none() -> None:
    assert ratio(3, 2) == 1.5
    assert ratio(None, 2) is None and ratio(3, None) is None and ratio(3, 0) is None


def job(status: str, started: str, finished: str) -> dict[str, Any]:
    return {"status": status, "started_at": f"2026-12-01T10:00:{started}Z", "finished_at": f"2026-12-01T10:00:{finished}Z"}


def test_images_per_second_span_the_first_start_to_the_last_finish_of_completed_jobs() -> None:
    jobs = [job("completed", "00.000", "01.000"), job("completed", "01.000", "04.000"), job("cancelled", "04.000", "09.000")]
    assert images_per_s(jobs) == 0.5  # 2 images in 4 s; the cancelled one counts for nothing
    assert images_per_s([job("failed", "00.000", "01.000")]) is None


def test_steady_throughput_counts_intervals_between_completions() -> None:
    finished = ["2026-12-01T10:00:03Z", "2026-12-01T10:00:01Z", "2026-12-01T10:00:05Z"]
    assert steady_images_per_s(finished) == 0.5  # 2 intervals in 4 s, whatever the order
    assert steady_images_per_s(finished[:1]) is None


def call_job(replica: str, started: str, finished: str, inference_s: float, status: str = "completed") -> dict[str, Any]:
    return {**job(status, started, finished), "metadata": {"replica_id": replica, "inference_s": inference_s}}


def test_a_round_is_broken_down_into_pipeline_time_time_around_it_and_time_between_calls() -> None:
    jobs = [
        # One call of two jobs (their spans overlap): 0.8 s in the pipeline, 1.0 s from start to last finish.
        call_job("r", "00.000", "00.950", 0.8),
        call_job("r", "00.010", "01.000", 0.8),
        # The next call starts 0.2 s later: the replica had no call meanwhile.
        call_job("r", "01.200", "02.000", 0.7),
        call_job("r", "02.000", "09.000", 5.0, status="failed"),  # not an image: not counted
    ]
    assert breakdown(jobs) == {
        "span_s": 2.0, "calls": 2, "pipeline_s": 1.5, "in_call_s": 0.3, "between_calls_s": 0.2, "pipeline_images_per_s": 2.0,
    }  # fmt: skip
    # Two replicas run calls at the same time: time between calls is no longer one replica's idle time.
    two = breakdown([call_job("a", "00.000", "01.000", 0.9), call_job("b", "00.500", "01.500", 0.9)])
    assert two is not None and two["calls"] == 2 and two["between_calls_s"] is None
    assert breakdown([call_job("r", "00.000", "01.000", 0.9, status="cancelled")]) is None


def test_rounds_alternate_bare_pipeline_and_seidra_and_add_up() -> None:
    order: list[str] = []

    def bare() -> dict[str, Any]:
        order.append("bare")
        return {
            "batch_size": 2,
            "device": "cpu",
            "dtype": "torch.float32",
            "torch_threads": 1,
            "images": 4,
            "elapsed_s": 1.0,
            "images_per_s": 4.0,
        }

    def seidra(round_: int) -> dict[str, Any]:
        order.append(f"seidra {round_}")
        parts = {"span_s": 2.0 if round_ else 1.0, "calls": 2, "pipeline_s": 0.8, "in_call_s": 0.1, "between_calls_s": 0.1}
        return {"jobs": {"completed": 4}, "images_per_s": 4 / parts["span_s"], "breakdown": parts}

    result = measure_rounds(BatchingPlan(calls=2, rounds=2), 2, seidra, bare)
    assert order == ["bare", "seidra 0", "bare", "seidra 1"]
    assert [round_["seidra_over_bare"] for round_ in result["rounds"]] == [1.0, 0.5]
    assert result["bare"]["images"] == 8 and result["bare"]["images_per_s"] == 4.0
    seidra_total = result["seidra"]
    assert seidra_total["jobs"] == {"completed": 8} and seidra_total["images_per_s"] == round(8 / 3.0, 3)
    assert seidra_total["breakdown"] == {"span_s": 3.0, "calls": 4, "pipeline_s": 1.6, "in_call_s": 0.2, "between_calls_s": 0.2}
    assert seidra_total["pipeline_images_per_s"] == 5.0


def test_a_jobs_end_to_end_time_is_split_into_its_parts() -> None:
    record = {
        "created_at": "2026-12-01T10:00:00.000Z", "started_at": "2026-12-01T10:00:00.100Z",
        "finished_at": "2026-12-01T10:00:00.500Z", "metadata": {"inference_s": 0.35}, "status": "completed",
    }  # fmt: skip
    assert JobTiming(record, 0.6).parts_ms() == {
        "end_to_end": 600.0, "queue_wait": 100.0, "inference": 350.0, "around_inference": 50.0, "outside_record": 100.0,
    }  # fmt: skip


def test_settings_unknown_to_the_release_are_set_apart_not_applied() -> None:
    applied, ignored = split_settings({"SEIDRA_AUTH": "off", "SEIDRA_WARP_DRIVE": "9"}, {"SEIDRA_AUTH"})
    assert applied == {"SEIDRA_AUTH": "off"} and ignored == {"SEIDRA_WARP_DRIVE": "9"}


def test_slicing_on_is_measured_with_the_release_default_slice() -> None:
    # The field's default, not RouterSettings(): a session's cluster may have SEIDRA_STEPS_PER_DISPATCH set.
    assert Plan().slice_steps == release_slice_steps() == RouterSettings.model_fields["steps_per_dispatch"].default > 0


def test_each_configuration_is_deployed_once_with_the_settings_its_scenarios_need() -> None:
    plan = Plan(slice_steps=7, batch_sizes=(1, 2, 4))
    by_name = {stage.name: stage for stage in stages(plan)}
    assert list(by_name) == ["sliced", "whole", "fifo", "batch-2", "batch-4"]
    assert by_name["sliced"].settings == {"SEIDRA_STEPS_PER_DISPATCH": "7"} and by_name["sliced"].batch_size == 1
    assert by_name["whole"].settings["SEIDRA_STEPS_PER_DISPATCH"] == "0" and by_name["whole"].router
    assert int(by_name["whole"].settings["SEIDRA_MAX_BATCH_QUEUE"]) > plan.router.high_waiting
    assert by_name["fifo"].settings == {"SEIDRA_STEPS_PER_DISPATCH": "0", "SEIDRA_QUEUE_POLICY": "fifo"}
    assert by_name["batch-4"].settings == {"SEIDRA_STEPS_PER_DISPATCH": "7", "SEIDRA_MAX_BATCH_SIZE": "4"}
    common = common_settings(plan)
    assert common["SEIDRA_AUTH"] == "off" and common["SEIDRA_MAX_BATCH_SIZE"] == "1" and common["SEIDRA_QUEUE_POLICY"] == "lanes"


def test_a_chosen_scenario_deploys_only_what_it_needs() -> None:
    assert [stage.name for stage in stages(Plan(scenarios=("router",)))] == ["whole"]
    assert [stage.name for stage in stages(Plan(scenarios=("batching",), batch_sizes=(2, 8)))] == ["batch-2", "batch-8"]


def latency_result(idle_p95_ms: float, loaded_p95_ms: float, wait_p95_ms: float, batch_images_per_s: float) -> dict[str, Any]:
    return {
        "idle": {"end_to_end_ms": {"p50": idle_p95_ms, "p95": idle_p95_ms}, "queue_wait_ms": {"p50": 1.0, "p95": 1.0}},
        "loaded": {"end_to_end_ms": {"p50": loaded_p95_ms, "p95": loaded_p95_ms}, "queue_wait_ms": {"p50": wait_p95_ms, "p95": wait_p95_ms}},
        "loaded_over_idle": {"end_to_end_p95": ratio(loaded_p95_ms, idle_p95_ms)},
        "batch_images_per_s": batch_images_per_s,
        "realtime_jobs": {"completed": 3},
    }  # fmt: skip


def sample_report() -> Report:
    plan = Plan(batch_sizes=(1, 4))
    report = Report(plan, "tiny")
    for name in ("sliced", "whole", "batch-4"):
        report.deployments[name] = {"settings": {}, "ignored_settings": {}, "stage_settings": {}}
    report.deployments["batch-4"]["ignored_settings"] = {"SEIDRA_MAX_BATCH_SIZE": "4"}
    report.latency["sliced"] = latency_result(400, 480, 10, 0.96)
    report.latency["whole"] = latency_result(400, 1400, 300, 1.0)
    report.batching["1"] = {
        "deployment": "sliced",
        "seidra": {"images_per_s": 4.0, "jobs": {"completed": 8}},
        "bare": {"images_per_s": 4.2},
    }
    report.batching["4"] = {
        "deployment": "batch-4",
        "seidra": {"images_per_s": 4.4, "jobs": {"completed": 8}},
        "bare": {"images_per_s": 10.0},
    }
    levels = {
        "1000": {
            "non_inference_ms": {"p50": 15.0, "p99": 30.0},
            "submissions_per_s": 2500.0,
            "router_rss_mib": 200.0,
            "probe_jobs": {"completed": 3},
        },
        "100000": {
            "non_inference_ms": {"p50": 19.0, "p99": 60.0},
            "submissions_per_s": 1500.0,
            "router_rss_mib": 900.0,
            "probe_jobs": {"completed": 3},
        },
    }
    report.router = {"deployment": "whole", "levels": levels, "high_over_low": {"non_inference_p50": ratio(19.0, 15.0)}}
    return report  # fmt: skip


def test_every_target_of_issue_11_gets_a_verdict_from_the_same_run() -> None:
    verdicts = {target.name: (target.measured, target.verdict, target.note) for target in targets(sample_report())}
    assert verdicts["realtime end-to-end p95, saturated / idle, slicing on <= 1.3"] == (1.2, "met", "")
    assert verdicts["realtime queue-wait p95 under saturation, whole-job / sliced >= 20"] == (30.0, "met", "")
    assert verdicts["batch images/s under realtime load, slicing on / off >= 0.95"] == (0.96, "met", "")
    measured, verdict, note = verdicts["SEIDRA images/s, batch size 4 / batch size 1 >= 1.3"]
    assert (measured, verdict) == (1.1, "missed") and "SEIDRA_MAX_BATCH_SIZE" in note  # the cluster did not batch
    assert verdicts["images/s at batch size 1, SEIDRA / bare pipeline >= 0.9"][:2] == (0.952, "met")
    assert verdicts["images/s at batch size 4, SEIDRA / bare pipeline >= 0.9"][:2] == (0.44, "missed")
    assert verdicts["non-inference time per job p50 at 1,000 waiting <= 20 ms"][:2] == (15.0, "met")
    assert verdicts["non-inference p50, 100,000 waiting / 1,000 waiting <= 1.2"][:2] == (1.267, "missed")
    assert verdicts["submissions/s in batches of 500 at 100,000 waiting >= 2,000"][:2] == (1500.0, "missed")


def test_a_target_the_run_could_not_measure_says_so() -> None:
    assert Target("x <= 1", None, 1, at_least=False).verdict == "not measured"
    assert Target("x >= 1", 1.0, 1, at_least=True).verdict == "met"


def test_the_recorded_table_shows_settings_figures_and_targets() -> None:
    report = sample_report()
    shown = figures(report)
    assert shown["deployment batch-4"] == "common only (not applied: SEIDRA_MAX_BATCH_SIZE)"
    assert shown["images/s at batch size 4: SEIDRA / bare pipeline"] == "4.4 / 10.0"
    assert shown["submissions/s at 100,000 waiting"] == 1500.0
    text = section("Serving", shown, report.as_dict(), "python -m bench.serving", datetime.now(timezone.utc), targets(report))
    assert "| target (issue 11) | measured, same run | verdict |" in text
    assert (
        "| SEIDRA images/s, batch size 4 / batch size 1 >= 1.3 | 1.1 | missed (not applied, unknown to this release: SEIDRA_MAX_BATCH_SIZE) |"
        in text
    )
    assert '"verdict": "met"' in text  # the raw JSON carries the verdicts too


def test_the_core_scale_record_states_its_target(tmp_path: Path) -> None:
    document = tmp_path / "benchmarks.md"
    assert core_scale.main(["--replicas", "5", "--jobs", "50", "--steps", "2", "--record", str(document)]) == 0
    assert "| core decisions/s with 5 replicas >= 20,000 |" in document.read_text()


def test_waiting_for_jobs_returns_each_once_ended_even_when_an_earlier_one_ends_last() -> None:
    polls = {"a": 0, "b": 0, "c": 0}
    ends_after = {"a": 5, "b": 1, "c": 2}  # "a" ends after the last one

    def answer(request: httpx.Request) -> httpx.Response:
        job_id = request.url.path.rsplit("/", 1)[1]
        polls[job_id] += 1
        status = "completed" if polls[job_id] > ends_after[job_id] else "running"
        return httpx.Response(200, json={"id": job_id, "status": status})

    async def wait() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url="http://seidra", transport=httpx.MockTransport(answer)) as http:
            return await Client(http).wait_for(["a", "b", "c"], deadline_s=60)

    jobs = asyncio.run(wait())
    assert [job["status"] for job in jobs] == ["completed"] * 3
    assert polls["b"] <= 3  # the jobs before the last are looked at once it ended, not on every poll
