"""The output stage: each sampled token becomes text, stop checks, events and metrics.

Runs on rank 0's loop thread, one step behind the forward when the loop is
pipelined. A sequence ends here (EOS, a stop string, its length budget) or when it
is cancelled or fails; its request's sink gets one event per piece of text and a
last event with the finish reason.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from mii_core.constants import GenerationFinishReason as Finish
from mii_core.plugins.interfaces import RequestInfo, TokenEvent
from mii_core.routing.stats import ServingMetrics
from mii_engines.runtime.requests import Phase, Request, Sequence

log = logging.getLogger(__name__)


class Outputs:
    """Turns tokens into events for the requests' sinks, and counts."""

    def __init__(self, tokenizer, metrics: ServingMetrics,
                 on_finished: Optional[Callable[[RequestInfo, str], None]] = None) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.on_finished = on_finished

    def token(self, seq: Sequence, token: int, now: float) -> None:
        """A token sampled for ``seq`` (dropped if it already ended)."""
        if seq.finish is not None:  # ended while this token was computed: not part of it
            return
        self._observe(seq, now)
        params = seq.params
        generated = len(seq.text.ids) + 1
        if token == seq.eos and generated > params.min_new_tokens:
            seq.text.ids.append(token)
            return self.end(seq, Finish.STOP.value)
        if params.stream or params.stop:
            if seq.text.add(token) is not None:  # a stop string appeared
                return self.end(seq, Finish.STOP.value)
        else:  # nobody reads the text before the end: decode once, in end()
            seq.text.ids.append(token)
        if generated >= seq.budget:
            return self.end(seq, Finish.LENGTH.value)
        if params.stream:
            piece = seq.text.delta(final=False)
            if piece:
                self._emit(seq, piece, None, now)

    def _observe(self, seq: Sequence, now: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.time_to_first_token.observe(now - seq.request.info.arrived_at)
        else:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.tokens_generated += 1

    def end(self, seq: Sequence, reason: str) -> None:
        """``seq`` is done: flush its text and report the reason."""
        seq.finish = reason
        seq.phase = Phase.FINISHED
        seq.text.finish()
        now = time.time()
        self.metrics.end_to_end_latency.observe(now - seq.request.info.arrived_at)
        self._emit(seq, seq.text.delta(final=True), reason, now)
        self._done(seq.request, "cancelled" if reason == Finish.CANCELLED.value else "ok")

    def cancel(self, seq: Sequence) -> None:
        """``seq``'s request was cancelled (or the replica stops)."""
        if seq.finish is None:
            self.end(seq, Finish.CANCELLED.value)

    def fail(self, seq: Sequence, why: str) -> None:
        """``seq`` cannot complete: the step it was in failed."""
        if seq.finish is not None:
            return
        seq.finish = "error"
        seq.phase = Phase.FINISHED
        self._deliver(seq.request, TokenEvent(seq.index, "", len(seq.text.ids), len(seq.prompt),
                                              "error", error=RuntimeError(why)))
        self._done(seq.request, "error")

    def _emit(self, seq: Sequence, text: str, reason: Optional[str], now: float) -> None:
        if seq.params.return_full_text and not seq.prompt_text_sent:
            # The prompt leads the text: the whole of it unless streaming, the first piece
            # of the stream otherwise.
            text = self.tokenizer.decode(seq.prompt, skip_special_tokens=True) + text
            seq.prompt_text_sent = True
        started = seq.request.info.arrived_at
        self._deliver(seq.request, TokenEvent(
            index=seq.index, text=text, token_count=len(seq.text.ids),
            prompt_length=len(seq.prompt), finish_reason=reason,
            time_to_first_token_s=(seq.first_token_at - started) if seq.first_token_at else None,
            total_time_s=(now - started) if reason else None))

    def _deliver(self, request: Request, event: TokenEvent) -> None:
        try:
            request.sink(event)
        except Exception:  # a broken sink must not stop the other rows
            log.exception("delivering tokens of request %s failed", request.info.request_id)
            request.cancelled = True

    def _done(self, request: Request, outcome: str) -> None:
        request.pending -= 1
        if request.pending:
            return
        self.metrics.requests[outcome] += 1
        if self.on_finished:
            self.on_finished(request.info, outcome)
