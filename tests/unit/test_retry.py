"""AWS Batch's retry strategy: attempts left, then the first matching rule decides."""

from __future__ import annotations

import pytest

from mnp.jobs import exit_status, should_retry
from mnp.model import JobDefinition, RetryRule, RetryStrategy

RULES = (
    RetryRule(action="RETRY", on_exit_code="137"),
    RetryRule(action="EXIT", on_reason="Host lost*"),
    RetryRule(action="RETRY", on_exit_code="1?"),
    RetryRule(action="EXIT", on_exit_code="*"),
)


def defn(attempts: int, rules: tuple[RetryRule, ...] = RULES) -> JobDefinition:
    return JobDefinition(name="j", command=("x",), retry=RetryStrategy(attempts, rules))


@pytest.mark.parametrize(
    ("made", "code", "reason", "retry"),
    [
        (1, 137, "", True),  # first rule
        (1, 1, "Host lost: n1", False),  # second rule, by reason
        (1, 12, "", True),  # glob 1?
        (1, 2, "", False),  # catch-all EXIT
        (3, 137, "", False),  # no attempts left, whatever the rules
        (1, None, "", False),  # no exit code: only '*' matches the empty code
    ],
)
def test_first_matching_rule_wins(made: int, code: int | None, reason: str, retry: bool) -> None:
    assert should_retry(defn(3), made, code, reason) is retry


def test_no_rule_matches_means_retry() -> None:
    only_137 = (RetryRule(action="EXIT", on_exit_code="137"),)
    assert should_retry(defn(2, only_137), 1, 3, "") is True
    assert should_retry(defn(2, ()), 1, 3, "") is True


def test_exit_status_is_the_shells_view() -> None:
    assert (exit_status(7, None), exit_status(None, 9), exit_status(None, None)) == (7, 137, 1)
