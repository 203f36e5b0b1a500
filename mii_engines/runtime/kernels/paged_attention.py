"""Attention over a paged KV cache: the public entry point, its torch reference, and the
``mii::paged_attention`` custom op that dispatches between the reference and Triton.

The contract (shared by both implementations):

- ``query`` [T, H, D]: the step's tokens, flattened; seq s owns
  ``query[query_start[s]:query_start[s + 1]]`` (``q_len`` tokens).
- ``key_cache`` / ``value_cache`` [num_blocks, block_size, KVH, D]: one layer's pool. The
  key/value at position p of seq s is ``key_cache[block_tables[s, p // block_size],
  p % block_size]``; this step's keys/values are already written there.
- ``seq_lens[s]``: the tokens of seq s in the cache, this step's included, so query j of
  seq s is at position ``seq_lens[s] - q_len + j`` and sees keys at positions <= its own
  (and > position - window when ``window`` > 0). A seq may have q_len > 1 and context
  before it (a later prefill chunk, a cached prefix).
- GQA: query head h reads kv head ``h // (H // KVH)``.
- Padding: seqs with q_len == 0 are skipped; tokens t >= query_start[S] get zeros. Table
  entries past a seq's last block are never read.
- ``softcap`` > 0: scores = softcap * tanh(scores / softcap), after ``scale`` (Gemma 2).
- fp32 accumulation; the output has the query's dtype.

On CUDA tensors with triton importable the op runs the Triton kernels (no host
synchronisation, shape-only grids: capturable in a CUDA graph); everywhere else it runs
the reference, which loops over sequences on the host (CPU serving, CI, the tests' oracle).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

MAX_HEAD_DIM = 256
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                    block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                    scale: float, window: int = 0, softcap: float = 0.0,
                    decode_only: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """Attention of ``query`` [T, H, D] over the paged cache; returns ``out`` [T, H, D].

    ``decode_only``: the caller guarantees every seq has at most one query (the split-KV
    decode kernel is used on the GPU). ``out``, when given, is written in place. Shapes,
    dtypes and devices are checked here (a ``ValueError`` names the argument); the values
    of the index tensors are the caller's to keep consistent (they are never read on the
    host on the GPU path).
    """
    check_arguments(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                    scale, window, softcap, out)
    if out is None:
        out = torch.empty_like(query)
    torch.ops.mii.paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                  query_start, out, float(scale), int(window), float(softcap),
                                  bool(decode_only))
    return out


def check_arguments(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                    block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                    scale: float, window: int, softcap: float,
                    out: Optional[Tensor]) -> None:
    """Raise ``ValueError`` naming the first argument whose shape, dtype, device or
    value breaks the contract of ``paged_attention``."""
    def fail(name: str, problem: str) -> None:
        raise ValueError(f"paged_attention: {name} {problem}")

    if query.dim() != 3:
        fail("query", f"must be [T, H, D], got shape {tuple(query.shape)}")
    if query.dtype not in FLOAT_TYPES:
        fail("query", f"dtype must be float16, bfloat16 or float32, got {query.dtype}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        fail("query", f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if key_cache.dim() != 4:
        fail("key_cache", f"must be [num_blocks, block_size, KVH, D], got shape "
             f"{tuple(key_cache.shape)}")
    if key_cache.shape[3] != head_dim:
        fail("key_cache", f"head_dim {key_cache.shape[3]} differs from query's {head_dim}")
    num_kv_heads = key_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        fail("key_cache", f"kv heads ({num_kv_heads}) must divide query heads ({num_heads})")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        fail("value_cache", f"must have key_cache's shape and strides, got shape "
             f"{tuple(value_cache.shape)} strides {value_cache.stride()}")
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.dtype != query.dtype:
            fail(name, f"dtype {tensor.dtype} differs from query's {query.dtype}")
    if block_tables.dim() != 2:
        fail("block_tables", f"must be [S, max_blocks], got shape {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    if tuple(seq_lens.shape) != (num_seqs,):
        fail("seq_lens", f"must be [S] with S = block_tables.shape[0] = {num_seqs}, got "
             f"shape {tuple(seq_lens.shape)}")
    if tuple(query_start.shape) != (num_seqs + 1,):
        fail("query_start", f"must be [S + 1] with S = block_tables.shape[0] = {num_seqs}, "
             f"got shape {tuple(query_start.shape)}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        fail("out", f"must match query ({tuple(query.shape)}, {query.dtype}), got "
             f"({tuple(out.shape)}, {out.dtype})")
    index_tensors = (("block_tables", block_tables), ("seq_lens", seq_lens),
                     ("query_start", query_start))
    float_tensors = (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                     ("out", out))
    for name, tensor in index_tensors:
        if tensor.dtype != torch.int32:
            fail(name, f"dtype must be int32, got {tensor.dtype}")
    # The kernels step through the last dimension with unit stride (coalesced rows of D
    # elements, consecutive table entries).
    for name, tensor in float_tensors + index_tensors:
        if tensor is None:
            continue
        if tensor.device != query.device:
            fail(name, f"is on {tensor.device}, query on {query.device}")
        if tensor.dim() and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            fail(name, f"last dimension must be contiguous, got strides {tensor.stride()}")
    if window < 0:
        fail("window", f"must be >= 0 (0: no window), got {window}")
    # Under torch.compile the floats may be symbolic, and dynamo cannot trace
    # math.isfinite on them: it broke every decoder layer into 10 graphs (a longer
    # trace at start-up, more guards each call). The eager steps (the probe, the
    # profiling step) have checked the same values already.
    if torch.compiler.is_compiling():
        return
    if not (scale > 0.0 and math.isfinite(scale)):  # the kernels scale the max, not each score
        fail("scale", f"must be finite and > 0, got {scale}")
    if not (softcap >= 0.0 and math.isfinite(softcap)):
        fail("softcap", f"must be finite and >= 0 (0: no softcap), got {softcap}")


def reference_paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                              block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                              out: Tensor, scale: float, window: int,
                              softcap: float) -> None:
    """The torch implementation: writes ``out`` in place, one vectorised step per seq.

    Reads ``seq_lens`` and ``query_start`` on the host, so on a GPU it synchronises and
    cannot be captured in a graph: there the Triton kernels run instead.
    """
    _, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start.tolist()
    lengths = seq_lens.tolist()
    for seq, seq_len in enumerate(lengths):
        first_token, end_token = starts[seq], starts[seq + 1]
        q_len = end_token - first_token
        if q_len == 0:
            continue
        context = seq_len - q_len  # position of this step's first query
        first_key = max(0, context - window + 1) if window > 0 else 0
        blocks = block_tables[seq, first_key // block_size:-(-seq_len // block_size)]
        skip = first_key % block_size
        keys = key_cache[blocks].flatten(0, 1)[skip:skip + seq_len - first_key].float()
        values = value_cache[blocks].flatten(0, 1)[skip:skip + seq_len - first_key].float()
        q = query[first_token:end_token].float().view(q_len, num_kv_heads, group, head_dim)
        scores = torch.einsum("qkgd,nkd->kgqn", q, keys) * scale
        if softcap > 0.0:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(context, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(first_key, seq_len, device=query.device)[None, :]
        hidden = k_pos > q_pos
        if window > 0:
            hidden |= k_pos <= q_pos - window
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        result = torch.einsum("kgqn,nkd->qkgd", probs, values)
        out[first_token:end_token] = result.reshape(q_len, num_heads, head_dim).to(out.dtype)
    out[starts[-1]:] = 0


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports here (it is needed only for CUDA tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _paged_attention_default(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                             block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                             out: Tensor, scale: float, window: int, softcap: float,
                             decode_only: bool) -> None:
    """Every device without a kernel of its own (CPU): the reference."""
    reference_paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                              query_start, out, scale, window, softcap)


_paged_attention_op = torch.library.custom_op(
    "mii::paged_attention", mutates_args=("out",))(_paged_attention_default)


@_paged_attention_op.register_kernel("cuda")
def _paged_attention_cuda(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                          block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                          out: Tensor, scale: float, window: int, softcap: float,
                          decode_only: bool) -> None:
    if not triton_available():
        reference_paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                  query_start, out, scale, window, softcap)
        return
    from mii_engines.runtime.kernels.triton_paged import run_paged_attention

    run_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                        out, scale, window, softcap, decode_only)


@_paged_attention_op.register_fake
def _paged_attention_fake(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                          block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                          out: Tensor, scale: float, window: int, softcap: float,
                          decode_only: bool) -> None:
    """Under torch.compile the op is opaque: it only writes ``out``, allocates nothing."""
    return None


def write_and_attend(query: Tensor, new_keys: Tensor, new_values: Tensor, slot_mapping: Tensor,
                     key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, query_start: Tensor, scale: float, window: int = 0,
                     softcap: float = 0.0, decode_only: bool = False) -> Tensor:
    """Write the step's keys/values ``new_keys``/``new_values`` [T, KVH, D] into the pool
    at ``slot_mapping`` [T] (block * block_size + offset), then ``paged_attention``.

    One opaque op for both, so that under torch.compile the pools are never an output
    of the graph: the compiler sees them as inputs the op reads, and never clones them
    to functionalize a write (a clone of the pool per layer would cost more than the
    whole step). The pools are the op's state, as a KV cache is an attention layer's.
    """
    check_arguments(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                    scale, window, softcap, None)
    if new_keys.shape != new_values.shape or new_keys.shape[1:] != key_cache.shape[2:]:
        raise ValueError(f"paged_attention: new_keys/new_values must be [T, KVH, D] with "
                         f"KVH, D = {tuple(key_cache.shape[2:])}, got "
                         f"{tuple(new_keys.shape)} / {tuple(new_values.shape)}")
    out = torch.empty_like(query)
    torch.ops.mii.write_and_attend(query, new_keys, new_values, slot_mapping, key_cache,
                                   value_cache, block_tables, seq_lens, query_start, out,
                                   float(scale), int(window), float(softcap), bool(decode_only))
    return out


def _write(new_keys: Tensor, new_values: Tensor, slot_mapping: Tensor, key_cache: Tensor,
           value_cache: Tensor) -> None:
    tokens = new_keys.shape[0]
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slot_mapping[:tokens], new_keys)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slot_mapping[:tokens],
                                                             new_values)


def _write_and_attend_default(query: Tensor, new_keys: Tensor, new_values: Tensor,
                              slot_mapping: Tensor, key_cache: Tensor, value_cache: Tensor,
                              block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                              out: Tensor, scale: float, window: int, softcap: float,
                              decode_only: bool) -> None:
    """The write, then the attention op's own dispatch (the reference or Triton)."""
    _write(new_keys, new_values, slot_mapping, key_cache, value_cache)
    torch.ops.mii.paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                  query_start, out, scale, window, softcap, decode_only)


_write_and_attend_op = torch.library.custom_op(
    "mii::write_and_attend", mutates_args=("out",))(_write_and_attend_default)


@_write_and_attend_op.register_kernel("cuda")
def _write_and_attend_cuda(query: Tensor, new_keys: Tensor, new_values: Tensor,
                           slot_mapping: Tensor, key_cache: Tensor, value_cache: Tensor,
                           block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                           out: Tensor, scale: float, window: int, softcap: float,
                           decode_only: bool) -> None:
    """A decode step writes its keys/values inside the decode kernel (one launch instead
    of three); prefill chunks write first, then attend."""
    if not (decode_only and triton_available()):
        _write(new_keys, new_values, slot_mapping, key_cache, value_cache)
        _paged_attention_cuda(query, key_cache, value_cache, block_tables, seq_lens,
                              query_start, out, scale, window, softcap, decode_only)
        return
    from mii_engines.runtime.kernels.triton_paged import NewKeys, run_paged_attention

    run_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start,
                        out, scale, window, softcap, True,
                        new=NewKeys(_unit_last(new_keys), _unit_last(new_values),
                                    slot_mapping))


def _unit_last(tensor: Tensor) -> Tensor:
    """The kernel steps through head_dim with unit stride."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


@_write_and_attend_op.register_fake
def _write_and_attend_fake(query: Tensor, new_keys: Tensor, new_values: Tensor,
                           slot_mapping: Tensor, key_cache: Tensor, value_cache: Tensor,
                           block_tables: Tensor, seq_lens: Tensor, query_start: Tensor,
                           out: Tensor, scale: float, window: int, softcap: float,
                           decode_only: bool) -> None:
    return None
