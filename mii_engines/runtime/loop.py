"""The in-flight batching loop: requests join and leave the running batch at step boundaries.

Rank 0 owns the queue. Each step it decides which rows leave, which token each
running row feeds, and which queued prompts join; it broadcasts that plan so
every rank of a tensor-parallel replica runs the same forward, then samples on
rank 0 with each row's own parameters and stop conditions. Tokens stream to
each request's sink as they are produced.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional

import torch

from mii_core.config.models import GenerateParamsConfig
from mii_core.constants import GenerationFinishReason as Finish
from mii_core.errors import (
    DeploymentUnavailable,
    InvalidGenerateParams,
    ServerOverloaded,
)
from mii_core.plugins.interfaces import LoadedModel, RequestInfo, TokenEvent
from mii_core.routing.stats import ServingMetrics
from mii_engines.runtime.detokenize import TextStream
from mii_engines.runtime.kv.dynamic import (
    PREFILL_TOKENS_PER_STEP,
    PREFILL_TOKENS_WHILE_DECODING,
    BatchState,
    StepPlan,
)
from mii_engines.runtime.runner.host_copy import to_device
from mii_engines.runtime.sampling import RowParams, row_params, sample

log = logging.getLogger(__name__)
IDLE_HEARTBEAT_S = 5.0  # followers of a TP replica hear from rank 0 at least this often


@dataclass
class _Request:
    info: RequestInfo
    sink: Callable[[TokenEvent], None]
    prompts: List[List[int]]
    budgets: List[int]
    cancelled: bool = False
    pending: int = 0  # prompts not yet finished
    admitted: int = 0  # prompts that joined the batch so far


@dataclass
class _Row:
    request: _Request
    index: int
    prompt: List[int]
    budget: int
    text: TextStream
    eos: Optional[int]
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    last: Optional[int] = None
    launched: int = 0  # forwards that produced a token for this row (some maybe unread)
    finish: Optional[str] = None

    @property
    def params(self) -> GenerateParamsConfig:
        return self.request.info.params


class RequestHandle:
    """Lets the transport cancel a request."""

    def __init__(self, generator: "Generator", request: _Request) -> None:
        self._generator, self._request = generator, request

    def cancel(self) -> None:
        """Stop the request; its rows leave the batch at the next step."""
        self._request.cancelled = True
        self._generator._wake()


class Generator:
    """Serves requests on rank 0 of a replica (``run`` drives the loop)."""

    def __init__(self, loaded: LoadedModel, replica: int, max_batch_size: int,
                 max_queue_size: int, broadcast: Optional[Callable[[StepPlan], None]] = None,
                 on_finished: Optional[Callable[[RequestInfo, str], None]] = None,
                 on_started: Optional[Callable[[RequestInfo], None]] = None,
                 sync_debug: bool = False, profile_model_time: bool = False,
                 state: Optional[Any] = None, pipelined: Optional[bool] = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.replica = replica
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.state = state or BatchState(loaded.model, loaded.device)
        self.broadcast = broadcast
        self.on_finished = on_finished
        self.on_started = on_started
        self.sync_debug = sync_debug
        self.profile_model_time = profile_model_time
        self._model_time = 0.0
        self.eos = self.tokenizer.eos_token_id
        self._queue: Deque[_Request] = deque()
        self._rows: List[_Row] = []
        self._row_params: Optional[RowParams] = None  # of self._rows; rebuilt when they change
        self.pipelined = (pipelined if pipelined is not None else broadcast is None
                          and getattr(self.state, "takes_device_tokens", False)
                          and loaded.device.type == "cuda")
        self._inflight: Optional[tuple] = None  # (rows, host tokens) of the step last launched
        self._device_tokens: Optional[torch.Tensor] = None
        self._pinned: Optional[List[torch.Tensor]] = None
        self._copied: List[Any] = []
        self._flip = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count(1)
        # prefills: steps that admitted rows; prefill_rows: rows admitted (their ratio
        # says how well arrivals were batched).
        self.counters: Dict[str, int] = {"requests": 0, "steps": 0, "prefills": 0,
                                         "prefill_rows": 0}
        self.metrics = ServingMetrics()
        self.failed: Optional[BaseException] = None

    # -- called from transport threads -------------------------------------------------
    def submit(self, prompts: List[str], params: GenerateParamsConfig,
               sink: Callable[[TokenEvent], None]) -> RequestHandle:
        """Tokenize and queue a request; invalid prompts raise InvalidGenerateParams."""
        try:
            return self._submit(prompts, params, sink)
        except Exception:
            self.metrics.requests["rejected"] += 1
            raise

    def _submit(self, prompts: List[str], params: GenerateParamsConfig,
                sink: Callable[[TokenEvent], None]) -> RequestHandle:
        encoded, budgets = [], []
        for index, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not ids:
                raise InvalidGenerateParams(f"prompts[{index}]: the prompt encodes to no tokens")
            budget = params.new_token_budget(len(ids), self.loaded.context_length)
            if budget < 1:
                limit = min(params.max_length, self.loaded.context_length)
                raise InvalidGenerateParams(
                    f"prompts[{index}]: the prompt has {len(ids)} tokens, which leaves no room "
                    f"to generate under max_length={params.max_length} (the model accepts "
                    f"{self.loaded.context_length} tokens; the limit here is {limit})")
            encoded.append(ids)
            budgets.append(budget)
        info = RequestInfo(next(self._ids), len(prompts), params, self.replica, time.time(),
                           prompt_tokens=[len(ids) for ids in encoded])
        if self.on_started:  # before queueing: a hook that raises rejects the request
            self.on_started(info)
        request = _Request(info, sink, encoded, budgets, pending=len(prompts))
        with self._cond:
            if self._stopping:
                raise DeploymentUnavailable("the replica is shutting down")
            if len(self._queue) >= self.max_queue_size:
                raise ServerOverloaded(f"the replica's queue is full ({self.max_queue_size} "
                                       "requests waiting); retry later")
            self._queue.append(request)
            self.counters["requests"] += 1
            self._cond.notify()
        return RequestHandle(self, request)

    def stats(self) -> Dict[str, Any]:
        """Counters plus current queue depth and batch size."""
        outcomes = self.metrics.requests
        graphs = getattr(self.state, "prefill_graphs", None)
        return dict(self.counters, finished=outcomes["ok"], cancelled=outcomes["cancelled"],
                    padded_prefill_rows=graphs.padded_rows if graphs else 0,
                    errors=outcomes["error"], tokens_generated=self.metrics.tokens_generated,
                    queue_depth=len(self._queue), running=len(self._rows), replica=self.replica,
                    metrics=self.metrics.snapshot(len(self._queue), len(self._rows)))

    def stop(self) -> None:
        """Ask the loop to finish (in-flight rows are cancelled)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        """Generate until ``stop()``; call from the engine thread.

        A failing step (e.g. out of memory, a dead tensor-parallel peer) fails every
        request in flight or queued with the error, then re-raises: the replica must
        exit so that the supervisor restarts it, rather than keep answering health
        checks with a dead loop.
        """
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
            self._cancel_all(reason)
            if self.broadcast and self.failed is None:
                self.broadcast(StepPlan(shutdown=True))

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self._queue and not self._rows:
                if not self._cond.wait(timeout=IDLE_HEARTBEAT_S) and self.broadcast:
                    self.broadcast(StepPlan())
            return not self._stopping

    def _admit(self) -> List[_Row]:
        rows: List[_Row] = []
        longest, full = 0, False
        budget = PREFILL_TOKENS_WHILE_DECODING if self._rows else PREFILL_TOKENS_PER_STEP
        with self._cond:
            while self._queue and len(self._rows) + len(rows) < self.max_batch_size:
                request = self._queue[0]
                if request.cancelled:
                    self._queue.popleft()
                    self._cancel_queued(request)
                    continue
                room = self.max_batch_size - len(self._rows) - len(rows)
                end = request.admitted
                while end < min(len(request.prompts), request.admitted + room):
                    # The prefill is one left-padded batch: what it costs (and allocates)
                    # is rows x longest prompt, not the sum of the prompts.
                    width = max(longest, len(request.prompts[end]))
                    if rows and (len(rows) + 1) * width > budget:
                        full = True
                        break
                    rows.append(self._new_row(request, end))
                    longest = width
                    end += 1
                request.admitted = end
                if end == len(request.prompts):
                    self._queue.popleft()
                if full:
                    break
        return rows

    def _new_row(self, request: _Request, index: int) -> _Row:
        params = request.info.params
        return _Row(request, index, request.prompts[index], request.budgets[index],
                    TextStream(self.tokenizer, params.stop),
                    None if params.ignore_eos else self.eos)

    def _step(self) -> None:
        """Retire finished rows, admit queued ones, launch one forward, then read tokens.

        Pipelined (one GPU, a state that takes device tokens), a step's sampled tokens
        stay on the device as the next step's inputs and reach the host through a
        pinned buffer while the next step already runs: the host work of step N (stop
        checks, detokenizing, streaming) overlaps the forward of step N+1. A row that
        finishes at step N thus computes one extra token at N+1, which is dropped.
        """
        kept, keep_arg = self._retire()
        self._rows = kept  # what _admit counts; a step in flight keeps its own list
        joining = self._admit()
        previous, self._inflight = self._inflight, None
        if kept or joining:
            self._launch(kept, keep_arg, joining)
        elif keep_arg is not None:  # everyone left (self._rows is already empty)
            self._device_tokens = None
            self._apply(StepPlan(keep=keep_arg))
        if previous is not None:
            self._process(*previous)
        if not self.pipelined and self._inflight is not None:
            current, self._inflight = self._inflight, None
            self._process(*current)

    def _retire(self) -> "tuple[List[_Row], Optional[List[int]]]":
        """End cancelled rows; return the rows that go on and the keep list for the plan."""
        keep = [i for i, row in enumerate(self._rows) if row.finish is None
                and not row.request.cancelled]
        for row in self._rows:
            if row.finish is None and row.request.cancelled:
                self._end(row, Finish.CANCELLED.value)
        keep_arg = None if len(keep) == len(self._rows) else keep
        return [self._rows[i] for i in keep], keep_arg

    def _launch(self, kept: List[_Row], keep_arg: Optional[List[int]], joining: List[_Row]) -> None:
        decode: Any = None
        if kept and self.pipelined:
            decode = self._device_tokens
            if keep_arg is not None:
                decode = decode.index_select(0, to_device(keep_arg, decode.device))
        elif kept:
            decode = [row.last for row in kept]
        plan = StepPlan(keep=keep_arg, decode=decode,
                        prefill=[row.prompt for row in joining] or None)
        if joining:
            self.counters["prefills"] += 1
            self.counters["prefill_rows"] += len(joining)
        self._rows = kept + joining  # before the forward, so a failing step fails them too
        if keep_arg is not None or joining:
            self._row_params = None
        decoded, prefilled = self._apply(plan)
        logits = decoded if prefilled is None else (
            prefilled if decoded is None else torch.cat([decoded, prefilled]))
        if self._row_params is None:
            self._row_params = row_params([row.params for row in self._rows],
                                          logits.shape[-1], logits.device)
        banned = [row.eos if row.launched < row.params.min_new_tokens else None
                  for row in self._rows]
        for row in self._rows:
            row.launched += 1
        tokens = sample(logits, self._row_params, banned)
        self._device_tokens = tokens
        self._inflight = (list(self._rows), self._to_host(tokens))
        self.counters["steps"] += 1

    def _to_host(self, tokens: torch.Tensor) -> Any:
        if not self.pipelined:
            return tokens.tolist()  # the step's one synchronisation
        if self._pinned is None:
            pin = tokens.device.type == "cuda"
            self._pinned = [torch.zeros(self.max_batch_size, dtype=torch.long, pin_memory=pin)
                            for _ in range(2)]
            self._copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._flip ^= 1  # two buffers: the previous step's is still being read
        buffer, event = self._pinned[self._flip][:len(tokens)], self._copied[self._flip]
        buffer.copy_(tokens, non_blocking=True)
        if event is not None:
            event.record()
        return buffer, event

    def _process(self, rows: List[_Row], host: Any) -> None:
        if isinstance(host, tuple):
            buffer, event = host
            if event is not None:
                event.synchronize()
            host = buffer.tolist()
        now = time.time()
        for row, token in zip(rows, host):
            if row.finish is None:  # finished or cancelled while this step ran: drop it
                self._advance(row, token, now)

    def _apply(self, plan: StepPlan):
        if self.broadcast:
            self.broadcast(plan)
        if not (self.sync_debug or self.profile_model_time):
            return self.state.apply(plan)
        started = time.perf_counter()
        result = self.state.apply(plan)
        if self.loaded.device.type == "cuda":  # make the time (and any error) this step's
            torch.cuda.synchronize(self.loaded.device)
        self._model_time += time.perf_counter() - started
        if self.profile_model_time and (self.counters["steps"] + 1) % 100 == 0:
            log.info("model time: %.2f ms/step over the last 100 steps (%d rows)",
                     self._model_time * 10, len(self._rows))
            self._model_time = 0.0
        return result

    def _advance(self, row: _Row, token: int, now: float) -> None:
        row.last = token
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.time_to_first_token.observe(now - row.request.info.arrived_at)
        else:
            self.metrics.inter_token_latency.observe(now - row.last_token_at)
        row.last_token_at = now
        self.metrics.tokens_generated += 1
        generated = len(row.text.ids) + 1
        if token == row.eos and generated > row.params.min_new_tokens:
            row.text.ids.append(token)
            return self._end(row, Finish.STOP.value)
        if row.params.stream or row.params.stop:
            if row.text.add(token) is not None:  # a stop string appeared
                return self._end(row, Finish.STOP.value)
        else:  # nobody reads text before the end: decode once in _end, not every step
            row.text.ids.append(token)
        if generated >= row.budget:
            return self._end(row, Finish.LENGTH.value)
        if row.params.stream:
            piece = row.text.delta(final=False)
            if piece:
                self._emit(row, piece, None, now)

    def _end(self, row: _Row, reason: str) -> None:
        row.finish = reason
        row.text.finish()
        now = time.time()
        self.metrics.end_to_end_latency.observe(now - row.request.info.arrived_at)
        piece = row.text.delta(final=True)
        if row.params.return_full_text and not row.params.stream:
            piece = self.tokenizer.decode(row.prompt, skip_special_tokens=True) + piece
        self._emit(row, piece, reason, now)
        row.request.pending -= 1
        if row.request.pending == 0:
            self._finish_request(row.request, "cancelled" if reason == "cancelled" else "ok")

    def _emit(self, row: _Row, text: str, reason: Optional[str], now: float) -> None:
        started = row.request.info.arrived_at
        self._deliver(row.request, TokenEvent(
            index=row.index, text=text, token_count=len(row.text.ids),
            prompt_length=len(row.prompt), finish_reason=reason,
            time_to_first_token_s=(row.first_token_at - started) if row.first_token_at else None,
            total_time_s=(now - started) if reason else None))

    def _deliver(self, request: _Request, event: TokenEvent) -> None:
        try:
            request.sink(event)
        except Exception:  # a broken sink must not stop the other rows
            log.exception("delivering tokens of request %s failed", request.info.request_id)
            request.cancelled = True

    def _fail_row(self, row: _Row, why: str) -> None:
        row.finish = "error"
        self._deliver(row.request, TokenEvent(row.index, "", len(row.text.ids), len(row.prompt),
                                              "error", error=RuntimeError(why)))
        row.request.pending -= 1
        if row.request.pending == 0:
            self._finish_request(row.request, "error")

    def _cancel_queued(self, request: _Request) -> None:
        for index in range(request.admitted, len(request.prompts)):
            self._deliver(request, TokenEvent(index, "", 0, len(request.prompts[index]),
                                              Finish.CANCELLED.value))
        request.pending -= len(request.prompts) - request.admitted
        request.admitted = len(request.prompts)
        if request.pending == 0:
            self._finish_request(request, "cancelled")

    def _finish_request(self, request: _Request, outcome: str) -> None:
        self.metrics.requests[outcome] += 1
        if self.on_finished:
            self.on_finished(request.info, outcome)

    def _cancel_all(self, why: str) -> None:
        for row in self._rows:
            if row.finish is None:
                if self.failed is not None:
                    self._fail_row(row, why)
                else:
                    self._end(row, Finish.CANCELLED.value)
        self._rows = []
        with self._cond:
            while self._queue:
                self._cancel_queued(self._queue.popleft())
        log.info("engine loop stopped: %s", why)


def follow(state: BatchState, receive: Callable[[], StepPlan]) -> None:
    """The loop of ranks > 0: apply every plan rank 0 broadcasts until shutdown."""
    with torch.inference_mode():
        while True:
            plan = receive()
            if plan.shutdown:
                return
            state.apply(plan)
