"""Choosing the next token of every row, each row with its own parameters."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from mii_core.config import GenerateParamsConfig


def _filter_row(logits: torch.Tensor, params: GenerateParamsConfig) -> torch.Tensor:
    if params.temperature is not None and params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them already reaches top_p (keep at least one).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def next_tokens(logits: torch.Tensor, params: Sequence[GenerateParamsConfig],
                banned: Sequence[Optional[int]], generator: Optional[torch.Generator] = None
                ) -> List[int]:
    """One token per row of ``logits`` [rows, vocab].

    ``banned[i]`` is a token id row i may not produce yet (EOS before min_new_tokens).
    Greedy rows are decided in one vectorized argmax; sampled rows one by one.
    """
    logits = logits.float()
    for row, token in enumerate(banned):
        if token is not None:
            logits[row, token] = float("-inf")
    chosen = logits.argmax(dim=-1).tolist()
    for row, row_params in enumerate(params):
        if row_params.do_sample:
            probs = torch.softmax(_filter_row(logits[row], row_params), dim=-1)
            chosen[row] = int(torch.multinomial(probs, 1, generator=generator))
    return chosen
