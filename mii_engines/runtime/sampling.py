"""Choosing the next token of every row, each row with its own parameters, in one batch.

Nothing here waits for the device. On a GPU (CUDA tensors, triton importable) one
kernel draws every row (``kernels/triton_sampling.py``: greedy, temperature, top-p by
rejection, bans, per-row seeds; no sort); rows with a top-k then take a top-k
over their own logits. Elsewhere (CPU) the rows are drawn with torch: greedy rows take
an argmax; sampling rows are scaled by their temperature, cut to their top-k (a
``topk`` when every row has one, else one sort) and top-p, and drawn with the
exponential race (argmax of p / Exp(1) noise), an exact categorical draw that needs no
host synchronisation, unlike ``torch.multinomial``.

A request's ``seed`` fixes its rows' noise per token index (a seed mixed from (seed,
index)), so a seeded request reproduces its tokens on the same kind of device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from mii_core.config.models import GenerateParamsConfig
from mii_engines.runtime.kernels.paged_attention import triton_available
from mii_engines.runtime.runner.host_copy import to_device

SEED_BITS = 62  # fresh seeds: below torch.randint's int64 bound, the kernel's noise keys


@dataclass
class KernelRows:
    """What the GPU sampling kernel reads for every row of the batch."""

    temperature: torch.Tensor  # [rows] float32; 0 for a greedy row
    top_p: torch.Tensor  # [rows] float32; >= 1 keeps every token
    seeds: List[Optional[int]]  # each row's request seed; None: unseeded
    seeded: bool = False  # whether any row has a seed (built once, read every step)


@dataclass
class RowParams:
    """The sampling parameters of the running rows as device tensors (built per batch).

    ``sampled`` and the columns after it describe the rows drawn with torch: every
    sampling row on the CPU, only the rows with a top-k where ``kernel`` is set."""

    sampled: Optional[torch.Tensor]  # indices of rows drawn with torch; None: none
    temperature: Optional[torch.Tensor]  # [sampled rows, 1]
    top_k: Optional[torch.Tensor]  # [sampled rows, 1]; vocab size where unset
    top_p: Optional[torch.Tensor]  # [sampled rows, 1]; inf where 1.0 (keep every token)
    needs_sort: bool = False
    # (row among the sampled rows, row of the batch, seed) of each row with a seed
    seeded: List[Tuple[int, int, int]] = field(default_factory=list)
    # largest top-k of the sampled rows when every one has a top-k (a topk, no sort)
    top_k_max: Optional[int] = None
    kernel: Optional[KernelRows] = None
    any_sampled: bool = False  # whether any row samples (else every row is greedy)
    sampled_rows: Tuple[int, ...] = ()  # ``sampled`` on the host

    @property
    def needs_indices(self) -> bool:
        """Whether ``sample`` needs each row's token index (some row has a seed)."""
        return bool(self.seeded) or (self.kernel is not None and self.kernel.seeded)


def kernel_wanted(device: torch.device) -> bool:
    """Whether rows on ``device`` are drawn by the Triton kernel: on CUDA with triton."""
    return device.type == "cuda" and triton_available()


def row_params(params: Sequence[GenerateParamsConfig], vocab: int, device: torch.device,
               use_kernel: Optional[bool] = None) -> RowParams:
    """Tensors for ``params`` (one entry per running row). ``use_kernel``: draw with the
    Triton kernel (default: ``kernel_wanted(device)``)."""
    if use_kernel is None:
        use_kernel = kernel_wanted(device)
    any_sampled = any(p.do_sample for p in params)
    kernel = None
    if use_kernel and any_sampled:
        seeds = [p.seed if p.do_sample else None for p in params]
        kernel = KernelRows(
            to_device([(p.temperature or 1.0) if p.do_sample else 0.0 for p in params],
                      device, torch.float32),
            to_device([p.top_p if p.top_p < 1.0 else 2.0 for p in params],
                      device, torch.float32),
            seeds, seeded=any(seed is not None for seed in seeds))
    # the rows torch draws: every sampling row, or only those with a top-k
    sampled = [i for i, p in enumerate(params) if p.do_sample and (
        kernel is None or min(p.top_k or vocab, vocab) < vocab)]
    if not sampled:
        return RowParams(None, None, None, None, kernel=kernel, any_sampled=any_sampled)
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
                             if params[i].seed is not None],
                     top_k_max=max(top_k) if all(k < vocab for k in top_k) else None,
                     kernel=kernel, any_sampled=True, sampled_rows=tuple(sampled))


def mixed_seed(seed: int, index: int) -> int:
    """The noise seed of a seeded request's ``index``-th token (a non-negative int64)."""
    return (seed * 0x9E3779B97F4A7C15 + index) % 2 ** 63


_unseeded = random.Random()  # seeded from the OS: unseeded requests differ per process


ARGMAX_CHUNK = 4096


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for [rows, vocab], the same index (the first maximum), faster.

    One thread block per row reads the whole vocabulary in torch's argmax: for a
    128k vocabulary it took 27 us at 16 rows and 41 us at 64 on an H100. Here each
    4096-token chunk is reduced by its own block, then the chunk maxima. On a GPU with
    triton the same is two Triton launches (``kernels/triton_argmax.py``).
    """
    if kernel_wanted(logits.device) and logits.stride(-1) == 1:
        from mii_engines.runtime.kernels.triton_argmax import run_argmax

        return run_argmax(logits)  # two launches instead of three reductions and a gather
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
    ``indices[i]``: which of its request's tokens row i draws now (needed when
    ``rows.needs_indices``). ``generator`` (a CPU generator) makes unseeded draws
    repeatable.
    """
    ban = [(row, token) for row, token in enumerate(banned) if token is not None]
    if not rows.any_sampled and not ban:  # all greedy: the argmax needs no float copy
        return argmax_rows(logits)
    if rows.kernel is not None:
        chosen = _kernel_sample(logits, rows.kernel, ban, generator, indices)
        if rows.sampled is None:
            return chosen
        return _draw(logits, rows, ban, generator, indices, chosen)
    # A copy even when the logits are float32 already: the bans below write into it, and
    # the caller's logits stay as the model gave them.
    logits = logits.to(torch.float32, copy=True)
    if ban:
        index = to_device(ban, logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")
    chosen = argmax_rows(logits)
    if rows.sampled is None:
        return chosen
    return _draw(logits, rows, (), generator, indices, chosen)


def _kernel_sample(logits: torch.Tensor, kernel: KernelRows, ban: Sequence[Tuple[int, int]],
                   generator: Optional[torch.Generator], indices: Sequence[int]) -> torch.Tensor:
    """The kernel's draw for every row; ``ban``: (row, token) pairs, as ``sample`` found."""
    from mii_engines.runtime.kernels.triton_sampling import run_sample

    if generator is not None:
        step_seed = int(torch.randint(2 ** SEED_BITS, (1,), generator=generator))
    else:
        step_seed = _unseeded.getrandbits(SEED_BITS)
    seeds = None
    if kernel.seeded:  # else the step copies nothing
        seeds = to_device([step_seed + i if seed is None else mixed_seed(seed, indices[i])
                           for i, seed in enumerate(kernel.seeds)], logits.device)
    bans = None
    if ban:
        row_bans = [-1] * logits.shape[0]
        for row, token in ban:
            row_bans[row] = token
        bans = to_device(row_bans, logits.device)
    return run_sample(logits, kernel.temperature, kernel.top_p, step_seed, seeds, bans)


def _draw(logits: torch.Tensor, rows: RowParams, ban: Sequence[Tuple[int, int]],
          generator: Optional[torch.Generator], indices: Sequence[int],
          chosen: torch.Tensor) -> torch.Tensor:
    """``chosen`` with the rows of ``rows.sampled`` drawn with torch. ``ban``: (row,
    token) pairs still to apply (the kernel path; the torch path banned already)."""
    scores = logits.index_select(0, rows.sampled).to(torch.float32) / rows.temperature
    if ban:
        position = {row: k for k, row in enumerate(rows.sampled_rows)}
        own = [(position[row], token) for row, token in ban if row in position]
        if own:
            index = to_device(own, scores.device)
            scores[index[:, 0], index[:, 1]] = float("-inf")
    order = None
    if rows.top_k_max is not None:  # every row has a top-k: the largest, sorted
        scores, order = torch.topk(scores, rows.top_k_max, dim=-1)
    elif rows.needs_sort:
        scores, order = torch.sort(scores, dim=-1, descending=True)
    if order is not None:
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
    if order is not None:
        picked = order.gather(1, picked[:, None])[:, 0]
    return chosen.index_copy(0, rows.sampled, picked)


def _seeded_noise(noise: torch.Tensor, seeded: Sequence[Tuple[int, int, int]],
                  indices: Sequence[int]) -> None:
    """Overwrite the noise of seeded rows with draws fixed by (seed, token index)."""
    for noise_row, row, seed in seeded:
        generator = torch.Generator(noise.device).manual_seed(mixed_seed(seed, indices[row]))
        noise[noise_row].exponential_(generator=generator).clamp_(min=1e-20)
