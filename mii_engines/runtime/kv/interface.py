"""The two faces of a KV cache, as typed protocols.

- ``KVState`` lives on every rank: the device tensors (caches, block tables) and the
  forward over a step plan. Every rank applies the same plans.
- ``KVSpace`` lives on rank 0 only, inside the scheduler: the host-side accounting of
  room in the cache (rows, or blocks and their tables), which decides admission and
  preemption and writes the table updates into the plan.

Three implementations: ``dynamic`` (transformers' growing cache, rows left-padded),
``slots`` (one preallocated slot of max_length tokens per row, CUDA graphs) and
``paged`` (a pool of fixed-size blocks, block tables, chunked prefill, prefix cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Tuple

import torch

from mii_engines.runtime.plan import StepPlan


@dataclass
class KVStats:
    """What a replica reports about its KV cache."""

    kind: str  # "dynamic", "slots" or "paged"
    block_size: int = 0
    blocks_total: int = 0
    blocks_used: int = 0
    blocks_peak: int = 0
    bytes_total: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    preemptions: int = 0
    padded_rows: int = 0  # prefill rows computed only to fill a graph bucket (slots)
    deferred_graphs: int = 0  # graph captures the warm-up left for idle time (paged)


class KVState(Protocol):
    """Device side of the cache on one rank, and the forward of a step."""

    #: decode inputs may be the previous step's sampled tokens, still on the device
    takes_device_tokens: bool

    def apply(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """Run ``plan``: logits [sampled rows, vocab] in the plan's row order (None when
        no row samples, e.g. a step of prompt chunks only)."""

    def warm_up(self) -> float:
        """Claim memory, capture graphs and compile before the replica serves; seconds."""

    def warm_up_step(self) -> bool:
        """One piece of the warm-up ``warm_up`` left for later (a graph capture), run
        while no step is in flight and nothing waits; True while more is left."""

    def stats(self) -> KVStats:
        """Sizes and use of the cache."""


class KVSpace(Protocol):
    """Rank 0's accounting of room in the cache (used only by the scheduler)."""

    #: prompts may be fed over several steps, and start after cached tokens
    chunked: bool

    def max_tokens(self) -> int:
        """The longest sequence (prompt + generated) the cache can ever hold."""

    def prefill_cost(self, lengths: List[int]) -> int:
        """What feeding prompts of these lengths in one step costs against the step's
        token budget (padded area for row states, the sum for the paged one)."""

    def open(self, slot: int, tokens: List[int]) -> int:
        """A sequence enters ``slot`` with these input tokens; returns how many leading
        tokens are already cached (prefix hits) and need not be fed."""

    def reserve(self, slot: int, length: int) -> bool:
        """Make room for ``slot`` to hold ``length`` tokens; False (nothing changed) if
        the cache is too full."""

    def fed(self, slot: int, tokens: List[int], start: int) -> None:
        """``tokens`` were fed at positions ``start``... (full blocks become reusable)."""

    def close(self, slot: int) -> None:
        """The sequence in ``slot`` left the cache (finished, cancelled or preempted)."""

    def take_table_updates(self) -> List[Tuple[int, int, List[int]]]:
        """Block-table writes since the last call, for the step plan."""

    def stats(self) -> KVStats:
        """Block counts and prefix-cache figures (rank 0's view)."""
