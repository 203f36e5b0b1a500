"""torch.compile one decoder layer and use it for all of them ("regional" compilation).

Compiling a whole 16-layer model traces, lowers and schedules every layer, although
they run the same code: most of a cold start went there. Here the layer class's
``forward`` is compiled once, with the layer as an argument; with the parameters and
buffers of a module treated as inputs (torch's default since 2.5), every layer reuses
that one compiled graph. The layers' surroundings (embedding, rotary tables, final
norm, lm_head) stay eager: ~40 us of unfused kernels per step on an H100. Compiling
them as well was measured once: the layer's attention then came out of inductor as a
fused pointwise "bmm" (18 us instead of 6 us at 64 rows; replay 2.02 instead of
1.85 ms), a net loss.

The compiled forward is used only while ``active`` (the decode step): prefills take
the eager path, so that their shapes never reach the compiler. Duck shaping is off
while it compiles: otherwise a row bucket that happens to equal another size (64 rows
and a head_dim of 64) is assumed equal to it, and the next bucket compiles again.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx.experimental._config as shape_config
from torch import nn

log = logging.getLogger(__name__)


def repeated_blocks(model: nn.Module, attention: Sequence[nn.Module]) -> Optional[nn.ModuleList]:
    """The ``ModuleList`` of one class whose i-th block holds ``attention[i]``: the
    decoder layers (not, say, a longer list of MoE experts)."""
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) == len(attention) > 1
                and len({type(block) for block in module}) == 1
                and all(any(inner is part for inner in block.modules())
                        for block, part in zip(module, attention))):
            return module
    return None


class RegionalCompile:
    """Routes every block's forward through one compiled function while ``active``."""

    def __init__(self, blocks: nn.ModuleList, dynamic: bool = True) -> None:
        self.active = False
        # Persistent reductions off: for the softmax over a dynamic key width inductor
        # chose a persistent kernel that took 7.3 us where the looped one takes 2.5 us
        # (H100, 2 rows): 4 % of a batch-1 step over 16 layers.
        self._compiled = torch.compile(type(blocks[0]).forward, dynamic=dynamic,
                                       options={"triton.persistent_reductions": False})
        self._blocks = list(blocks)
        for block in blocks:
            block.forward = functools.partial(self._forward, block, block.forward)
        log.info("torch.compile: one %s compiled for %d layers", type(blocks[0]).__name__,
                 len(blocks))

    def _forward(self, block: nn.Module, eager: Any, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            return self._compiled(block, *args, **kwargs)
        return eager(*args, **kwargs)

    def undo(self) -> None:
        """Give every block its own forward back."""
        for block in self._blocks:
            del block.forward  # the instance attribute; the class's forward shows again

    @contextmanager
    def compiled(self) -> Iterator[None]:
        """Blocks called inside run compiled (duck shaping off, for every layer at once)."""
        self.active = True
        try:
            with shape_config.patch(use_duck_shape=False):
                yield
        finally:
            self.active = False
