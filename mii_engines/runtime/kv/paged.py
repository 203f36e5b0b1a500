"""The ``paged`` KV state: one pool of fixed-size blocks per layer, block tables, one
packed forward per step.

Every token a step feeds — one per decoding row, any number per prompt chunk — goes
through the model in a single packed row (``input_ids`` [1, T]); mii's attention
function (``patches/paged_attention.py``) writes each token's key and value into its
block and attends over the sequence's blocks. So decode rows and prompt chunks of
any length, with or without cached context (chunked prefill, prefix hits), share one
forward, and memory is held per block actually used, not per max_length slot.

On CUDA each step replays a captured graph: decode-only steps per row-count bucket,
mixed steps per token-count bucket (with room for every sequence). The step's inputs
(token ids, positions, pool slots, per-sequence query offsets and lengths) are
written into static buffers through pinned memory; each sequence's block table is
gathered on the device from the per-slot tables. With ``compile``, one decoder layer
is compiled for all layers (``runner/compile.py``).

The pool takes ``memory_fraction`` of the GPU's memory, less what is in use after
loading (the weights), twice the measured activation peak of the largest step and a
reserve for the graphs (``pool_blocks``), capped at what every sequence at full
length would use; on CPU its size is given (tests, CI).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from mii_engines.runtime.distributed import agree_min
from mii_engines.runtime.kv.blocks import TRASH_BLOCK
from mii_engines.runtime.kv.interface import KVStats
from mii_engines.runtime.plan import Chunk, StepPlan
from mii_engines.runtime.patches import paged_attention as patch
from mii_engines.runtime.patches.modules import attention_modules
from mii_engines.runtime.runner.compile import RegionalCompile, repeated_blocks
from mii_engines.runtime.runner.graphs import capture, row_buckets, token_buckets
from mii_engines.runtime.runner.host_copy import to_device
from mii_engines.runtime.runner.masks import MaskRule, text_config

log = logging.getLogger(__name__)
GRAPH_RESERVE_BYTES = 2**30  # workspaces, sampling copies, NCCL: beside the measured peak


def pool_blocks(total: int, free: int, activation_peak: int, block_bytes: int,
                fraction: float, cap: int) -> int:
    """Blocks for the KV pool: ``fraction`` of the GPU's ``total`` memory, less what is
    already in use (``total - free``: the weights, other processes), the activations of
    the largest step twice (the eager warm-up's and the CUDA graphs' own pool) and a
    reserve; at most ``cap`` (what every sequence at full length would use)."""
    budget = fraction * total - (total - free) - 2 * activation_peak - GRAPH_RESERVE_BYTES
    return max(0, min(cap, int(budget // block_bytes)))


class Unsupported(Exception):
    """The model cannot run on the paged state (the caller falls back, logging why)."""


def warm_up_order(decode_buckets: List[int], mixed_buckets: List[int]
                  ) -> Tuple[List[Tuple[bool, int]], List[Tuple[bool, int]]]:
    """Which graphs (decode_only, tokens) to capture before the replica is ready, and
    which later, in order.

    Before: the ones whose first run compiles, the rest reuse those compilations: the
    largest decode bucket (the dynamic-shape compile; largest first, so that smaller
    graphs reuse its pool memory), a one-row step (torch specializes a size of 1) and the
    largest mixed step (attention of another kind: a recompile). The other captures
    take ~0.1 s each and compile nothing: 28 of them were 2.7 s of a 7.2B's 18 s second
    start on an H200 (2026-12-02). Later: the decode buckets from small to large (the common
    batches first), then the mixed steps likewise.
    """
    now = [(True, max(decode_buckets))]
    if 1 in decode_buckets and max(decode_buckets) != 1:
        now.append((True, 1))
    now.append((False, max(mixed_buckets)))
    later = [(True, size) for size in sorted(decode_buckets)]
    later += [(False, width) for width in sorted(mixed_buckets)]
    return now, [key for key in later if key not in now]


@dataclass(frozen=True)
class PagedSettings:
    """How to build a paged state."""

    max_seqs: int  # sequences in the cache at once (max_batch_size)
    max_tokens: int  # the longest sequence (the served context)
    step_tokens: int  # the most tokens one step feeds
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: from the free GPU memory
    memory_fraction: float = 0.9  # of the GPU's memory mii may use in all
    cuda_graphs: bool = True
    compile: bool = False


class PagedState:
    """Device side of the paged cache on one rank."""

    takes_device_tokens = True

    def __init__(self, model: Any, device: torch.device, settings: PagedSettings,
                 agree_blocks: bool = False) -> None:
        self.model = model
        self.device = device
        self.settings = settings
        self.block_size = settings.block_size
        self._agree_blocks = agree_blocks  # tensor-parallel ranks size one pool together
        try:  # layer types the paged attention serves exactly: full and sliding
            MaskRule(model.config)
        except ValueError as error:
            raise Unsupported(str(error)) from None
        layers = text_config(model.config).num_hidden_layers
        modules = attention_modules(model, layers)
        if modules is None:
            raise Unsupported("no single attention module per decoder layer was found")
        self.modules = modules
        self.regions: Optional[RegionalCompile] = None
        previous = patch.install(model)
        if previous is None:
            raise Unsupported("the model does not use transformers' attention interface")
        self._previous = previous
        try:
            self._build(layers)
        except BaseException:
            self.undo()
            raise

    # -- building --------------------------------------------------------------------------
    def _build(self, layers: int) -> None:
        s, device = self.settings, self.device
        self.max_blocks = -(-s.max_tokens // s.block_size)  # table width
        self.step_tokens = max(s.step_tokens, s.max_seqs)
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(self.step_tokens, **long)
        self.positions = torch.zeros(self.step_tokens, **long)
        self.sample_index = torch.zeros(s.max_seqs, **long)
        self.step_slots = torch.zeros(s.max_seqs, **long)
        self.slot_tables = torch.zeros((s.max_seqs, self.max_blocks), dtype=torch.int32,
                                       device=device)
        self.meta = patch.PagedMeta(
            slot_mapping=torch.zeros(self.step_tokens, **long),
            query_start=torch.zeros(s.max_seqs + 1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(s.max_seqs, dtype=torch.int32, device=device),
            block_tables=torch.zeros((s.max_seqs, self.max_blocks), dtype=torch.int32,
                                     device=device),
            marker=torch.zeros(s.max_seqs, dtype=torch.bool, device=device), probing=True)
        patch.bind(self.modules, self.meta)
        # Host copies of the tables and lengths (every rank applies the same plans).
        self.tables: List[List[int]] = [[] for _ in range(s.max_seqs)]
        self.lengths = [0] * s.max_seqs
        self.staging = _Staging(self.step_tokens, s.max_seqs, device)
        self.use_graphs = False  # until the pool is sized: the profiling step runs eagerly
        self.kv_shapes = self._probe_shapes(layers)
        self.block_bytes = sum(2 * s.block_size * heads * dim * torch.finfo(dtype).bits // 8
                               for heads, dim, _, dtype in self.kv_shapes)
        self.num_blocks = s.num_blocks or self._blocks_from_memory()
        if self._agree_blocks:  # the scheduler hands out block ids valid on every rank
            self.num_blocks = agree_min(self.num_blocks)
        self.pools = self._allocate(self.num_blocks)
        self.meta.probing = False
        patch.bind(self.modules, self.meta, self.pools)
        if s.compile:
            blocks = repeated_blocks(self.model, self.modules)
            if blocks is None:
                raise Unsupported("torch_compile: the decoder layers are not one repeated block")
            self.regions = RegionalCompile(blocks)
            for tensor in self._static_tensors():
                torch._dynamo.mark_static(tensor)
        self.use_graphs = s.cuda_graphs and device.type == "cuda"
        self.decode_buckets = row_buckets(s.max_seqs)
        self.mixed_buckets = token_buckets(self.step_tokens)
        self.graphs: Dict[Tuple[bool, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.warm_up_times: Dict[str, float] = {}
        self._deferred: List[Tuple[bool, int]] = []  # graphs warm_up left for idle time
        self._deferred_started: Optional[float] = None
        log.info("[progress] paged KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens), "
                 "%d sequences at most", self.num_blocks - 1, s.block_size,
                 self.num_blocks * self.block_bytes / 2**30,
                 (self.num_blocks - 1) * s.block_size, s.max_seqs)

    def _probe_shapes(self, layers: int) -> List[Tuple[int, int, int, torch.dtype]]:
        """Run 4 tokens through the model to see what each layer caches."""
        with torch.inference_mode():
            self.model(input_ids=self.ids[None, :4], position_ids=self.positions[None, :4],
                       attention_mask=self.meta.mask_for(1), use_cache=False, logits_to_keep=1)
        shapes, self.meta.seen = list(self.meta.seen), []
        if len(shapes) != layers:
            raise Unsupported(f"{len(shapes)} attention calls for {layers} layers")
        if any(key_dim != value_dim for _, key_dim, value_dim, _ in shapes):
            raise Unsupported("keys and values differ in head size (latent attention)")
        return shapes

    def _allocate(self, blocks: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        size = self.block_size
        return [(torch.zeros((blocks, size, heads, dim), dtype=dtype, device=self.device),
                 torch.zeros((blocks, size, heads, dim), dtype=dtype, device=self.device))
                for heads, dim, _, dtype in self.kv_shapes]

    def profile_plan(self) -> Tuple[StepPlan, int]:
        """The largest step the scheduler can plan — ``step_tokens`` prompt tokens, in as
        few sequences as the context allows, every one sampling — and the blocks it needs
        (numbered from 1). Measuring its activations sizes the pool."""
        size = self.block_size
        per_seq = min(self.step_tokens, self.max_blocks * size)
        chunks: List[Chunk] = []
        tables: List[Tuple[int, int, List[int]]] = []
        block, left = 1, self.step_tokens
        for slot in range(self.settings.max_seqs):
            if left <= 0:
                break
            count = min(per_seq, left)
            needed = -(-count // size)
            tables.append((slot, 0, list(range(block, block + needed))))
            chunks.append(Chunk(slot, [0] * count, 0, sample=True))
            block, left = block + needed, left - count
        return StepPlan(chunks=chunks, tables=tables), block

    def _blocks_from_memory(self) -> int:
        """Blocks that fit in ``memory_fraction`` of the GPU beside the weights (already
        loaded), the activations of the largest step (measured) and the graphs."""
        if self.device.type != "cuda":
            raise ValueError("num_blocks must be given for a paged cache off the GPU")
        plan, probe_blocks = self.profile_plan()
        self.pools = self._allocate(probe_blocks)
        self.meta.probing = False
        patch.bind(self.modules, self.meta, self.pools)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            self.apply(plan)
            self.apply(StepPlan(release=[chunk.slot for chunk in plan.chunks]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.pools = []
        patch.bind(self.modules, self.meta, [])
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # More than every sequence at full length could ever use is not taken.
        cap = self.settings.max_seqs * self.max_blocks + 1
        blocks = pool_blocks(total, free, peak, self.block_bytes,
                             self.settings.memory_fraction, cap)
        budget = blocks * self.block_bytes
        log.info("[progress] GPU memory: %.1f of %.1f GiB in use after loading; activation peak "
                 "%.2f GiB per step; %.1f GiB for the KV cache (gpu_memory_utilization=%.2f)",
                 (total - free) / 2**30, total / 2**30, peak / 2**30,
                 max(0, budget) / 2**30, self.settings.memory_fraction)
        if blocks < 2:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of "
                f"{total / 2**30:.1f} GiB after loading the model, the largest step needs "
                f"{peak / 2**30:.1f} GiB of activations; raise gpu_memory_utilization "
                f"({self.settings.memory_fraction}) or lower max_batch_size")
        return blocks

    def _static_tensors(self) -> List[torch.Tensor]:
        tensors = [tensor for pair in self.pools for tensor in pair]
        return tensors + [self.meta.slot_mapping, self.meta.query_start, self.meta.seq_lens,
                          self.meta.block_tables, self.slot_tables]

    def undo(self) -> None:
        """Give the model back its own attention (after a failed build or a refused check)."""
        if self.regions is not None:
            self.regions.undo()
        patch.uninstall(self.model, self._previous, self.modules)

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Steps inside run eagerly: no graphs, no compiled layers (the logits check)."""
        graphs, regions = self.use_graphs, self.regions
        self.use_graphs, self.regions = False, None
        try:
            yield
        finally:
            self.use_graphs, self.regions = graphs, regions

    # -- the step ----------------------------------------------------------------------
    def apply(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """Run ``plan``; logits of the decode rows, then of the chunks that sample."""
        self._update_tables(plan)
        decode = plan.decode if plan.decode is not None else []
        if not len(decode) and not plan.chunks:
            return None
        host = self.staging.acquire()
        tokens, seqs, rows = self._fill(host, plan)
        decode_only = not plan.chunks
        if self.use_graphs:
            shape = self._bucket(decode_only, tokens, seqs)
        else:
            shape = (tokens, seqs, rows) if not decode_only else (tokens, tokens, tokens)
        width, seq_width, row_width = shape
        self._pad(host, tokens, seqs, rows, width, seq_width, row_width)
        self._send(host, width, seq_width, row_width)
        if isinstance(decode, torch.Tensor):  # queued after the staging copy, so it wins
            self.ids[:len(decode)].copy_(decode)
        self.meta.decode_only = decode_only
        if self.use_graphs:
            graph, output = self._graph(decode_only, width, seq_width, row_width)
            graph.replay()
            logits = output
        else:
            logits = self._forward(width, seq_width, row_width)
        return logits[:rows] if rows else None

    def _update_tables(self, plan: StepPlan) -> None:
        for slot in plan.release:
            self.tables[slot] = []
            self.lengths[slot] = 0
        if not plan.tables:
            return
        rows, columns, values = [], [], []
        for slot, first, blocks in plan.tables:
            table = self.tables[slot]
            del table[first:]
            table.extend(blocks)
            rows += [slot] * len(blocks)
            columns += range(first, first + len(blocks))
            values += blocks
        self.slot_tables[to_device(rows, self.device), to_device(columns, self.device)] = (
            to_device(values, self.device, torch.int32))

    def _fill(self, host: "_HostStep", plan: StepPlan) -> Tuple[int, int, int]:
        """Write the step's inputs into the pinned buffers; returns (tokens, seqs, rows)."""
        size, lengths, tables = self.block_size, self.lengths, self.tables
        decode = plan.decode if plan.decode is not None else []
        slots = plan.decode_slots
        count = len(slots)
        if count:
            positions = [lengths[slot] for slot in slots]
            mapping = [tables[slot][p // size] * size + p % size
                       for slot, p in zip(slots, positions)]
            for slot, position in zip(slots, positions):
                lengths[slot] = position + 1
            if not isinstance(decode, torch.Tensor):
                host.ids[:count] = torch.tensor(decode, dtype=torch.long)
            host.positions[:count] = torch.tensor(positions, dtype=torch.long)
            host.slots[:count] = torch.tensor(mapping, dtype=torch.long)
            host.query_start[:count] = torch.arange(count, dtype=torch.int32)
            host.seq_lens[:count] = torch.tensor(positions, dtype=torch.int32) + 1
            host.step_slots[:count] = torch.tensor(slots, dtype=torch.long)
            host.sample[:count] = torch.arange(count, dtype=torch.long)
        token = seq = row = count
        for chunk in plan.chunks:
            end = token + len(chunk.tokens)
            positions = torch.arange(chunk.start, chunk.start + len(chunk.tokens))
            table = torch.tensor(tables[chunk.slot], dtype=torch.long)
            host.ids[token:end] = torch.tensor(chunk.tokens, dtype=torch.long)
            host.positions[token:end] = positions
            host.slots[token:end] = table[positions // size] * size + positions % size
            host.query_start[seq] = token
            host.seq_lens[seq] = chunk.start + len(chunk.tokens)
            host.step_slots[seq] = chunk.slot
            lengths[chunk.slot] = chunk.start + len(chunk.tokens)
            if chunk.sample:
                host.sample[row] = end - 1
                row += 1
            token, seq = end, seq + 1
        host.query_start[seq] = token
        return token, seq, row

    def _pad(self, host: "_HostStep", tokens: int, seqs: int, rows: int, width: int,
             seq_width: int, row_width: int) -> None:
        """Padding tokens write the trash block and belong to no sequence; padding
        sequences have no queries; padding rows sample token 0 (and are dropped)."""
        host.ids[tokens:width] = 0
        host.positions[tokens:width] = 0
        host.slots[tokens:width] = TRASH_BLOCK * self.block_size
        host.query_start[seqs + 1:seq_width + 1] = tokens
        host.seq_lens[seqs:seq_width] = 0
        host.step_slots[seqs:seq_width] = 0
        host.sample[rows:row_width] = 0

    def _send(self, host: "_HostStep", tokens: int, seqs: int, rows: int) -> None:
        """Queue the copies of the used part of ``host`` into the device buffers."""
        meta = self.meta
        for device, pinned, count in ((self.ids, host.ids, tokens),
                                      (self.positions, host.positions, tokens),
                                      (meta.slot_mapping, host.slots, tokens),
                                      (self.sample_index, host.sample, rows),
                                      (self.step_slots, host.step_slots, seqs),
                                      (meta.query_start, host.query_start, seqs + 1),
                                      (meta.seq_lens, host.seq_lens, seqs)):
            device[:count].copy_(pinned[:count], non_blocking=True)
        self.staging.sent()

    def _bucket(self, decode_only: bool, tokens: int, seqs: int) -> Tuple[int, int, int]:
        if decode_only:
            size = next(b for b in self.decode_buckets if b >= tokens)
            return size, size, size
        width = next(b for b in self.mixed_buckets if b >= tokens)
        return width, self.settings.max_seqs, self.settings.max_seqs

    def _forward(self, tokens: int, seqs: int, rows: int) -> torch.Tensor:
        """The packed forward over the static buffers: logits [rows, vocab]."""
        self.meta.block_tables[:seqs] = self.slot_tables.index_select(0, self.step_slots[:seqs])
        regions = self.regions.compiled() if self.regions else nullcontext()
        with regions:
            out = self.model(input_ids=self.ids[None, :tokens],
                             position_ids=self.positions[None, :tokens],
                             attention_mask=self.meta.mask_for(seqs), use_cache=False,
                             logits_to_keep=self.sample_index[:rows])
        return out.logits[0]

    def stage_empty(self, decode_only: bool, tokens: int, seqs: int, rows: int) -> None:
        """Stage a step of padding only, of this shape: every token writes the trash block,
        no sequence has a query, every row samples token 0. A graph is captured over it,
        so whatever earlier steps left in the buffers (the profiling step's sample
        indices, say) is never read. The copies are queued here, outside any capture."""
        host = self.staging.acquire()
        host.query_start[0] = 0
        self._pad(host, 0, 0, 0, tokens, seqs, rows)
        self._send(host, tokens, seqs, rows)
        self.meta.decode_only = decode_only

    def _graph(self, decode_only: bool, tokens: int, seqs: int, rows: int):
        key = (decode_only, tokens)
        if key not in self.graphs:
            self.stage_empty(decode_only, tokens, seqs, rows)
            # Two runs before the first capture (compilation, cuBLAS and Triton set-up),
            # one before the others: a run per capture is ~1/3 of its time.
            self.graphs[key] = capture(lambda: self._forward(tokens, seqs, rows), self.device,
                                       self._pool, warmups=1 if self.graphs else 2)
            log.info("captured the %s step for %d tokens", "decode" if decode_only else "mixed",
                     tokens)
        return self.graphs[key]

    def _capture(self, key: Tuple[bool, int]) -> None:
        decode_only, tokens = key  # a bucket's size: _bucket gives its shape back
        self._graph(decode_only, *self._bucket(decode_only, tokens, tokens))

    def warm_up(self) -> float:
        """Compile now, and capture the graphs whose first run compiles (``warm_up_order``);
        the others are captured while the replica is idle (``warm_up_step``), or by the
        first step that needs one. Returns the seconds taken."""
        started = time.perf_counter()
        if not self.use_graphs:
            return 0.0
        now, self._deferred = warm_up_order(self.decode_buckets, self.mixed_buckets)
        with torch.inference_mode():
            first = None
            for key in now:
                self._capture(key)
                first = first or time.perf_counter() - started
        torch.cuda.synchronize(self.device)
        self.warm_up_times = dict(first_decode_graph_s=round(first or 0.0, 2),
                                  compiled_graphs_s=round(time.perf_counter() - started, 2),
                                  graphs_now=len(now), graphs_deferred=len(self._deferred))
        log.info("[progress] warm-up: %(graphs_now)d graphs compiled and captured in "
                 "%(compiled_graphs_s).1fs (the first, with the compilation, "
                 "%(first_decode_graph_s).1fs); %(graphs_deferred)d more are captured while "
                 "the replica is idle", self.warm_up_times)
        return time.perf_counter() - started

    def warm_up_step(self) -> bool:
        """Capture one graph that ``warm_up`` left for later (~0.1 s; call it while no
        step is in flight); True while more are left."""
        while self._deferred and self._deferred[0] in self.graphs:  # a step took it first
            self._deferred.pop(0)
        if not self._deferred:
            return False
        if self._deferred_started is None:
            self._deferred_started = time.perf_counter()
        with torch.inference_mode():
            self._capture(self._deferred.pop(0))
        if not self._deferred:
            log.info("[progress] warm-up: the deferred graphs captured (%d graphs in all, "
                     "%.1fs since the first of them)", len(self.graphs),
                     time.perf_counter() - self._deferred_started)
        return bool(self._deferred)

    def stats(self) -> KVStats:
        """The pool's size in bytes (block counts come from the scheduler's space)."""
        return KVStats(kind="paged", block_size=self.block_size,
                       blocks_total=self.num_blocks - 1,
                       bytes_total=self.num_blocks * self.block_bytes,
                       deferred_graphs=sum(key not in self.graphs for key in self._deferred))


@dataclass
class _HostStep:
    """Views of one pinned staging buffer."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    sample: torch.Tensor
    step_slots: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor


class _Staging:
    """Two pinned buffers used in turn: a step fills one while the other's copy to the
    device may still be queued behind the step in flight."""

    def __init__(self, tokens: int, seqs: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._views = []
        for _ in range(2):
            flat = torch.zeros(3 * tokens + 2 * seqs, dtype=torch.long, pin_memory=cuda)
            small = torch.zeros(2 * seqs + 1, dtype=torch.int32, pin_memory=cuda)
            t, s = tokens, seqs
            self._views.append(_HostStep(
                ids=flat[:t], positions=flat[t:2 * t], slots=flat[2 * t:3 * t],
                sample=flat[3 * t:3 * t + s], step_slots=flat[3 * t + s:],
                query_start=small[:s + 1], seq_lens=small[s + 1:]))
        self._events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0

    def acquire(self) -> _HostStep:
        """The next buffer, once its previous copy to the device has run."""
        self._turn ^= 1
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        return self._views[self._turn]

    def sent(self) -> None:
        """Call after queueing this turn's copies out of the buffer."""
        event = self._events[self._turn]
        if event is not None:
            event.record()
