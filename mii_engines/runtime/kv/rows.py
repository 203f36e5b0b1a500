"""The scheduler's accounting for the row states (``dynamic`` and ``slots``).

Their memory is per row: a row never runs out mid-sequence (the dynamic cache grows,
a slot holds ``max_length`` tokens), so room is only the longest sequence served and
``max_batch_size`` rows, which the scheduler counts itself. A prefill there is one
left-padded batch: it costs rows x longest prompt, whatever the prompts' sum.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Tuple

import torch

from mii_engines.runtime.kv.interface import KVStats
from mii_engines.runtime.plan import StepPlan


class RowSpace:
    """Room in a cache that holds whole rows of up to ``max_tokens`` tokens."""

    chunked = False

    def __init__(self, max_tokens: int, kind: str) -> None:
        self._max_tokens = max_tokens
        self._kind = kind

    def max_tokens(self) -> int:
        """The longest sequence a row holds."""
        return self._max_tokens

    def prefill_cost(self, lengths: List[int]) -> int:
        """Rows x longest prompt: the padded batch's area."""
        return len(lengths) * max(lengths) if lengths else 0

    def open(self, slot: int, tokens: List[int]) -> int:
        """Nothing is ever cached ahead."""
        return 0

    def reserve(self, slot: int, length: int) -> bool:
        """Rows hold any length up to ``max_tokens`` (refused at submit beyond it)."""
        return length <= self._max_tokens

    def fed(self, slot: int, tokens: List[int], start: int) -> None:
        """Nothing to record."""

    def close(self, slot: int) -> None:
        """Nothing to free: the state drops the row itself."""

    def take_table_updates(self) -> List[Tuple[int, int, List[int]]]:
        """Rows have no block tables."""
        return []

    def stats(self) -> KVStats:
        """Only the kind: rows are not counted in blocks."""
        return KVStats(kind=self._kind)


class RowState(ABC):
    """What the two row states share: a plan applied as select, decode, prefill.

    Rows are positional: the decode rows are the previous step's rows that stay, in
    order, and the prompts join after them. Prompts come whole (``RowSpace`` never
    splits them), each chunk samples.
    """

    takes_device_tokens = False

    def apply(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """Run ``plan``: logits of the decode rows, then of the prompts."""
        if plan.keep is not None:
            self.select(plan.keep)
        decoded = self.decode(plan.decode) if plan.decode is not None and len(plan.decode) else None
        prompts = plan.prompts()
        prefilled = self.prefill(prompts) if prompts else None
        if decoded is None or prefilled is None:
            return prefilled if decoded is None else decoded
        return torch.cat([decoded, prefilled])

    @abstractmethod
    def select(self, keep: List[int]) -> None:
        """Keep only rows ``keep`` (indices into the current rows), in that order."""

    @abstractmethod
    def decode(self, tokens) -> torch.Tensor:
        """One step for every row: logits [rows, vocab]."""

    @abstractmethod
    def prefill(self, prompts: List[List[int]]) -> torch.Tensor:
        """New rows for ``prompts``, after the current ones: their last logits."""
