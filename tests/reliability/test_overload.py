"""Twice the measured capacity on a real `musiq serve` for OVERLOAD_S (CI; the several-minute run
is `python -m tests.reliability.load`, figures in tests/reliability/README.md)."""

from __future__ import annotations

from tests.reliability.load import DEADLINE_S, SERVER_ENV, run

OVERLOAD_S = 12.0
RSS_LIMIT_MIB = 1024


def test_twice_capacity_is_answered_shed_with_retry_after_and_bounded() -> None:
    capacity, report = run(OVERLOAD_S, factor=2.0, capacity_s=6.0)
    print(f"\ncapacity {capacity:.1f}/s; {report}")
    assert capacity > 0
    assert report.achieved_rate > 1.6 * capacity, "the generator did not reach twice the capacity"
    assert report.transport_errors == {} and report.client_cap_hits == 0, report
    assert set(report.statuses) <= {"200", "429", "503"}, report.statuses
    assert sum(report.statuses.values()) == report.sent  # every request answered
    assert report.refused_without_retry_after == 0
    assert report.statuses.get("200", 0) > 0 and report.statuses.get("429", 0) > 0, report.statuses
    assert report.accepted_p99_s < DEADLINE_S, report
    assert report.max_queue_depth <= int(SERVER_ENV["MUSIQ_MAX_QUEUE_ITEMS"]), report
    assert report.max_rss_mib < RSS_LIMIT_MIB, report
