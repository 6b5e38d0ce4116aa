"""The two test lanes (tests/conftest.py): which tests ``make check`` leaves to ``make test``."""

from __future__ import annotations

import pytest

from tests.conftest import JOB_CALL


@pytest.mark.parametrize(
    "source",
    [
        # each name and its "(" apart, so that this test's own source makes no such call
        "result = run_job" + "(spec, minilm_path, no_files, out)",
        "    train" + "(student, teacher, method, data, data, training, pad, CPU)",
        "assert execute" + "(job_id, settings) == 'succeeded'",
        "launch" + "(_train_once, 2, (str(two), accumulation))",
        "run_job_distributed" + "(spec, path, Path, out, 2, hooks)",
    ],
)
def test_a_call_that_runs_a_job_makes_a_test_slow(source: str) -> None:
    assert JOB_CALL.search(source)


@pytest.mark.parametrize(
    "source",
    [
        "student.train()",  # a mode switch, not a training loop
        "_train_once(0, str(one), accumulation)",  # a helper's name, not the call itself
        "run_jobs = 3",
        "trainer.execute_later",
    ],
)
def test_other_calls_do_not(source: str) -> None:
    assert not JOB_CALL.search(source)


def test_this_unit_test_is_in_the_fast_lane(request: pytest.FixtureRequest) -> None:
    """Marked neither ``services`` (it needs none) nor ``slow`` (it runs no job)."""
    assert request.node.get_closest_marker("services") is None
    assert request.node.get_closest_marker("slow") is None


def test_a_unit_test_that_runs_a_job_is_slow(request: pytest.FixtureRequest) -> None:
    """This test's own source names a job call (here, in a string): the lane marker follows
    the source, so it is ``slow``. The call itself: run_job(...) is never made."""
    assert request.node.get_closest_marker("slow") is not None
