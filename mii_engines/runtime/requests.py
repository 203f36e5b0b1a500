"""What the runtime keeps of a request and of each of its prompts ("sequences")."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from mii_core.config.models import GenerateParamsConfig
from mii_core.plugins.interfaces import RequestInfo, TokenEvent
from mii_engines.runtime.detokenize import TextStream


@dataclass(eq=False)
class Request:
    """One call of a client: several prompts, one sink for all their events."""

    info: RequestInfo
    sink: Callable[[TokenEvent], None]
    sequences: List["Sequence"] = field(default_factory=list)
    cancelled: bool = False
    pending: int = 0  # sequences not finished yet

    @property
    def params(self) -> GenerateParamsConfig:
        """The request's generate parameters (shared by its prompts)."""
        return self.info.params


class Phase(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    PREFILLING = "prefilling"  # admitted; its prompt is fed over one or more steps
    RUNNING = "running"  # sampled at least once; decodes one token a step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One prompt of a request, from queueing to its last token."""

    request: Request
    index: int  # which prompt of the request
    prompt: List[int]
    budget: int  # most tokens it may generate
    text: TextStream  # generated ids and their text
    eos: Optional[int]  # None when EOS does not end it (ignore_eos)
    arrival: int = 0  # admission order: the youngest is preempted first
    phase: Phase = Phase.WAITING
    slot: int = -1  # its slot in the KV state while admitted
    fed: int = 0  # tokens of ``inputs`` already in the KV cache
    inputs: List[int] = field(default_factory=list)  # what prefill feeds: prompt (+ generated on recompute)
    launched: int = 0  # tokens sampled for it, some maybe not read back yet
    preemptions: int = 0
    prompt_text_sent: bool = False  # return_full_text: the prompt went out with the first piece
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    finish: Optional[str] = None

    def __post_init__(self) -> None:
        self.inputs = list(self.prompt)

    @property
    def params(self) -> GenerateParamsConfig:
        """The generate parameters of its request."""
        return self.request.info.params

    @property
    def generated(self) -> List[int]:
        """Token ids generated so far (read back from the device)."""
        return self.text.ids

    @property
    def active(self) -> bool:
        """Still generating: not finished, request not cancelled."""
        return self.finish is None and not self.request.cancelled

    @property
    def remaining_prompt(self) -> int:
        """Input tokens not yet in the KV cache."""
        return len(self.inputs) - self.fed

    @property
    def last_token(self) -> int:
        """The token a decode step feeds (the last one read back)."""
        return self.text.ids[-1]
