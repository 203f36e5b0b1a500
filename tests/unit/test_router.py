"""The transport-agnostic router (``mii_core.routing.router``) with the built-in schedulers."""
from __future__ import annotations

import pytest

from mii_core.errors import DeploymentUnavailable
from mii_core.routing.router import (HEALTH_INTERVAL_S, SILENT_PROBES_TO_STALL,
                                     STARTUP_HEALTH_INTERVAL_S, Router)
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
    router.lost(first)
    router.finished(first)
    assert {router.pick().index for _ in range(3)} == {1 - first.index}
    router.set_health(first.index, True)
    assert first.index in {router.pick().index for _ in range(2)}


def _healthy_router(count=2, scheduler=RoundRobinScheduler):
    router = _router(count, scheduler)
    for index in range(count):
        router.set_health(index, True)
    return router


def _routed(router, abandoned):
    """A call routed by ``router`` whose abandon action appends it to ``abandoned``."""
    call = router.route()
    call.on_abandon = lambda: abandoned.append(call)
    return call


def test_a_replica_answering_its_probes_keeps_its_calls_however_busy():
    router = _healthy_router()
    abandoned = []
    calls = [_routed(router, abandoned) for _ in range(4)]
    for _ in range(100):  # a long batch: probes keep answering SERVING
        router.set_health(0, True)
    router.set_health(1, False)  # answered NOT_SERVING (draining): finishes its calls
    for _ in range(SILENT_PROBES_TO_STALL - 1):
        router.unanswered(0)  # one miss (a loaded machine): out of routing, calls stay
    router.set_health(0, True)  # an answer resets the count
    for _ in range(SILENT_PROBES_TO_STALL - 1):
        router.unanswered(0)
    assert abandoned == [] and not any(c.abandoned for c in calls)
    assert [r["outstanding"] for r in router.describe()] == [2, 2]
    for call in calls:
        router.done(call)
    assert [r["outstanding"] for r in router.describe()] == [0, 0]


def test_calls_on_a_replica_that_stopped_answering_are_abandoned_once():
    router = _healthy_router()
    abandoned = []
    calls = [_routed(router, abandoned) for _ in range(4)]
    on_0 = [c for c in calls if c.replica.index == 0]
    for _ in range(SILENT_PROBES_TO_STALL + 2):
        router.unanswered(0)
    assert abandoned == on_0 and all(c.abandoned for c in on_0)
    assert not any(c.abandoned for c in calls if c not in on_0)
    assert {router.route().replica.index for _ in range(3)} == {1}


def test_retry_moves_a_call_to_each_healthy_replica_once_then_fails():
    router = _healthy_router(3, LeastOutstandingScheduler)
    call = router.route()
    assert call.replica.index == 0
    for _ in range(SILENT_PROBES_TO_STALL):
        router.unanswered(0)
    assert call.abandoned
    router.retry(call, delivered=False)
    assert call.replica.index == 1 and not call.abandoned and call.tried == {0, 1}
    assert router.scheduler.outstanding == [0, 1, 0]  # the scheduler followed it
    assert [r["routed"] for r in router.describe()] == [1, 1, 0]
    router.lost(call.replica)  # replica 1 went away during the call
    router.set_health(0, True)  # replica 0 answers again, but the call was there once
    router.retry(call, delivered=False)
    assert call.replica.index == 2
    router.lost(call.replica)
    with pytest.raises(DeploymentUnavailable, match="replica 2 at 127.0.0.1:5002 was lost "
                       "while serving the request, and no other healthy replica is left"):
        router.retry(call, delivered=False)
    router.done(call)
    assert router.scheduler.outstanding == [0, 0, 0]
    assert [r["outstanding"] for r in router.describe()] == [0, 0, 0]


def test_a_stream_that_sent_output_is_not_retried():
    router = _healthy_router()
    call = router.route()
    for _ in range(SILENT_PROBES_TO_STALL):
        router.unanswered(call.replica.index)
    with pytest.raises(DeploymentUnavailable, match=f"replica {call.replica.index} at .* "
                       "stopped answering in the middle of the stream"):
        router.retry(call, delivered=True)
    assert call.tried == {call.replica.index}
    router.done(call)


def test_when_every_replica_stopped_answering_their_calls_fail():
    router = _healthy_router()
    calls = [router.route() for _ in range(2)]
    for index in (0, 1):
        for _ in range(SILENT_PROBES_TO_STALL):
            router.unanswered(index)
    for call in calls:
        assert call.abandoned
        with pytest.raises(DeploymentUnavailable, match="stopped answering while serving the "
                           "request, and no other healthy replica is left"):
            router.retry(call, delivered=False)
        router.done(call)
    assert not router.serving


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
