"""Choosing the next token of every row, each row with its own parameters, in one batch.

Everything runs on the logits' device with a fixed handful of kernels whatever the
mix of rows: greedy rows take an argmax; sampling rows are scaled by their
temperature, cut to their top-k and top-p in one sort, and drawn with the
exponential-race trick (argmax of p / Exp(1) noise), which is an exact categorical
draw and needs no host synchronisation, unlike ``torch.multinomial``.

A request's ``seed`` fixes its rows' noise per token index (a generator seeded from
(seed, index)), so a seeded request reproduces its tokens on the same kind of device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from mii_core.config.models import GenerateParamsConfig
from mii_engines.runtime.runner.host_copy import to_device


@dataclass
class RowParams:
    """The sampling parameters of the running rows as device tensors (built per batch)."""

    sampled: Optional[torch.Tensor]  # indices of rows that sample; None: all greedy
    temperature: Optional[torch.Tensor]  # [sampled rows, 1]
    top_k: Optional[torch.Tensor]  # [sampled rows, 1]; vocab size where unset
    top_p: Optional[torch.Tensor]  # [sampled rows, 1]; inf where 1.0 (keep every token)
    needs_sort: bool = False
    # (row among the sampled rows, row of the batch, seed) of each row with a seed
    seeded: List[Tuple[int, int, int]] = field(default_factory=list)


def row_params(params: Sequence[GenerateParamsConfig], vocab: int,
               device: torch.device) -> RowParams:
    """Tensors for ``params`` (one entry per running row)."""
    sampled = [i for i, p in enumerate(params) if p.do_sample]
    if not sampled:
        return RowParams(None, None, None, None)
    chosen = [params[i] for i in sampled]
    top_k = [min(p.top_k or vocab, vocab) for p in chosen]
    top_p = [p.top_p for p in chosen]

    def column(values: List[float], dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, device, dtype)[:, None]

    # top_p 1.0 must keep every token: a float32 cumsum can reach 1.0 before the tail.
    cut = [p if p < 1.0 else float("inf") for p in top_p]
    return RowParams(to_device(sampled, device),
                     column([p.temperature or 1.0 for p in chosen], torch.float32),
                     column(top_k, torch.long), column(cut, torch.float32),
                     needs_sort=any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p),
                     seeded=[(k, i, params[i].seed) for k, i in enumerate(sampled)
                             if params[i].seed is not None])


ARGMAX_CHUNK = 4096


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for [rows, vocab], the same index (the first maximum), faster.

    One thread block per row reads the whole vocabulary in torch's argmax: for a
    128k vocabulary it took 27 us at 16 rows and 41 us at 64 on an H100. Here each
    4096-token chunk is reduced by its own block, then the chunk maxima.
    """
    rows, vocab = logits.shape
    if vocab < 4 * ARGMAX_CHUNK:
        return logits.argmax(dim=-1)
    main = vocab - vocab % ARGMAX_CHUNK
    values, index = logits[:, :main].view(rows, main // ARGMAX_CHUNK, ARGMAX_CHUNK).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)  # the first chunk holding the maximum
    chosen = index.gather(1, best)[:, 0] + best[:, 0] * ARGMAX_CHUNK
    if main == vocab:
        return chosen
    tail_value, tail_index = logits[:, main:].max(dim=-1)
    # Strictly greater: on a tie the earlier (main-part) index wins, as in argmax. A NaN
    # counts as the maximum, as in argmax (max already returns a NaN's index).
    later = (tail_value > values.gather(1, best)[:, 0]) | tail_value.isnan()
    return torch.where(later & ~values.isnan().any(dim=-1), tail_index + main, chosen)


def sample(logits: torch.Tensor, rows: RowParams, banned: Sequence[Optional[int]] = (),
           generator: Optional[torch.Generator] = None,
           indices: Sequence[int] = ()) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], as a device tensor of int64.

    ``banned[i]`` is a token id row i may not produce yet (EOS before min_new_tokens).
    ``indices[i]``: which of its request's tokens row i draws now (needed for seeded rows).
    """
    ban = [(row, token) for row, token in enumerate(banned) if token is not None]
    if rows.sampled is None and not ban:  # all greedy: the argmax needs no float copy
        return argmax_rows(logits)
    # A copy even when the logits are float32 already: the bans below write into it, and
    # the caller's logits stay as the model gave them.
    logits = logits.to(torch.float32, copy=True)
    if ban:
        index = to_device(ban, logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")
    chosen = argmax_rows(logits)
    if rows.sampled is None:
        return chosen
    scores = logits.index_select(0, rows.sampled) / rows.temperature
    if rows.needs_sort:
        scores, order = torch.sort(scores, dim=-1, descending=True)
        ranks = torch.arange(scores.shape[-1], device=scores.device)[None, :]
        scores = scores.masked_fill(ranks >= rows.top_k, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first stays).
        scores = scores.masked_fill(probs.cumsum(dim=-1) - probs >= rows.top_p, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # clamp: a zero draw would turn a zero-probability token into 0/0
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-20)
    _seeded_noise(noise, rows.seeded, indices)
    picked = (probs / noise).argmax(dim=-1)
    if rows.needs_sort:
        picked = order.gather(1, picked[:, None])[:, 0]
    return chosen.index_copy(0, rows.sampled, picked)


def _seeded_noise(noise: torch.Tensor, seeded: Sequence[Tuple[int, int, int]],
                  indices: Sequence[int]) -> None:
    """Overwrite the noise of seeded rows with draws fixed by (seed, token index)."""
    for noise_row, row, seed in seeded:
        mixed = (seed * 0x9E3779B97F4A7C15 + indices[row]) % 2 ** 63
        generator = torch.Generator(noise.device).manual_seed(mixed)
        noise[noise_row].exponential_(generator=generator).clamp_(min=1e-20)

