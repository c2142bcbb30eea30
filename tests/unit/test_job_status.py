"""The job state machine, checked against a table written out by hand."""

from __future__ import annotations

import itertools

import pytest

from storage.job_status import IllegalTransition, JobStatus, check_transition

P, R, C, F, X = (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
LEGAL = {(P, R), (P, X), (R, C), (R, F), (R, P), (R, X), (F, P), (X, P)}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobStatus, JobStatus)))
def test_transition(current: JobStatus, target: JobStatus) -> None:
    if (current, target) in LEGAL:
        check_transition("job", current, target)
    else:
        with pytest.raises(IllegalTransition, match=f"is {current.value}; it cannot become {target.value}"):
            check_transition("job", current, target)


def test_terminal_statuses() -> None:
    assert {status for status in JobStatus if status.is_terminal} == {C, F, X}
