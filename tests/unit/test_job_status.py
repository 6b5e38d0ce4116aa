"""The job lifecycle's one table (:mod:`core.job_status`): every transition it lists is
accepted, every pair it does not list is refused with :class:`IllegalTransition`, and the
statuses keep the values the database and the HTTP API use."""

from __future__ import annotations

import itertools

import pytest

from core.job_status import (
    FINISHED,
    INITIAL,
    JOB_STATUSES,
    LIVE,
    PENDING_DEPENDENCY,
    TRANSITIONS,
    IllegalTransition,
    JobStatus,
    can_follow,
    check_transition,
    sources_of,
)

S = JobStatus

LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]
ILLEGAL = [(a, b) for a, b in itertools.product(JobStatus, JobStatus) if b not in TRANSITIONS[a]]


def test_the_values_are_the_stored_and_shown_strings() -> None:
    assert [s.value for s in JOB_STATUSES] == [
        "waiting",
        "queued",
        "running",
        "pausing",
        "paused",
        "cancelling",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert S.QUEUED == "queued" and isinstance(S.QUEUED, str) and f"{S.FAILED}" == "failed"
    assert set(TRANSITIONS) == set(JobStatus)  # every status has a row


@pytest.mark.parametrize(("source", "target"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_every_listed_transition_is_accepted(source: JobStatus, target: JobStatus) -> None:
    assert can_follow(source, target)
    assert check_transition((source,), target) == (source,)
    assert check_transition((source.value,), target.value) == (source,)  # the stored strings


@pytest.mark.parametrize(("source", "target"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_every_other_pair_is_refused(source: JobStatus, target: JobStatus) -> None:
    assert not can_follow(source, target)
    with pytest.raises(IllegalTransition) as e:
        check_transition((source,), target)
    assert e.value.source == source and e.value.target == target
    assert f"cannot go from {source} to {target}" in str(e.value)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (S.SUCCEEDED, S.RUNNING),  # a finished job never runs again
        (S.SUCCEEDED, S.QUEUED),
        (S.CANCELLED, S.QUEUED),
        (S.FAILED, S.RUNNING),  # only through queued and a claim
        (S.PAUSED, S.RUNNING),  # a resume queues it
        (S.WAITING, S.RUNNING),
        (S.CANCELLING, S.RUNNING),
        (S.CANCELLING, S.PAUSED),
        (S.QUEUED, S.SUCCEEDED),
        (S.QUEUED, S.QUEUED),
    ],
)
def test_a_sample_of_illegal_transitions_is_refused(source: JobStatus, target: JobStatus) -> None:
    with pytest.raises(IllegalTransition, match=f"from {source} to {target}"):
        check_transition((source,), target)


def test_a_set_of_sources_is_refused_when_one_of_them_is_illegal() -> None:
    assert check_transition(LIVE, S.FAILED) == LIVE
    with pytest.raises(IllegalTransition, match="from succeeded to queued"):
        check_transition((S.FAILED, S.SUCCEEDED), S.QUEUED)
    with pytest.raises(ValueError, match="at least one"):
        check_transition((), S.QUEUED)
    with pytest.raises(ValueError):
        check_transition(("finished",), S.QUEUED)  # not a status


def test_the_named_groups_agree_with_the_table() -> None:
    assert not TRANSITIONS[S.SUCCEEDED] and not TRANSITIONS[S.CANCELLED]  # final
    assert TRANSITIONS[S.FAILED] == {S.QUEUED}  # the never-queued job's idempotent retry
    assert set(FINISHED) == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert set(INITIAL) == {S.QUEUED, S.WAITING}
    assert set(sources_of(S.RUNNING)) == {S.QUEUED}  # the claim is the only way in
    for live in LIVE:  # a worker can finish a job it holds every way
        assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} <= TRANSITIONS[live]
    assert S.CANCELLING not in PENDING_DEPENDENCY and not set(FINISHED) & set(PENDING_DEPENDENCY)
    reachable = set(INITIAL)
    frontier = list(INITIAL)
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(JobStatus)  # no status the lifecycle cannot reach


def test_the_clients_copies_of_the_final_statuses_are_the_servers() -> None:
    """The SDK (a distribution of its own, which must not import the server) and the devstack
    client keep their own tuple of final statuses: equal to the server's."""
    from devstack.client import FINAL
    from distillery_sdk.models import FINAL_STATUSES

    assert set(FINAL_STATUSES) == set(FINISHED) == set(FINAL)
