"""The in-flight batching loop of rank 0: requests join and leave at step boundaries.

Each step the scheduler decides who runs (``scheduler.py``), the executor runs the
forward and samples (``executor.py``), and the output stage turns the previous
step's tokens into text and events (``output.py``). Requests come in from transport
threads through ``submit`` (tokenized there, ``intake.py``) and wait in an inbox
that the loop thread empties at each step, so the scheduler is never shared.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Callable, Deque, Dict, List, Optional

import torch

from mii_core.config.models import GenerateParamsConfig
from mii_core.errors import DeploymentUnavailable, ServerOverloaded
from mii_core.plugins.interfaces import RequestInfo, TokenEvent
from mii_core.routing.stats import ReplicaStats
from mii_engines.runtime.executor import Executor, InFlight
from mii_engines.runtime.intake import Intake
from mii_engines.runtime.output import Outputs
from mii_engines.runtime.plan import StepPlan
from mii_engines.runtime.requests import Request
from mii_engines.runtime.scheduler import Scheduler

log = logging.getLogger(__name__)
IDLE_HEARTBEAT_S = 5.0  # followers of a TP replica hear from rank 0 at least this often


class RequestHandle:
    """Lets the transport cancel a request."""

    def __init__(self, loop: "EngineLoop", request: Request) -> None:
        self._loop, self._request = loop, request

    def cancel(self) -> None:
        """Stop the request; its sequences leave at the next step."""
        self._request.cancelled = True
        self._loop.wake(cancelled=True)


class EngineLoop:
    """Serves requests on rank 0 of a replica; ``run`` drives it on a thread of its own."""

    def __init__(self, intake: Intake, scheduler: Scheduler, executor: Executor,
                 outputs: Outputs, max_queue_size: int,
                 on_started: Optional[Callable[[RequestInfo], None]] = None) -> None:
        self.intake, self.scheduler, self.executor, self.outputs = (intake, scheduler, executor,
                                                                    outputs)
        self.max_queue_size = max_queue_size
        self.on_started = on_started
        self.metrics = outputs.metrics
        self.counters: Dict[str, int] = {"requests": 0, "steps": 0, "prefills": 0,
                                         "prefill_rows": 0}
        self.failed: Optional[BaseException] = None
        self._inbox: Deque[Request] = deque()
        self._inflight: Optional[InFlight] = None
        self._cond = threading.Condition()
        self._stopping = False
        self._cancelled = False
        self._ids = itertools.count(1)

    # -- called from transport threads -------------------------------------------------
    def submit(self, prompts: List[str], params: GenerateParamsConfig,
               sink: Callable[[TokenEvent], None]) -> RequestHandle:
        """Tokenize and queue a request; raises InvalidGenerateParams / ServerOverloaded."""
        try:
            request = self.intake.request(next(self._ids), prompts, params, sink)
            if self.on_started:  # before queueing: a hook that raises rejects the request
                self.on_started(request.info)
            with self._cond:
                if self._stopping:
                    raise DeploymentUnavailable("the replica is shutting down")
                queued = self.queued_prompts()
                if queued + len(prompts) > self.max_queue_size:
                    raise ServerOverloaded(f"the replica's queue is full ({queued} prompts "
                                           f"waiting, max_queue_size={self.max_queue_size}); "
                                           "retry later")
                self._inbox.append(request)
                self.counters["requests"] += 1
                self._cond.notify()
        except Exception:
            self.metrics.requests["rejected"] += 1
            raise
        return RequestHandle(self, request)

    def queued_prompts(self) -> int:
        """Prompts waiting for admission (read without the loop's cooperation)."""
        return len(self.scheduler.waiting) + sum(len(r.sequences) for r in list(self._inbox))

    def stats(self) -> ReplicaStats:
        """Counters, queue depth, batch size, metrics and the KV cache's figures."""
        outcomes = self.metrics.requests
        queued, running = self.queued_prompts(), len(self.scheduler.running)
        kv = self.scheduler.space.stats()
        state = self.executor.state.stats()
        kv.bytes_total, kv.padded_rows = state.bytes_total, state.padded_rows
        kv.preemptions = self.scheduler.preemptions
        return ReplicaStats(replica=self.intake.replica, finished=outcomes["ok"],
                            cancelled=outcomes["cancelled"], errors=outcomes["error"],
                            padded_prefill_rows=state.padded_rows,
                            tokens_generated=self.metrics.tokens_generated,
                            queue_depth=queued, running=running, kv=asdict(kv),
                            metrics=self.metrics.snapshot(queued, running), **self.counters)

    def stop(self) -> None:
        """Ask the loop to finish (sequences in flight are cancelled)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def wake(self, cancelled: bool = False) -> None:
        """Make the loop look at its requests again (e.g. one was cancelled)."""
        with self._cond:
            self._cancelled |= cancelled
            self._cond.notify()

    # -- the loop thread -----------------------------------------------------------------
    def run(self) -> None:
        """Step until ``stop()``. A failing step (out of memory, a dead tensor-parallel
        peer) fails every request in flight or queued, then re-raises: the replica must
        exit so that the supervisor restarts it."""
        reason = "the replica is shutting down"
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    self._step()
        except Exception as error:
            self.failed = error
            reason = f"the engine failed: {type(error).__name__}: {error}"
            log.exception("engine step failed; failing all requests")
            with self._cond:
                self._stopping = True
            raise
        finally:
            self._end_all(reason)
            if self.failed is None:
                self.executor.shutdown()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not (self._stopping or self._inbox or self.scheduler.has_work()):
                if not self._cond.wait(timeout=IDLE_HEARTBEAT_S):
                    self.executor.heartbeat()
            while self._inbox:
                self.scheduler.add(self._inbox.popleft().sequences)
            if self._cancelled:
                self._cancelled = False
                self.scheduler.note_cancel()
            return not self._stopping

    def _step(self) -> None:
        schedule = self.scheduler.schedule()
        for seq in schedule.left:
            self.outputs.cancel(seq)
        previous, self._inflight = self._inflight, None
        plan: StepPlan = schedule.plan
        if plan.decode_slots or plan.chunks or plan.keep is not None or plan.release:
            if plan.chunks:
                self.counters["prefills"] += 1
                self.counters["prefill_rows"] += len(plan.chunks)
            self._inflight = self.executor.launch(schedule)
            self.counters["steps"] += self._inflight is not None
        if previous is not None:
            self._process(previous)
        if not self.executor.pipelined and self._inflight is not None:
            current, self._inflight = self._inflight, None
            self._process(current)

    def _process(self, step: InFlight) -> None:
        now = time.time()
        for seq, token in zip(step.rows, self.executor.read(step)):
            self.outputs.token(seq, token, now)

    def _end_all(self, why: str) -> None:
        with self._cond:
            for request in self._inbox:
                self.scheduler.add(request.sequences)
            self._inbox.clear()
        admitted, queued = self.scheduler.drain()
        for seq in admitted:
            if self.failed is not None:  # their step failed with the error
                self.outputs.fail(seq, why)
            else:
                self.outputs.cancel(seq)
        for seq in queued:
            self.outputs.cancel(seq)
        log.info("engine loop stopped: %s", why)


def follow(state, receive: Callable[[], StepPlan]) -> None:
    """The loop of ranks > 0: apply every plan rank 0 broadcasts until shutdown."""
    with torch.inference_mode():
        while True:
            plan = receive()
            if plan.shutdown:
                return
            state.apply(plan)
