"""One GEMM for sibling projections: q/k/v of attention, gate/up of the MLP.

A decode step of a 1B model at batch 1 is a chain of small matrix-vector products,
and small ones leave most of the memory bandwidth unused. Hugging Face modelling
code calls ``q_proj``, ``k_proj`` and ``v_proj`` (``gate_proj`` and ``up_proj``) one
after another on the same input, so we concatenate their weights once and let the
first call compute all outputs; the siblings return their slice of it.

The replacement is exact whatever order the model calls the parts in: a part that
receives an input other than the one the group last projected recomputes the group.
Only plain ``nn.Linear`` parts with equal inputs, dtypes and devices are fused (a
tensor-parallel engine's sharded layers are left alone).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)
GROUPS: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """The concatenated weights of a group; computes every part's output at once."""

    def __init__(self, parts: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.splits = [part.out_features for part in parts]
        self.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]),
                                   requires_grad=False)
        biases = [p.bias for p in parts]
        self.bias = (None if biases[0] is None else
                     nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False))
        self._input: Optional[torch.Tensor] = None
        self._outputs: Optional[List[torch.Tensor]] = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output of part ``index`` for ``x``."""
        if index == 0 or self._input is not x or self._outputs is None:
            self._outputs = list(F.linear(x, self.weight, self.bias).split(self.splits, dim=-1))
            self._input = x
        out = self._outputs[index]
        if index == len(self.splits) - 1:  # drop the references: the group is done with x
            self._input = self._outputs = None
        return out


class LinearPart(nn.Module):
    """Stands where one fused ``nn.Linear`` was; forwards to its group."""

    def __init__(self, group: FusedLinear, index: int, in_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # not a child: its weights live once
        self.index = index
        self.in_features = in_features
        self.out_features = group.splits[index]

    @property
    def weight(self) -> torch.Tensor:
        """This part's rows of the fused weight (a view)."""
        start = sum(self.group.splits[:self.index])
        return self.group.weight[start:start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same result as the original ``nn.Linear``."""
        return self.group.part(x, self.index)


def _fusable(parts: Sequence[object]) -> bool:
    if not all(type(p) is nn.Linear for p in parts):
        return False
    first = parts[0]
    return all(p.in_features == first.in_features and p.weight.dtype == first.weight.dtype
               and p.weight.device == first.weight.device
               and (p.bias is None) == (first.bias is None) for p in parts)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of ``model`` in place; return how many."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            parts = [getattr(module, name, None) for name in names]
            if not _fusable(parts):
                continue
            group = FusedLinear(parts)
            module.add_module("_fused_" + "_".join(n.split("_")[0] for n in names), group)
            for index, name in enumerate(names):
                setattr(module, name, LinearPart(group, index, parts[index].in_features))
            fused += 1
    if fused:
        log.info("fused %d projection groups (q/k/v, gate/up) into single GEMMs", fused)
    return fused
