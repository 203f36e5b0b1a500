"""Where transport threads hand requests to rank 0's loop thread.

``submit`` runs on a transport thread: it applies the queue limit, counted in prompts
(room for the request's prompts is reserved before tokenizing, so a request the queue
cannot take costs no tokenizing, and requests being tokenized at once cannot overfill
it), tokenizes (``intake.py``), runs the ``mii_request_started`` hook (which may
reject) and queues the request. The loop thread takes everything queued at a step
boundary (``take``), so the scheduler is only ever touched by the loop. Cancels and
``stop`` wake the loop; an idle loop sends the other ranks a heartbeat every
``IDLE_HEARTBEAT_S``.
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional

from mii_core.config.models import GenerateParamsConfig
from mii_core.errors import DeploymentUnavailable, ServerOverloaded
from mii_core.plugins.interfaces import RequestInfo, TokenEvent
from mii_core.routing.stats import ServingMetrics
from mii_engines.runtime.intake import Intake
from mii_engines.runtime.requests import Request

IDLE_HEARTBEAT_S = 5.0  # followers of a TP replica hear from rank 0 at least this often


class RequestHandle:
    """Lets the transport cancel a request."""

    def __init__(self, inbox: "Inbox", request: Request) -> None:
        self._inbox, self._request = inbox, request

    def cancel(self) -> None:
        """Stop the request; its sequences leave at the next step."""
        self._request.cancelled = True
        self._inbox.wake(cancelled=True)


@dataclass
class Arrivals:
    """What the loop thread takes at a step boundary."""

    requests: List[Request]
    cancelled: bool  # some request was cancelled since the last take
    stopping: bool


class Inbox:
    """Thread-safe queue of submitted requests, drained by the loop thread."""

    def __init__(self, intake: Intake, metrics: ServingMetrics, max_queue_size: int,
                 on_started: Optional[Callable[[RequestInfo], None]] = None) -> None:
        self.intake = intake
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.on_started = on_started
        self.accepted = 0
        self._queue: Deque[Request] = deque()
        self._reserved = 0  # prompts of requests being tokenized
        self._cond = threading.Condition()
        self._stopping = self._cancelled = False
        self._ids = itertools.count(1)

    def submit(self, prompts: List[str], params: GenerateParamsConfig,
               sink: Callable[[TokenEvent], None], waiting: Callable[[], int]) -> RequestHandle:
        """Reserve room, tokenize and queue a request; ``waiting()`` counts prompts the
        scheduler holds. Raises InvalidGenerateParams / ServerOverloaded /
        DeploymentUnavailable."""
        try:
            self._reserve(len(prompts), waiting)
            try:
                request = self.intake.request(next(self._ids), prompts, params, sink)
                if self.on_started:  # before queueing: a hook that raises rejects the request
                    self.on_started(request.info)
            except BaseException:
                with self._cond:
                    self._reserved -= len(prompts)
                raise
            with self._cond:  # the reservation becomes the queued request at once
                self._reserved -= len(prompts)
                if self._stopping:
                    raise DeploymentUnavailable("the replica is shutting down")
                self._queue.append(request)
                self.accepted += 1
                self._cond.notify()
        except Exception:
            self.metrics.requests["rejected"] += 1
            raise
        return RequestHandle(self, request)

    def _reserve(self, count: int, waiting: Callable[[], int]) -> None:
        with self._cond:
            if self._stopping:
                raise DeploymentUnavailable("the replica is shutting down")
            queued = waiting() + self.pending_prompts()
            if queued + count > self.max_queue_size:
                raise ServerOverloaded(f"the replica's queue is full ({queued} prompts waiting, "
                                       f"max_queue_size={self.max_queue_size}) for the "
                                       f"request's {count}; retry later")
            self._reserved += count

    def pending_prompts(self) -> int:
        """Prompts submitted and not yet taken by the loop (being tokenized or queued)."""
        return self._reserved + sum(len(r.sequences) for r in list(self._queue))

    def stop(self) -> None:
        """Refuse new requests and wake the loop so that it ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def wake(self, cancelled: bool = False) -> None:
        """Make the loop look at its requests again (e.g. one was cancelled)."""
        with self._cond:
            self._cancelled |= cancelled
            self._cond.notify()

    def take(self, busy: bool, heartbeat: Callable[[], None]) -> Arrivals:
        """On the loop thread: wait while there is nothing to do (``busy`` false, no
        request, no stop), calling ``heartbeat`` every IDLE_HEARTBEAT_S; then take."""
        with self._cond:
            while not (busy or self._stopping or self._queue):
                if not self._cond.wait(timeout=IDLE_HEARTBEAT_S):
                    heartbeat()
            taken, cancelled = list(self._queue), self._cancelled
            self._queue.clear()
            self._cancelled = False
            return Arrivals(taken, cancelled, self._stopping)
