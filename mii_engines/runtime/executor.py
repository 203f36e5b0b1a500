"""Running a scheduled step on rank 0: broadcast, forward, sampling, tokens to the host.

Pipelined (one GPU, a state that takes device tokens), a step's sampled tokens stay
on the device as the next step's decode inputs and reach the host through pinned
buffers while the next step already runs: the host work of step N (stop checks,
detokenizing, streaming) overlaps the forward of step N+1. A row that ends at step N
thus computes one extra token at N+1, which the output stage drops.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch

from mii_engines.runtime.kv.interface import KVState
from mii_engines.runtime.plan import StepPlan
from mii_engines.runtime.requests import Sequence
from mii_engines.runtime.runner.host_copy import to_device
from mii_engines.runtime.sampling import RowParams, row_params, sample
from mii_engines.runtime.scheduler import Schedule

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A launched step whose tokens are on their way to the host."""

    rows: List[Sequence]
    host: Union[List[int], Tuple[torch.Tensor, Optional[torch.cuda.Event]]]


class Executor:
    """Turns a ``Schedule`` into sampled tokens, on the device and then on the host."""

    def __init__(self, state: KVState, device: torch.device, max_rows: int,
                 broadcast: Optional[Callable[[StepPlan], None]] = None,
                 pipelined: bool = False, sync_debug: bool = False,
                 profile_model_time: bool = False) -> None:
        self.state = state
        self.device = device
        self.max_rows = max_rows
        self.broadcast = broadcast
        self.pipelined = pipelined
        self.sync_debug = sync_debug
        self.profile_model_time = profile_model_time
        self._model_time = 0.0
        self._steps = 0
        self._device_tokens: Optional[torch.Tensor] = None
        self._params: Optional[RowParams] = None
        # The rows _params was built for, kept alive: comparing id()s instead would let a
        # new sequence allocated where a finished one was take over its parameters.
        self._params_rows: List[Sequence] = []
        self._pinned: List[torch.Tensor] = []
        self._copied: List[Optional[torch.cuda.Event]] = []
        self._flip = 0

    def launch(self, schedule: Schedule) -> Optional[InFlight]:
        """Run the step; None when no row samples in it."""
        plan = schedule.plan
        if schedule.decoding:
            plan.decode = self._decode_inputs(plan.keep, schedule.decoding)
        logits = self._apply(plan)
        if logits is None:
            self._device_tokens = None
            return None
        rows = schedule.rows
        if len(rows) != len(self._params_rows) or any(
                a is not b for a, b in zip(rows, self._params_rows)):
            self._params = row_params([seq.params for seq in rows], logits.shape[-1],
                                      logits.device)
            self._params_rows = list(rows)
        # launched already counts this step's token (its index is launched - 1): EOS is
        # banned while fewer than min_new_tokens precede it.
        banned = [seq.eos if seq.launched <= seq.params.min_new_tokens else None
                  for seq in rows]
        indices = [seq.launched - 1 for seq in rows] if self._params.needs_indices else ()
        tokens = sample(logits, self._params, banned, indices=indices)
        self._device_tokens = tokens
        self._steps += 1
        return InFlight(list(rows), self._to_host(tokens))

    def shutdown(self) -> None:
        """Tell the other ranks to stop."""
        if self.broadcast:
            self.broadcast(StepPlan(shutdown=True))

    def warm_up_step(self) -> bool:
        """The cache's deferred warm-up, one piece (``KVState.warm_up_step``); the loop
        calls it only while idle. True while more is left."""
        return self.state.warm_up_step()

    def heartbeat(self) -> None:
        """An empty plan, so that other ranks know rank 0 is alive while idle."""
        if self.broadcast:
            self.broadcast(StepPlan())

    def _decode_inputs(self, keep: Optional[List[int]], decoding: List[Sequence]):
        if self.pipelined and self._device_tokens is not None:
            tokens = self._device_tokens
            if keep is not None:
                tokens = tokens.index_select(0, to_device(keep, tokens.device))
            return tokens
        return [seq.last_token for seq in decoding]

    def _apply(self, plan: StepPlan) -> Optional[torch.Tensor]:
        if self.broadcast:
            self.broadcast(plan)
        if not (self.sync_debug or self.profile_model_time):
            return self.state.apply(plan)
        started = time.perf_counter()
        result = self.state.apply(plan)
        if self.device.type == "cuda":  # make the time (and any error) this step's
            torch.cuda.synchronize(self.device)
        self._model_time += time.perf_counter() - started
        if self.profile_model_time and (self._steps + 1) % 100 == 0:
            log.info("model time: %.2f ms/step over the last 100 steps", self._model_time * 10)
            self._model_time = 0.0
        return result

    def _to_host(self, tokens: torch.Tensor):
        if not self.pipelined:
            return tokens.tolist()  # the step's one synchronisation
        if not self._pinned:
            pin = tokens.device.type == "cuda"
            self._pinned = [torch.zeros(self.max_rows, dtype=torch.long, pin_memory=pin)
                            for _ in range(2)]
            self._copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._flip ^= 1  # two buffers: the previous step's is still being read
        buffer, event = self._pinned[self._flip][:len(tokens)], self._copied[self._flip]
        buffer.copy_(tokens, non_blocking=True)
        if event is not None:
            event.record()
        return buffer, event

    @staticmethod
    def read(step: InFlight) -> List[int]:
        """The step's tokens on the host (waits for its copy)."""
        if isinstance(step.host, tuple):
            buffer, event = step.host
            if event is not None:
                event.synchronize()
            return buffer.tolist()
        return step.host
