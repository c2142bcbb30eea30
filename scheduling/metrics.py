"""SEIDRA's Prometheus metrics, exported the Ray way (`ray.util.metrics`): every process records
into its node's Ray metrics endpoint, next to Ray Serve's own `ray_serve_*` metrics, and Ray
exports them with its `ray_` prefix (`seidra_jobs_submitted` is scraped as
`ray_seidra_jobs_submitted_total`). The table of names is in docs/metrics.md.
"""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Gauge, Histogram

# Diffusion jobs take seconds to minutes; steps take milliseconds to seconds.
JOB_SECONDS_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800]
STEP_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
# Loading a model takes under a second (a tiny one, a warm page cache) to minutes (a hub download).
LOAD_SECONDS_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]

JOB_EVENTS = ("submitted", "started", "completed", "failed", "cancelled", "delayed")


@cache
def job_events() -> dict[str, Counter]:
    return {
        event: Counter(f"seidra_jobs_{event}", description=f"Jobs {event}, by lane.", tag_keys=("lane",)) for event in JOB_EVENTS
    }


@cache
def queue_gauges() -> dict[str, Gauge]:
    return {
        "depth": Gauge("seidra_queue_depth", description="Jobs waiting in a lane (held ones included).", tag_keys=("lane",)),
        "held": Gauge("seidra_jobs_held", description="Jobs on hold for want of a healthy GPU.", tag_keys=("lane",)),
        "running": Gauge("seidra_jobs_running", description="Jobs running on a worker replica."),
        "replicas": Gauge(
            "seidra_worker_replicas", description="Worker replicas by mode and health.", tag_keys=("mode", "health")
        ),
    }


@cache
def job_histograms() -> dict[str, Histogram]:
    return {
        "duration": Histogram(
            "seidra_job_duration_seconds", description="From start to end of a job.",
            boundaries=JOB_SECONDS_BUCKETS, tag_keys=("lane",),
        ),
        "queue_wait": Histogram(
            "seidra_queue_wait_seconds", description="From submission to first start.",
            boundaries=JOB_SECONDS_BUCKETS, tag_keys=("lane",),
        ),
    }  # fmt: skip


@cache
def notifications_sent() -> Counter:
    return Counter("seidra_notifications_sent", description="User notifications, by level.", tag_keys=("level",))


@cache
def worker_metrics() -> dict[str, Gauge | Histogram]:
    return {
        "step": Histogram(
            "seidra_inference_step_seconds", description="Time per denoising step.",
            boundaries=STEP_SECONDS_BUCKETS, tag_keys=("replica",),
        ),
        "temperature": Gauge("seidra_gpu_temperature_celsius", description="GPU temperature (NVML).", tag_keys=("replica",)),
        "utilization": Gauge("seidra_gpu_utilization_percent", description="GPU utilization (NVML).", tag_keys=("replica",)),
        "memory": Gauge("seidra_gpu_memory_used_bytes", description="GPU memory used (NVML).", tag_keys=("replica",)),
    }  # fmt: skip


@cache
def model_loads() -> Counter:
    return Counter("seidra_model_loads", description="Models loaded by worker replicas, by model.", tag_keys=("model",))


@cache
def model_evictions() -> Counter:
    return Counter(
        "seidra_model_evictions",
        description="Models a worker replica let go to make room for another, by model.",
        tag_keys=("model",),
    )


@cache
def model_load_seconds() -> Histogram:
    return Histogram(
        "seidra_model_load_seconds",
        description="Time for a worker replica to load a model, by model.",
        boundaries=LOAD_SECONDS_BUCKETS,
        tag_keys=("model",),
    )


@cache
def http_requests() -> Counter:
    return Counter(
        "seidra_http_requests", description="HTTP requests, by route and status.", tag_keys=("route", "method", "status")
    )


@cache
def storage_errors() -> Counter:
    return Counter("seidra_storage_errors", description="Storage calls that failed and were retried.", tag_keys=("call",))


@cache
def reconciler_repairs() -> Counter:
    return Counter(
        "seidra_reconciler_repairs",
        description="Jobs the reconciler repaired: adopted (unfinished in the database, unknown to the router) or dropped.",
        tag_keys=("repair",),
    )


@cache
def calls_yielded() -> Counter:
    return Counter(
        "seidra_calls_yielded",
        description="Worker calls asked to yield their slot at a slice boundary, by reason.",
        tag_keys=("reason",),
    )


@cache
def call_batch_size() -> Histogram:
    return Histogram(
        "seidra_call_batch_size",
        description="Jobs denoised together per worker call, by lane.",
        boundaries=[1, 2, 4, 8, 16, 32, 64],
        tag_keys=("lane",),
    )
