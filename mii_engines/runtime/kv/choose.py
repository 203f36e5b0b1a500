"""Which KV cache a replica runs: the configuration, resolved for its device and model.

``kv_cache="auto"`` (the default) is the paged cache with CUDA graphs and a compiled
decoder layer on a GPU, and transformers' dynamic cache on CPU. A model the paged
cache cannot serve — its attention is not reached through transformers' attention
interface, it caches something other than what it attends over, or a check of a
few logits against the model's own forward disagrees — falls back to the dynamic
cache with the reason logged: never fail a deployment the slow path would serve.
An explicit ``kv_cache="paged"`` refuses such a model instead, naming the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mii_core.config.models import ModelConfig
from mii_core.errors import ConfigError
from mii_core.plugins.interfaces import LoadedModel
from mii_engines.runtime.distributed import agree
from mii_engines.runtime.kv.blocks import BlockPool, PagedSpace
from mii_engines.runtime.kv.dynamic import DynamicState
from mii_engines.runtime.kv.interface import KVSpace, KVState
from mii_engines.runtime.kv.paged import PagedSettings, PagedState, Unsupported
from mii_engines.runtime.kv.rows import RowSpace
from mii_engines.runtime.plan import Chunk, StepPlan
from mii_engines.runtime.scheduler import Budgets

log = logging.getLogger(__name__)
PAGED_BATCH = 256  # max_batch_size when unset: what the paged cache serves at once
ROW_BATCH = 64  # the same for the row caches (memory grows per row)
CPU_BLOCK_TOKENS = 4096  # per sequence, for the pool size on CPU when kv_blocks is unset
CHECK_TOKENS = 14  # prompt of the logits check: two chunks of 6, then two decode steps


@dataclass
class KVSetup:
    """A replica's KV cache: the state (every rank), the space (rank 0's scheduler)."""

    state: KVState
    space: KVSpace
    kind: str
    max_batch_size: int
    budgets: Budgets


def build(loaded: LoadedModel, config: ModelConfig, world_size: int) -> KVSetup:
    """The KV cache ``config`` asks for on this rank (the same on every rank)."""
    cuda = loaded.device.type == "cuda"
    kind = config.kv_cache
    if kind == "auto":
        kind = "paged" if cuda else "dynamic"
    if kind == "paged":
        return paged_or_fallback(loaded, config, world_size,
                                 fallback=config.kv_cache == "auto")
    return _rows(loaded, config, world_size, kind)


def paged_or_fallback(loaded: LoadedModel, config: ModelConfig, world_size: int,
                      fallback: bool) -> KVSetup:
    """The paged cache, or (``fallback``) the dynamic one with the reason logged; without
    ``fallback`` a model the paged cache cannot serve is a ConfigError naming why."""
    try:
        return _paged(loaded, config, world_size, config.max_batch_size or PAGED_BATCH,
                      budgets_for(config))
    except Unsupported as why:
        if not fallback:
            raise ConfigError(f"kv_cache='paged' cannot serve "
                              f"{type(loaded.model).__name__}: {why}") from None
        log.warning("[progress] the paged KV cache cannot serve %s (%s): using the dynamic "
                    "cache, which is slower", type(loaded.model).__name__, why)
        return _rows(loaded, config, world_size, "dynamic")


def budgets_for(config: ModelConfig) -> Budgets:
    """The scheduler's step budgets: ``prefill_chunk_tokens`` while sequences decode, and
    at least as many when none does."""
    decoding = config.prefill_chunk_tokens or Budgets.decoding
    return Budgets(idle=max(Budgets.idle, decoding), decoding=decoding)


def _rows(loaded: LoadedModel, config: ModelConfig, world_size: int, kind: str) -> KVSetup:
    budgets = budgets_for(config)
    batch = config.max_batch_size or ROW_BATCH
    if kind == "static":
        from mii_engines.runtime.kv.slots import make_slot_state

        state = make_slot_state(loaded, batch, config.cuda_graphs, world_size,
                                bool(config.torch_compile), config.max_length is not None,
                                budgets.idle)
        return KVSetup(state, RowSpace(state.max_len, "slots"), "static", batch, budgets)
    return KVSetup(DynamicState(loaded.model, loaded.device),
                   RowSpace(loaded.context_length, "dynamic"), "dynamic", batch, budgets)


def _paged(loaded: LoadedModel, config: ModelConfig, world_size: int, batch: int,
           budgets: Budgets) -> KVSetup:
    cuda, single = loaded.device.type == "cuda", world_size == 1
    compile_layers = config.torch_compile if config.torch_compile is not None else cuda
    blocks = config.kv_blocks
    if blocks is None and not cuda:
        per_seq = -(-min(loaded.context_length, CPU_BLOCK_TOKENS) // config.kv_block_size)
        blocks = batch * per_seq + 1
    settings = PagedSettings(
        max_seqs=batch, max_tokens=loaded.context_length,
        step_tokens=max(budgets.idle, budgets.decoding + batch), block_size=config.kv_block_size,
        num_blocks=blocks, memory_fraction=config.gpu_memory_utilization,
        # CUDA graphs with NCCL collectives inside and per-rank compilation belong to the
        # multi-GPU work: tensor-parallel ranks run the paged cache eagerly.
        cuda_graphs=config.cuda_graphs and single and _kernels_capturable(cuda),
        compile=bool(compile_layers) and single)
    if single:  # sharded (AutoTP) layers are not plain nn.Linear; fusing is for tp=1
        from mii_engines.runtime.patches.fusion import fuse_projections

        fuse_projections(loaded.model)
    ids = _check_tokens(loaded)
    reference = _reference_logits(loaded.model, ids)
    state = PagedState(loaded.model, loaded.device, settings, agree_blocks=world_size > 1)
    why = _check(state, ids, reference)
    if world_size > 1:  # every rank must take the same path
        why = why or ("another rank's check failed" if not agree(why is None) else None)
    if why:
        state.undo()
        raise Unsupported(why)
    pool = BlockPool(state.num_blocks)
    space = PagedSpace(pool, config.kv_block_size, loaded.context_length,
                       prefix_caching=config.prefix_caching)
    return KVSetup(state, space, "paged", batch, budgets)


def _kernels_capturable(cuda: bool) -> bool:
    """On a GPU without triton the attention runs the torch reference, which reads lengths
    on the host: it cannot be captured in a CUDA graph, so the steps run without graphs."""
    from mii_engines.runtime.kernels.paged_attention import triton_available

    if cuda and not triton_available():
        log.warning("[progress] triton is not installed: the paged cache runs its attention "
                    "in torch, without CUDA graphs (much slower); pip install triton")
        return False
    return True


def _check_tokens(loaded: LoadedModel) -> torch.Tensor:
    vocab = loaded.model.config.get_text_config().vocab_size
    return torch.tensor([(7 + 31 * i) % vocab for i in range(CHECK_TOKENS)],
                        dtype=torch.long, device=loaded.device)


def _reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own logits (its own attention) at the positions the check compares."""
    with torch.inference_mode():
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
    return logits[CHECK_TOKENS - 3:].float()


def _check(state: PagedState, ids: torch.Tensor, reference: torch.Tensor) -> Optional[str]:
    """Feed the check prompt as two chunks, then decode two tokens; compare the three
    sampled positions' logits with the model's own."""
    tokens = ids.tolist()
    plans = [StepPlan(chunks=[Chunk(0, tokens[:6], 0, sample=False)], tables=[(0, 0, [1, 2])]),
             StepPlan(chunks=[Chunk(0, tokens[6:12], 6)]),
             StepPlan(decode=tokens[12:13], decode_slots=[0]),
             StepPlan(decode=tokens[13:14], decode_slots=[0])]
    got = []
    try:
        with torch.inference_mode(), state.eager():
            for plan in plans:
                logits = state.apply(plan)
                if logits is not None:
                    got.append(logits[0])
            state.apply(StepPlan(release=[0]))
    except Exception as error:  # the model's forward does not take the packed step
        return f"its forward failed on a packed step: {type(error).__name__}: {error}"
    return compare(torch.stack(got), reference)


def tolerance(dtype: torch.dtype) -> float:
    """Relative logits error a correct paged forward stays under (bugs give ~1)."""
    return 1e-3 if dtype == torch.float32 else 0.1


def compare(got: torch.Tensor, reference: torch.Tensor) -> Optional[str]:
    """None when ``got`` matches ``reference`` within the dtype's tolerance."""
    error = float((got.float() - reference).norm() / reference.norm().clamp(min=1e-6))
    limit = tolerance(got.dtype)
    if error != error or error > limit:  # NaN, or too far
        return f"its logits differ from the model's own by {error:.3g} (limit {limit})"
    return None
