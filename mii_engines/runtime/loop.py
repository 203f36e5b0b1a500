"""The in-flight batching loop of rank 0: requests join and leave at step boundaries.

Each step the scheduler decides who runs (``scheduler.py``), the executor runs the
forward and samples (``executor.py``), and the output stage turns the previous
step's tokens into text and events (``output.py``). Requests arrive from transport
threads through the inbox (``inbox.py``), which the loop empties at each step, so
the scheduler is never shared between threads.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import torch

from mii_core.config.models import GenerateParamsConfig
from mii_core.plugins.interfaces import RequestInfo, TokenEvent
from mii_core.routing.stats import ReplicaStats
from mii_engines.runtime.executor import Executor, InFlight
from mii_engines.runtime.inbox import Inbox, RequestHandle
from mii_engines.runtime.intake import Intake
from mii_engines.runtime.output import Outputs
from mii_engines.runtime.plan import StepPlan
from mii_engines.runtime.scheduler import Scheduler

log = logging.getLogger(__name__)


class EngineLoop:
    """Serves requests on rank 0 of a replica; ``run`` drives it on a thread of its own."""

    def __init__(self, intake: Intake, scheduler: Scheduler, executor: Executor,
                 outputs: Outputs, max_queue_size: int,
                 on_started: Optional[Callable[[RequestInfo], None]] = None) -> None:
        self.scheduler, self.executor, self.outputs = scheduler, executor, outputs
        self.inbox = Inbox(intake, outputs.metrics, max_queue_size, on_started)
        self.counters: Dict[str, int] = {"steps": 0, "prefills": 0, "prefill_rows": 0}
        self.failed: Optional[BaseException] = None
        self._inflight: Optional[InFlight] = None
        self._warm_up_left = True  # until the cache says its deferred warm-up is done

    # -- transport threads (GenerationService) -------------------------------------------
    def submit(self, prompts: List[str], params: GenerateParamsConfig,
               sink: Callable[[TokenEvent], None]) -> RequestHandle:
        """Tokenize and queue a request; raises InvalidGenerateParams / ServerOverloaded."""
        return self.inbox.submit(prompts, params, sink, lambda: len(self.scheduler.waiting))

    def stats(self) -> ReplicaStats:
        """Counters, queue depth, batch size, metrics and the KV cache's figures."""
        metrics = self.outputs.metrics
        queued = len(self.scheduler.waiting) + self.inbox.pending_prompts()
        running = len(self.scheduler.running)
        kv, state = self.scheduler.space.stats(), self.executor.state.stats()
        kv.bytes_total, kv.padded_rows = state.bytes_total, state.padded_rows
        kv.deferred_graphs = state.deferred_graphs
        kv.preemptions = self.scheduler.preemptions
        return ReplicaStats(
            replica=self.inbox.intake.replica, requests=self.inbox.accepted,
            finished=metrics.requests["ok"], cancelled=metrics.requests["cancelled"],
            errors=metrics.requests["error"], padded_prefill_rows=state.padded_rows,
            tokens_generated=metrics.tokens_generated, queue_depth=queued, running=running,
            kv=asdict(kv), metrics=metrics.snapshot(queued, running), **self.counters)

    def stop(self) -> None:
        """Ask the loop to finish (sequences in flight are cancelled)."""
        self.inbox.stop()

    # -- the loop thread -----------------------------------------------------------------
    def run(self) -> None:
        """Step until ``stop()``. A failing step (out of memory, a dead tensor-parallel
        peer) fails every request in flight or queued, then re-raises: the replica must
        exit so that the supervisor restarts it."""
        reason = "the replica is shutting down"
        try:
            with torch.inference_mode():
                while self._take_arrivals():
                    self._step()
        except Exception as error:
            self.failed = error
            reason = f"the engine failed: {type(error).__name__}: {error}"
            log.exception("engine step failed; failing all requests")
            self.inbox.stop()
            raise
        finally:
            self._end_all(reason)
            if self.failed is None:
                self.executor.shutdown()

    def _take_arrivals(self) -> bool:
        # Idle (nothing scheduled, in flight or submitted): the cache's deferred warm-up
        # runs one piece at a time, so that a request arriving waits for one piece at most.
        if (self._warm_up_left and self._inflight is None and not self.scheduler.has_work()
                and not self.inbox.pending_prompts()):
            self._warm_up_left = self.executor.warm_up_step()
        busy = self.scheduler.has_work() or self._warm_up_left
        arrivals = self.inbox.take(busy, self.executor.heartbeat)
        for request in arrivals.requests:
            self.scheduler.add(request.sequences)
        if arrivals.cancelled:
            self.scheduler.note_cancel()
        return not arrivals.stopping

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
        tokens = self.executor.read(step)  # waits for the step's device work
        now = time.time()  # after the wait: token times (TTFT, ITL) include the step itself
        for seq, token in zip(step.rows, tokens):
            self.outputs.token(seq, token, now)

    def _end_all(self, why: str) -> None:
        for request in self.inbox.take(True, lambda: None).requests:
            self.scheduler.add(request.sequences)
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
