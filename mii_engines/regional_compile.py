"""torch.compile one decoder layer and use it for all of them ("regional" compilation).

Compiling a whole 16-layer model traces, lowers and schedules every layer, although
they run the same code: most of a cold start went there. Here the layer class's
``forward`` is compiled once, with the layer as an argument; with the parameters and
buffers of a module treated as inputs (torch's default since 2.5), every layer reuses
that one compiled graph. The layers' siblings (embedding, rotary tables, final norm)
are compiled the same way, one compilation per class: run eagerly they were ~40 us of
unfused kernels per step on an H100. The lm_head (one GEMM) stays eager.

The compiled forward is used only while ``active`` (the decode step): prefills take
the eager path, so that their shapes never reach the compiler. Duck shaping is off
while it compiles: otherwise a row bucket that happens to equal another size (64 rows
and a head_dim of 64) is assumed equal to it, and the next bucket compiles again.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.fx.experimental._config as shape_config
from torch import nn

log = logging.getLogger(__name__)


def repeated_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The model's longest ``ModuleList`` of modules of one class (its decoder layers)."""
    best: Optional[nn.ModuleList] = None
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 1
                and len({type(block) for block in module}) == 1
                and (best is None or len(module) > len(best))):
            best = module
    return best


def siblings(model: nn.Module, blocks: nn.ModuleList) -> List[nn.Module]:
    """The other children of the module that holds ``blocks`` (embedding, norm, rotary
    tables), leaving out containers."""
    for parent in model.modules():
        children = list(parent.children())
        if any(child is blocks for child in children):
            return [child for child in children if child is not blocks
                    and not isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential))]
    return []


class RegionalCompile:
    """Routes the forward of every block and sibling through one compiled function per
    class while ``active``."""

    def __init__(self, blocks: nn.ModuleList, extras: Sequence[nn.Module] = (),
                 dynamic: bool = True) -> None:
        self.active = False
        self._compiled: Dict[type, Any] = {}
        for module in [*blocks, *extras]:
            kind = type(module)
            if kind not in self._compiled:
                # Persistent reductions off: for the softmax over a dynamic key width
                # inductor chose a persistent kernel that took 7.3 us where the looped
                # one takes 2.5 us (H100, 2 rows): 4 % of a batch-1 step over 16 layers.
                self._compiled[kind] = torch.compile(
                    kind.forward, dynamic=dynamic,
                    options={"triton.persistent_reductions": False})
            module.forward = functools.partial(self._forward, self._compiled[kind], module,
                                               module.forward)
        log.info("torch.compile: one %s compiled for %d layers, plus %s",
                 type(blocks[0]).__name__, len(blocks),
                 ", ".join(type(m).__name__ for m in extras) or "nothing else")

    def _forward(self, compiled: Any, module: nn.Module, eager: Any, *args: Any,
                 **kwargs: Any) -> Any:
        if self.active:
            with shape_config.patch(use_duck_shape=False):
                return compiled(module, *args, **kwargs)
        return eager(*args, **kwargs)

    @contextmanager
    def compiled(self) -> Iterator[None]:
        """Blocks called inside run compiled."""
        self.active = True
        try:
            yield
        finally:
            self.active = False
