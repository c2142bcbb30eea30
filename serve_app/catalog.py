"""What a request may name: the served models and the LoRA adapters (the worker settings' catalog).

Checked at submission, so that a job naming a model or an adapter nobody serves is refused with a
422 naming the field, never stored to fail later on a replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from deployments.settings import WorkerSettings
from serve_app.settings import served_models


class Catalog:
    def __init__(self, worker: WorkerSettings) -> None:
        self._worker = worker
        self.models = served_models(worker)
        self.default_model = worker.default_model()

    def adapters(self) -> list[str]:
        """Read at each request: an operator adds an adapter by adding its folder."""
        return self._worker.adapters()

    def resolve(self, jobs: list[dict[str, Any]], locations: Sequence[tuple[str | int, ...]]) -> list[dict[str, Any]]:
        """`jobs` with each one's model named (the default where it named none); RequestValidationError
        naming every unknown model or adapter, at `locations` (each job's place in the body)."""
        adapters = set(self.adapters()) if any(job.get("loras") for job in jobs) else set()
        errors: list[dict[str, Any]] = []
        for job, location in zip(jobs, locations, strict=True):
            job["model"] = job.get("model") or self.default_model
            if job["model"] not in self.models:
                errors.append(
                    _error(
                        (*location, "model"), f"unknown model {job['model']!r}; served: {', '.join(self.models)}", job["model"]
                    )
                )
            for index, lora in enumerate(job.get("loras") or ()):
                if lora["name"] not in adapters:
                    errors.append(
                        _error((*location, "loras", index, "name"), f"unknown LoRA adapter {lora['name']!r}", lora["name"])
                    )
        if errors:
            raise RequestValidationError(errors)
        return jobs


def _error(location: tuple[str | int, ...], message: str, value: Any) -> dict[str, Any]:
    return {"type": "value_error", "loc": location, "msg": message, "input": value}
