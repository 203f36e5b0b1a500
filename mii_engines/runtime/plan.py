"""The step plan: what every rank of a replica does in one step.

Rank 0's scheduler builds one plan per step and broadcasts it, so the ranks of a
tensor-parallel replica run the same forward. A plan is small and picklable (host
lists; ``decode`` may be a device tensor on rank 0 of a one-rank replica, where the
previous step's sampled tokens stay on the GPU).

Rows: the rows that *sample* in a step are the decode rows (in the order of the
previous step's sampled rows, minus those that left) followed by the chunks whose
``sample`` is set. A chunk that does not end its prompt feeds tokens into the cache
and samples nothing (chunked prefill).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch


@dataclass
class Chunk:
    """Prompt tokens of one sequence fed in this step."""

    slot: int  # the sequence's slot in the KV state (stable while it lives)
    tokens: List[int]
    start: int = 0  # tokens of this sequence already in the cache (earlier chunks, prefix hits)
    sample: bool = True  # the chunk ends the prompt: its last token's logits are sampled


@dataclass
class StepPlan:
    """One step for every rank; see the module docstring for the row order."""

    keep: Optional[List[int]] = None  # previous sampled rows that decode now (None: all)
    decode: Optional[Union[List[int], torch.Tensor]] = None  # one input token per kept row
    decode_slots: List[int] = field(default_factory=list)  # their slots (paged state)
    chunks: List[Chunk] = field(default_factory=list)
    # Paged state: (slot, first table index, block ids) written into slot's block table.
    tables: List[Tuple[int, int, List[int]]] = field(default_factory=list)
    release: List[int] = field(default_factory=list)  # slots whose sequences left the cache
    shutdown: bool = False

    @property
    def sampled_rows(self) -> int:
        """Rows whose next token this step samples."""
        decoding = 0 if self.decode is None else len(self.decode)
        return decoding + sum(1 for chunk in self.chunks if chunk.sample)

    @property
    def tokens(self) -> int:
        """Tokens fed through the model in this step."""
        decoding = 0 if self.decode is None else len(self.decode)
        return decoding + sum(len(chunk.tokens) for chunk in self.chunks)

    def prompts(self) -> List[List[int]]:
        """The chunks' tokens (for states that take whole prompts)."""
        return [chunk.tokens for chunk in self.chunks]
