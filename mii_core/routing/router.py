"""Routing: which replica serves the next request. Transport-agnostic.

The load balancer of a transport probes each replica's health and forwards calls; the
router holds what those probes saw and decides: a request goes to a healthy replica
the scheduler plugin picks, the scheduler hears when it starts and ends, and a replica
lost in the middle of a call is marked unhealthy at once (the next probe may bring it
back). The deployment serves once every replica answered once, and while any is
healthy. Picking never awaits, so on one event loop the order of picks is the order of
arrival (exact round robin under concurrent clients).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

from mii_core.errors import DeploymentUnavailable
from mii_core.plugins.interfaces import Scheduler

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 0.25
STARTUP_HEALTH_INTERVAL_S = 0.05  # probe faster until every replica answered once


@dataclass
class ReplicaState:
    """One replica as the router sees it."""

    index: int
    address: str
    healthy: bool = False
    ever_healthy: bool = False
    routed: int = 0  # requests sent to it


class Router:
    """Health, picking and accounting over the replicas at ``addresses``."""

    def __init__(self, addresses: Sequence[str], scheduler: Scheduler) -> None:
        self.replicas = [ReplicaState(i, address) for i, address in enumerate(addresses)]
        self.scheduler = scheduler

    @property
    def serving(self) -> bool:
        """Every replica answered once, and one at least is healthy now."""
        return (all(r.ever_healthy for r in self.replicas)
                and any(r.healthy for r in self.replicas))

    def health_interval(self) -> float:
        """Seconds until the next round of health probes."""
        started = all(r.ever_healthy for r in self.replicas)
        return HEALTH_INTERVAL_S if started else STARTUP_HEALTH_INTERVAL_S

    def set_health(self, index: int, healthy: bool) -> None:
        """Record a probe's answer (logged when it changes)."""
        replica = self.replicas[index]
        if healthy != replica.healthy:
            log.info("replica %d at %s is %s", index, replica.address,
                     "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        replica.ever_healthy |= healthy

    def pick(self) -> ReplicaState:
        """The replica for the next request (the scheduler is told it started)."""
        candidates = [r.index for r in self.replicas if r.healthy]
        if not candidates:
            raise DeploymentUnavailable("no replica of the deployment is healthy right now")
        chosen = self.replicas[self.scheduler.pick(candidates)]
        chosen.routed += 1
        self.scheduler.started(chosen.index)
        return chosen

    def finished(self, replica: ReplicaState) -> None:
        """A request picked for ``replica`` ended, whatever its outcome."""
        self.scheduler.finished(replica.index)

    def lost(self, replica: ReplicaState) -> DeploymentUnavailable:
        """``replica`` went away during a call: unhealthy until a probe says otherwise;
        returns the error the caller gets."""
        self.set_health(replica.index, False)
        return DeploymentUnavailable(f"replica {replica.index} was lost while serving the "
                                     "request; retry")

    def describe(self) -> List[Dict]:
        """Each replica's address, health and routed count (for ``info()``)."""
        return [{key: value for key, value in asdict(r).items() if key != "ever_healthy"}
                for r in self.replicas]
