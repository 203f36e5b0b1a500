"""The scheduler plugins ``round_robin`` and ``least_outstanding``, driven directly and
through the router (written from mutation testing: tools/mutation.py)."""
from __future__ import annotations

import pytest

from mii_core.errors import DeploymentUnavailable
from mii_core.routing.router import Router
from mii_core.routing.schedulers.least_outstanding import LeastOutstandingScheduler
from mii_core.routing.schedulers.round_robin import RoundRobinScheduler


def picks(scheduler, candidates, count):
    return [scheduler.pick(candidates) for _ in range(count)]


@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
def test_round_robin_request_n_goes_to_replica_n_mod_m(replicas):
    scheduler = RoundRobinScheduler(replicas)
    assert picks(scheduler, list(range(replicas)), 3 * replicas) == \
        [n % replicas for n in range(3 * replicas)]


def test_round_robin_skips_unhealthy_replicas_and_keeps_its_place():
    scheduler = RoundRobinScheduler(4)
    assert picks(scheduler, [0, 1, 2, 3], 2) == [0, 1]
    assert picks(scheduler, [0, 3], 3) == [3, 0, 3]  # 2 is skipped, then 1 and 2
    assert picks(scheduler, [0, 1, 2, 3], 4) == [0, 1, 2, 3]  # after 3 came 0 again
    assert picks(scheduler, [2], 2) == [2, 2]
    assert scheduler.pick([1, 3]) == 3  # the next after 2


def test_round_robin_candidates_order_does_not_matter():
    scheduler = RoundRobinScheduler(3)
    assert picks(scheduler, [2, 0, 1], 4) == [0, 1, 2, 0]


def test_round_robin_start_and_finish_change_nothing():
    scheduler = RoundRobinScheduler(2)
    scheduler.started(0)
    scheduler.finished(0)
    scheduler.started(1)
    assert picks(scheduler, [0, 1], 3) == [0, 1, 0]


def test_least_outstanding_picks_the_fewest_in_flight_lowest_index_on_ties():
    scheduler = LeastOutstandingScheduler(3)
    assert scheduler.outstanding == [0, 0, 0]
    assert scheduler.pick([0, 1, 2]) == 0  # a tie: the lowest index
    assert scheduler.pick([2, 1]) == 1
    scheduler.started(0)
    assert scheduler.outstanding == [1, 0, 0]
    assert scheduler.pick([0, 1, 2]) == 1
    scheduler.started(1)
    scheduler.started(1)
    assert scheduler.pick([0, 1]) == 0
    assert scheduler.pick([0, 1, 2]) == 2
    scheduler.started(2)
    assert scheduler.outstanding == [1, 2, 1]
    assert scheduler.pick([1, 2]) == 2


def test_least_outstanding_finished_decrements_but_never_below_zero():
    scheduler = LeastOutstandingScheduler(2)
    for _ in range(3):
        scheduler.started(1)
    scheduler.finished(1)
    assert scheduler.outstanding == [0, 2]
    scheduler.finished(0)  # a finish without a start (e.g. after a restart) stays at 0
    assert scheduler.outstanding == [0, 2]
    scheduler.started(0)
    assert scheduler.outstanding == [1, 2]
    scheduler.finished(1)
    scheduler.finished(1)
    scheduler.finished(1)
    assert scheduler.outstanding == [1, 0]
    assert scheduler.pick([0, 1]) == 1


def test_least_outstanding_one_counter_per_replica():
    assert LeastOutstandingScheduler(4).outstanding == [0, 0, 0, 0]
    assert LeastOutstandingScheduler(1).outstanding == [0]


def test_the_router_counts_requests_through_least_outstanding():
    router = Router(["a:1", "b:2"], LeastOutstandingScheduler(2))
    for index in (0, 1):
        router.set_health(index, True)
    first, second, third = router.pick(), router.pick(), router.pick()
    assert [first.index, second.index, third.index] == [0, 1, 0]
    router.finished(second)
    assert router.pick().index == 1
    router.set_health(1, False)
    assert router.pick().index == 0
    router.set_health(0, False)
    with pytest.raises(DeploymentUnavailable):
        router.pick()


def test_the_router_routes_round_robin_over_healthy_replicas():
    router = Router(["a:1", "b:2", "c:3"], RoundRobinScheduler(3))
    for index in range(3):
        router.set_health(index, True)
    assert [router.pick().index for _ in range(4)] == [0, 1, 2, 0]
    router.lost(router.replicas[1])
    assert [router.pick().index for _ in range(3)] == [2, 0, 2]
