"""Routing: which replica serves the next request. Transport-agnostic.

The load balancer of a transport probes each replica's health and forwards calls; the
router holds what those probes saw and decides: a request goes to a healthy replica
the scheduler plugin picks, the scheduler hears when it starts and ends, and a replica
lost in the middle of a call is marked unhealthy at once (the next probe may bring it
back). The deployment serves once every replica answered once, and while any is
healthy. Picking never awaits, so on one event loop the order of picks is the order of
arrival (exact round robin under concurrent clients).

A replica that stops answering (frozen by SIGSTOP, its process hung, its host cut off)
keeps its connections open, so the calls already on it would wait for it for ever. The
router tracks each call (``route`` / ``done``) and gives up on a replica's calls once its
probes went unanswered ``SILENT_PROBES_TO_STALL`` times in a row: each call is
abandoned (``RoutedCall.on_abandon``, the transport's). A call whose replica stopped
answering, or was lost under it (the transport saw the connection fail), is then moved
by ``retry`` to a healthy replica it has not been on when the client has seen none of
its output yet (a unary call, a stream that yielded nothing: for the client it never
ran; a sampled one without a seed gives another text, but none was seen); otherwise it
fails with DeploymentUnavailable naming the replica (a stream that yielded output
cannot be resumed elsewhere; no call outlives the last untried healthy replica, so when
all are unhealthy the calls fail). A replica that answers its probes keeps its calls
however long they take: its health service runs on the replica's gRPC event loop,
apart from the engine loop's thread, so a long batch still answers SERVING, and a
draining replica answers NOT_SERVING while it finishes its calls.

The bound: a call on a replica that froze ends (retried or failed) at most
``STALL_BOUND_S`` = 2 x (0.25 + 1.0) = 2.5 s after the freeze: the last answered probe can
be just before it, then each unanswered probe takes a probe timeout and the pause
between rounds (measured, tiny model on CPU: a stream's error 2.34-2.47 s after SIGSTOP,
median 2.45 s, over 12 freezes; tests/deployment/test_frozen_replica.py asserts < 10 s).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Sequence, Set

from mii_core.errors import DeploymentUnavailable
from mii_core.plugins.interfaces import Scheduler

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 0.25
STARTUP_HEALTH_INTERVAL_S = 0.05  # probe faster until every replica answered once
PROBE_TIMEOUT_S = 1.0  # a probe not answered within this is unanswered
# One unanswered probe only takes the replica out of routing: on a loaded machine a
# healthy replica can miss one (tests/deployment/test_replicas.py) and that costs a
# round of routing around it. Abandoning its calls costs a stream its output, so it
# takes a replica silent for two probes in a row (>= 2.25 s).
SILENT_PROBES_TO_STALL = 2
STALL_BOUND_S = SILENT_PROBES_TO_STALL * (HEALTH_INTERVAL_S + PROBE_TIMEOUT_S)


@dataclass
class ReplicaState:
    """One replica as the router sees it."""

    index: int
    address: str
    healthy: bool = False
    ever_healthy: bool = False
    routed: int = 0  # requests sent to it
    unanswered: int = 0  # probes in a row that got no answer


def _nothing() -> None:
    """The abandon action of a call whose transport has not set one yet."""


@dataclass(eq=False)
class RoutedCall:
    """One request in flight, from ``Router.route`` to ``Router.done``."""

    replica: ReplicaState  # serving it now
    tried: Set[int] = field(default_factory=set)  # every replica it was sent to
    abandoned: bool = False  # ``replica`` stopped answering: the transport stops waiting
    on_abandon: Callable[[], None] = _nothing  # set by the transport for each attempt


class Router:
    """Health, picking and accounting over the replicas at ``addresses``."""

    def __init__(self, addresses: Sequence[str], scheduler: Scheduler) -> None:
        self.replicas = [ReplicaState(i, address) for i, address in enumerate(addresses)]
        self.scheduler = scheduler
        # Per replica, its calls in the order they came (a dict as an ordered set).
        self._calls: List[Dict[RoutedCall, None]] = [{} for _ in self.replicas]

    @property
    def serving(self) -> bool:
        """Every replica answered once, and one at least is healthy now."""
        return (all(r.ever_healthy for r in self.replicas)
                and any(r.healthy for r in self.replicas))

    def health_interval(self) -> float:
        """Seconds until the next round of health probes."""
        started = all(r.ever_healthy for r in self.replicas)
        return HEALTH_INTERVAL_S if started else STARTUP_HEALTH_INTERVAL_S

    @property
    def probe_timeout(self) -> float:
        """Seconds a probe waits for its answer; after that it is ``unanswered``."""
        return PROBE_TIMEOUT_S

    def set_health(self, index: int, healthy: bool) -> None:
        """Record a probe's answer (logged when it changes)."""
        self._set(self.replicas[index], healthy)
        self.replicas[index].unanswered = 0

    def unanswered(self, index: int) -> None:
        """A probe of replica ``index`` got no answer: out of routing now; at
        ``SILENT_PROBES_TO_STALL`` in a row, every call on it is abandoned."""
        replica = self.replicas[index]
        self._set(replica, False, "no answer to its health check")
        replica.unanswered += 1
        if replica.unanswered < SILENT_PROBES_TO_STALL:
            return
        stalled = [call for call in self._calls[index] if not call.abandoned]
        if stalled:
            log.warning("replica %d at %s stopped answering (%d health checks in a row): "
                        "giving up on its %d call(s) in flight", index, replica.address,
                        replica.unanswered, len(stalled))
        for call in stalled:
            call.abandoned = True
            call.on_abandon()

    def _set(self, replica: ReplicaState, healthy: bool, why: str = "") -> None:
        if healthy != replica.healthy:
            log.info("replica %d at %s is %s%s", replica.index, replica.address,
                     "healthy" if healthy else "unhealthy", f" ({why})" if why else "")
        replica.healthy = healthy
        replica.ever_healthy |= healthy

    def pick(self) -> ReplicaState:
        """The replica for the next request (the scheduler is told it started)."""
        candidates = [r.index for r in self.replicas if r.healthy]
        if not candidates:
            raise DeploymentUnavailable("no replica of the deployment is healthy right now")
        return self._start(candidates)

    def _start(self, candidates: List[int]) -> ReplicaState:
        chosen = self.replicas[self.scheduler.pick(candidates)]
        chosen.routed += 1
        self.scheduler.started(chosen.index)
        return chosen

    def finished(self, replica: ReplicaState) -> None:
        """A request picked for ``replica`` ended, whatever its outcome."""
        self.scheduler.finished(replica.index)

    def route(self) -> RoutedCall:
        """A new request on the replica ``pick`` chooses, tracked until ``done`` so that it
        is abandoned if that replica stops answering."""
        call = RoutedCall(self.pick())
        self._track(call)
        return call

    def retry(self, call: RoutedCall, delivered: bool) -> None:
        """``call``'s replica stopped answering (``call.abandoned``) or was lost: move it to
        a healthy replica it has not been on. DeploymentUnavailable, naming the replica,
        if the client already got output of it (``delivered``) or none is left."""
        failed = call.replica
        what = (f"replica {failed.index} at {failed.address} "
                + ("stopped answering" if call.abandoned else "was lost"))
        if delivered:
            raise DeploymentUnavailable(f"{what} in the middle of the stream; what it sent "
                                        "cannot be resumed on another replica: retry")
        candidates = [r.index for r in self.replicas
                      if r.healthy and r.index not in call.tried]
        if not candidates:
            raise DeploymentUnavailable(f"{what} while serving the request, and no other "
                                        "healthy replica is left to retry it on")
        self._release(call)
        call.replica, call.abandoned, call.on_abandon = self._start(candidates), False, _nothing
        self._track(call)
        log.info("%s; the request, which had sent nothing yet, was retried on replica %d",
                 what, call.replica.index)

    def done(self, call: RoutedCall) -> None:
        """``call`` ended, whatever its outcome."""
        self._release(call)

    def _track(self, call: RoutedCall) -> None:
        call.tried.add(call.replica.index)
        self._calls[call.replica.index][call] = None

    def _release(self, call: RoutedCall) -> None:
        self._calls[call.replica.index].pop(call, None)
        self.finished(call.replica)

    def lost(self, replica: ReplicaState) -> None:
        """``replica`` went away during a call: unhealthy until a probe says otherwise."""
        self._set(replica, False, "lost during a call")

    def describe(self) -> List[Dict]:
        """Each replica's address, health, routed count and calls in flight (for
        ``info()``)."""
        return [dict({key: value for key, value in asdict(r).items()
                      if key not in ("ever_healthy", "unanswered")},
                     outstanding=len(self._calls[r.index]))
                for r in self.replicas]
