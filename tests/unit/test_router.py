"""The transport-agnostic router (``mii_core.routing.router``) with the built-in schedulers."""
from __future__ import annotations

import pytest

from mii_core.errors import DeploymentUnavailable
from mii_core.routing.router import HEALTH_INTERVAL_S, STARTUP_HEALTH_INTERVAL_S, Router
from mii_core.routing.schedulers.least_outstanding import LeastOutstandingScheduler
from mii_core.routing.schedulers.round_robin import RoundRobinScheduler


def _router(count=3, scheduler=RoundRobinScheduler):
    return Router([f"127.0.0.1:{5000 + i}" for i in range(count)], scheduler(count))


def test_serving_once_every_replica_answered_and_while_one_is_healthy():
    router = _router(2)
    assert not router.serving and router.health_interval() == STARTUP_HEALTH_INTERVAL_S
    router.set_health(0, True)
    assert not router.serving  # replica 1 never answered yet
    router.set_health(1, True)
    assert router.serving and router.health_interval() == HEALTH_INTERVAL_S
    router.set_health(0, False)
    assert router.serving
    router.set_health(1, False)
    assert not router.serving
    with pytest.raises(DeploymentUnavailable, match="no replica"):
        router.pick()


def test_round_robin_over_the_healthy_replicas_in_arrival_order():
    router = _router(3)
    for index in range(3):
        router.set_health(index, True)
    order = [router.pick().index for _ in range(6)]
    assert order == [0, 1, 2, 0, 1, 2]
    router.set_health(1, False)
    assert [router.pick().index for _ in range(4)] == [0, 2, 0, 2]
    assert [r["routed"] for r in router.describe()] == [4, 2, 4]


def test_a_lost_replica_is_skipped_until_a_probe_brings_it_back():
    router = _router(2)
    router.set_health(0, True)
    router.set_health(1, True)
    first = router.pick()
    error = router.lost(first)
    assert isinstance(error, DeploymentUnavailable) and "retry" in str(error)
    router.finished(first)
    assert {router.pick().index for _ in range(3)} == {1 - first.index}
    router.set_health(first.index, True)
    assert first.index in {router.pick().index for _ in range(2)}


def test_least_outstanding_hears_when_requests_end():
    router = _router(2, LeastOutstandingScheduler)
    router.set_health(0, True)
    router.set_health(1, True)
    busy = router.pick()
    other = router.pick()
    assert other.index != busy.index
    router.finished(other)
    assert router.pick().index == other.index  # busy still has one outstanding


def test_replica_stats_round_trip_through_their_wire_form():
    from mii_core.routing.stats import ReplicaStats, ServingMetrics

    metrics = ServingMetrics()
    metrics.time_to_first_token.observe(0.02)
    metrics.requests["ok"] += 2
    stats = ReplicaStats(replica=1, requests=2, finished=2, kv={"kind": "paged"},
                         metrics=metrics.snapshot(queue_depth=3, running=1))
    wire = stats.to_dict()
    assert ReplicaStats.from_dict(wire) == stats
    wire["from_a_newer_replica"] = 1
    wire["metrics"]["also_newer"] = 2
    assert ReplicaStats.from_dict(wire) == stats  # unknown keys are ignored
    assert ReplicaStats.from_dict(None) is None and ReplicaStats.from_dict({}) is None
    assert stats.metrics.time_to_first_token_seconds["count"] == 1
