"""A preallocated ("static") KV cache with one slot per running row, and CUDA-graph decode.

Same contract as :class:`mii_engines.runtime.kv.dynamic.DynamicState` (``apply(plan)``), so the
batching loop does not care which one runs. Differences:

- Every row owns a slot of a preallocated [rows, kv_heads, slot_width, head_dim]
  buffer per layer; its tokens start at column 0, so positions equal columns. Columns
  from max_len on are scratch: prefill padding is written there and never attended to.
- A decode step writes each row's new key/value at that row's own column (an
  ``index_put_`` with device tensors) and attends over the whole slot with a mask built
  on the device from the rows' lengths, over the first 128 * 2^k columns that hold the
  longest row. On CUDA each (row-count bucket, width) pair is captured once as a CUDA
  graph (optionally from a ``torch.compile``d step) and replayed: one launch per step.
- Prompts are prefilled in one left-padded batch whose keys and values go straight
  into their slots (one scatter per layer), with no intermediate cache.
- Rows that leave are compacted with one gather per layer.
- With mii's decode attention, each attention module gets its layer's slots as
  buffers after the first prefill, and decode steps run without a cache object (the
  attention function writes the new key/value). ``torch_compile`` then compiles one
  decoder layer for all layers (``runner/compile.py``) instead of the whole model.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from mii_engines.runtime.kv.dynamic import left_padded
from mii_engines.runtime.kv.interface import KVStats
from mii_engines.runtime.kv.rows import RowState
from mii_engines.runtime.patches.attention import NAME as DECODE_ATTENTION
from mii_engines.runtime.patches.attention import bind_slots, write_step
from mii_engines.runtime.patches.modules import attention_modules
from mii_engines.runtime.runner.compile import RegionalCompile, repeated_blocks
from mii_engines.runtime.runner.forward import HFForward
from mii_engines.runtime.runner.graphs import capture, doubling
from mii_engines.runtime.runner.host_copy import Staging, to_device
from mii_engines.runtime.runner.masks import text_config
from mii_engines.runtime.runner.prefill_graphs import PrefillGraphs, prefill_into_slots

log = logging.getLogger(__name__)


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def slot_width(max_len: int) -> int:
    """Columns per slot: max_len rounded up to 16 (aligned rows for the kernels), plus
    16 scratch columns. Decode never attends to the scratch block, so every decode width
    is strictly narrower than the slot, which keeps torch.compile from specializing the
    step on "width == slot width" (a second compilation)."""
    return _round16(max_len) + 16


class SlotCache:
    """The cache object handed to the model: ``update`` writes into the rows' slots."""

    is_compileable = False

    def __init__(self, max_rows: int, max_len: int, write_pos: torch.Tensor,
                 layers: int = 1) -> None:
        self.max_rows, self.max_len, self.layers = max_rows, max_len, layers
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.write_pos = write_pos  # [max_rows] column each row writes during decode
        self.row_index = torch.arange(max_rows, device=write_pos.device)
        # While prefilling: (slots [n, 1], columns [n, width]) each prompt column goes to.
        self.prefill_to: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused: mii always passes cache_position and a 4D mask."""
        return 0

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # Keys and values may differ in head size (DeepSeek-V3's attention).
        shapes = [(self.max_rows, like.shape[1], slot_width(self.max_len), like.shape[3])
                  for like in (keys, values)]
        if not self.keys and keys.device.type == "cuda":
            self._check_fits(shapes, keys)
        self.keys.append(torch.zeros(shapes[0], dtype=keys.dtype, device=keys.device))
        self.values.append(torch.zeros(shapes[1], dtype=values.dtype, device=values.device))

    def _check_fits(self, shapes: List[Tuple[int, ...]], like: torch.Tensor) -> None:
        """Refuse, naming the settings, a cache that cannot fit (instead of an OOM later)."""
        per_layer = like.element_size() * sum(math.prod(shape) for shape in shapes)
        needed = per_layer * self.layers
        free, _ = torch.cuda.mem_get_info(like.device)
        reserve = 2 * 2**30  # activations and the CUDA graphs' memory pools
        if needed > 0.9 * free - reserve:
            raise RuntimeError(
                f"kv_cache='static' needs {needed / 2**30:.1f} GiB for max_batch_size="
                f"{self.max_rows} x max_length={self.max_len} over {self.layers} layers, but "
                f"{free / 2**30:.1f} GiB are free on {like.device} (2 GiB of it kept for "
                "activations and CUDA graphs): lower max_length or max_batch_size, or use "
                "kv_cache='dynamic'")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return what this step's queries attend to."""
        if layer_idx == len(self.keys):  # shapes known only now (a TP rank holds a shard)
            self._allocate(key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_to is not None:  # fresh rows attend only to their own prompt
            slots, columns = self.prefill_to
            keys[slots, :, columns] = key_states.transpose(1, 2)
            values[slots, :, columns] = value_states.transpose(1, 2)
            return key_states, value_states
        rows = key_states.shape[0]
        return write_step(keys, values, key_states, value_states, self.row_index[:rows],
                          self.write_pos[:rows])


class SlotState(RowState):
    """Running rows in fixed slots; decode steps replayed from CUDA graphs on GPUs."""

    takes_device_tokens = True  # decode inputs may be the previous step's device tensor

    def __init__(self, model: Any, device: torch.device, max_rows: int, max_len: int,
                 cuda_graphs: bool = True, compile_decode: bool = False,
                 bucketed_prefill: bool = False, prefill_budget: int = 8192) -> None:
        self.model = model
        self.device = device
        self.max_rows = max_rows
        self.max_len = max_len
        self.forward = HFForward(model, device)  # forward call and mask rules
        self.lengths: List[int] = []  # tokens held by each running row
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Decode inputs: row 0 the tokens, row 1 the columns they go to (= positions).
        self.inputs = torch.zeros((2, max_rows), dtype=torch.long, device=device)
        self.staging = Staging((2, max_rows), device)
        config = text_config(getattr(model, "config", None))
        layers = getattr(config, "num_hidden_layers", 1)
        self.cache = SlotCache(max_rows, max_len, self.inputs[1], layers)
        self.columns = torch.arange(slot_width(max_len), device=device)
        self.narrow = getattr(getattr(model, "config", None), "_attn_implementation",
                              None) == DECODE_ATTENTION
        self.prefill_graphs: Optional[PrefillGraphs] = None
        if self.use_graphs or bucketed_prefill:
            self.prefill_graphs = PrefillGraphs(self, prefill_budget)
        # Decode through the attention modules' own slots (no cache object), if every
        # layer's attention module can be found.
        self.attention_modules = (attention_modules(model, layers) if self.narrow else None)
        self._slots_fit: Optional[bool] = None  # see _slots_are_what_attention_reads
        self._forward = self._decode_forward
        self.compiled = compile_decode
        self.warm_up_times: Dict[str, float] = {}  # what warm_up spent where (CUDA graphs)
        self.regions: Optional[RegionalCompile] = None
        if compile_decode:
            blocks = (repeated_blocks(model, self.attention_modules)
                      if self.attention_modules else None)
            if blocks is not None:
                self.regions = RegionalCompile(blocks)
            else:  # the whole step, with the cache object
                self.attention_modules = None
                self._forward = torch.compile(self._decode_forward, dynamic=True)
        # Fixed for the state's life; looked up every step.
        self._buckets = doubling(2 if compile_decode and max_rows > 1 else 1, max_rows)
        self._widths = (doubling(128, _round16(max_len)) if self.narrow
                        else [self.columns.shape[0]])

    @property
    def rows(self) -> int:
        """Number of running rows."""
        return len(self.lengths)

    def stats(self) -> KVStats:
        """Slot bytes and the prefill rows computed only to fill a graph bucket."""
        size = sum(t.numel() * t.element_size() for t in self.cache.keys + self.cache.values)
        return KVStats(kind="slots", bytes_total=size, padded_rows=(
            self.prefill_graphs.padded_rows if self.prefill_graphs else 0))

    # -- decode ----------------------------------------------------------------------------
    def decode(self, tokens: Union[List[int], torch.Tensor]) -> torch.Tensor:
        """One step for every row; ``tokens`` may already be on the device (pipelined loop)."""
        rows = len(tokens)
        assert rows == self.rows, "decode rows mismatch"
        # A row may write column max_len (scratch) in the one extra step a pipelined
        # loop runs after it finished; a live row never gets there (its budget ends first).
        if max(self.lengths) > self.max_len:
            raise RuntimeError(f"a row ran past the static cache length {self.max_len}")
        bucket = self._bucket(rows) if self.use_graphs else rows
        width = self._width(max(self.lengths) + 1)
        on_device = isinstance(tokens, torch.Tensor)
        staging = self.staging.acquire()
        staging[:, :bucket].zero_()  # rows past `rows` write column 0 of free slots
        staging[1, :rows] = torch.tensor(self.lengths, dtype=torch.long)
        if not on_device:
            staging[0, :rows] = torch.tensor(tokens, dtype=torch.long)
        self.inputs[:, :bucket].copy_(staging[:, :bucket], non_blocking=True)
        self.staging.queued()
        if on_device:  # queued after the staging copy, so it wins
            self.inputs[0, :rows].copy_(tokens)
        if self.use_graphs:
            graph, output = self._graph(bucket, width)
            graph.replay()
            logits = output[:rows]  # read (sampled) before the next replay overwrites it
        else:
            logits = self._forward(bucket, width)[:rows]
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def _decode_forward(self, bucket: int, width: int) -> torch.Tensor:
        positions = self.inputs[1, :bucket]
        # Attend to the first `width` columns only (attention.py slices the keys to the
        # mask): rows of 200 tokens need not read 512-token slots.
        allowed = (self.columns[None, :width] <= positions[:, None])[:, None, None, :]
        cache = None if self._bind_slots() else self.cache
        regions = self.regions.compiled() if self.regions else nullcontext()
        with regions:
            out = self.model(input_ids=self.inputs[0, :bucket, None],
                             position_ids=positions[:, None],
                             attention_mask=self.forward.mask(
                                 allowed, positions[:, None], self.columns[None, :width]),
                             cache_position=positions[:1], use_cache=cache is not None,
                             logits_to_keep=1, **{self.forward.cache_arg: cache})
        return out.logits[:, -1, :]

    def _bind_slots(self) -> bool:
        """Hand each attention module this state's slots (once the first prefill has
        allocated them); True when decode steps go through them. Checked every step:
        another state on the same model (a test's reference) may have bound its own."""
        modules = self.attention_modules
        if not modules or len(self.cache.keys) != len(modules):
            return False
        if self._slots_fit is None:  # decided once, after a prefill of 2+ tokens
            self._slots_fit = self._slots_are_what_attention_reads(modules)
            if self._slots_fit is None:
                return False
            if not self._slots_fit:
                self._decode_through_the_cache()
                return False
        if getattr(modules[0], "mii_keys", None) is not self.cache.keys[0]:
            for module, keys, values in zip(modules, self.cache.keys, self.cache.values):
                if self.regions:  # fixed for the state's life: no symbols to guard on
                    torch._dynamo.mark_static(keys)
                    torch._dynamo.mark_static(values)
                bind_slots(module, keys, values, self.cache.write_pos, self.cache.row_index)
        return True

    def _slots_are_what_attention_reads(self, modules: List[Any]) -> Optional[bool]:
        """Whether each layer caches the keys/values its attention function attends over
        (heads and sizes seen in a prefill; None before one of 2+ tokens). Not so for
        DeepSeek's latent attention: it caches compressed latents and expands them."""
        seen = [getattr(module, "mii_attended", None) for module in modules]
        if None in seen:
            return None
        return all(shape == (*keys.shape[1::2], *values.shape[1::2])
                   for shape, keys, values in zip(seen, self.cache.keys, self.cache.values))

    def _decode_through_the_cache(self) -> None:
        log.info("decode steps go through the cache object: %s caches something other than "
                 "what its attention reads", type(self.model).__name__)
        self.attention_modules = None
        if self.regions is not None:  # its layers would read layer_idx: compile the step
            self.regions.undo()
            self.regions = None
            self._forward = torch.compile(self._decode_forward, dynamic=True)

    def buckets(self) -> List[int]:
        """Row counts that get their own CUDA graph: powers of two, then max_rows.

        A compiled step starts at 2: torch.compile specializes size-1 dimensions, so a
        bucket of 1 would cost a second compilation for no measurable gain.
        """
        return self._buckets

    def _bucket(self, rows: int) -> int:
        return next(size for size in self._buckets if size >= rows)

    def widths(self) -> List[int]:
        """Key widths decode steps attend over: 128 * 2^k, then the whole slot.

        Only with mii's decode attention, which slices the keys to the mask; other
        attention functions get whole slots.
        """
        return self._widths

    def _width(self, needed: int) -> int:
        # A row past max_len is one a pipelined loop already finished: its extra token is
        # dropped, so its last column need not be visible.
        return next(size for size in self._widths if size >= min(needed, self.max_len))

    def _graph(self, bucket: int, width: int) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (bucket, width)
        if key not in self.graphs:
            self.graphs[key] = capture(lambda: self._forward(bucket, width), self.device,
                                       self._pool, warmups=2)
            log.info("captured the decode step for %d rows x %d columns", bucket, width)
        return self.graphs[key]

    def warm_up(self) -> float:
        """Allocate the cache and capture every bucket's graph now; return the seconds taken.

        Done before the replica reports ready, so no request pays for a capture (or a
        compilation) and the memory the graphs need is claimed up front.
        """
        started = time.perf_counter()
        with torch.inference_mode():
            self.prefill([[0] * 4])  # any token: shapes only
            if self.use_graphs:
                first = None
                for bucket in sorted(self.buckets(), reverse=True):  # largest first: pool reuse
                    for width in sorted(self.widths(), reverse=True):
                        self._graph(bucket, width)
                        first = first or time.perf_counter() - started
                decoded = time.perf_counter() - started
                # A pool of their own: no reasoning about which outputs may alias.
                self.prefill_graphs.capture_all(torch.cuda.graph_pool_handle())
                self.warm_up_times = dict(first_decode_graph_s=round(first, 2),
                                          decode_graphs_s=round(decoded - first, 2),
                                          prefill_graphs_s=round(
                                              time.perf_counter() - started - decoded, 2))
                log.info("[progress] warm-up: first decode graph (with any compilation) "
                         "%(first_decode_graph_s).1fs, the other decode graphs "
                         "%(decode_graphs_s).1fs, prefill graphs %(prefill_graphs_s).1fs",
                         self.warm_up_times)
            else:
                self._forward(1, self.widths()[0])
            self.select([])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def warm_up_step(self) -> bool:
        """Nothing is left for later: ``warm_up`` captures every graph."""
        return False

    # -- prefill and leaving rows -----------------------------------------------------------
    def prefill(self, prompts: List[List[int]]) -> torch.Tensor:
        """Prefill ``prompts`` into free slots after the running rows."""
        lengths = [len(p) for p in prompts]
        if self.rows + len(prompts) > self.max_rows:
            raise RuntimeError(f"more than {self.max_rows} rows for the static cache")
        if max(lengths) >= self.max_len:
            raise RuntimeError(f"a prompt reaches the static cache length {self.max_len}")
        if self.prefill_graphs is not None:
            logits = self.prefill_graphs.run(prompts, replay=self.use_graphs)
            if logits is not None:
                self.lengths += lengths
                return logits
        # The graphs' computation at the prompts' own shape (no bucket holds them).
        ids = left_padded(prompts, self.device)[0]
        logits = prefill_into_slots(self, ids, to_device(lengths, self.device), self.rows)
        self.lengths += lengths
        return logits

    def select(self, keep: List[int]) -> None:
        """Compact the rows ``keep`` into the first slots."""
        moved = [(new, old) for new, old in enumerate(keep) if new != old]
        if moved:
            target = to_device([new for new, _ in moved], self.device)
            source = to_device([old for _, old in moved], self.device)
            for keys, values in zip(self.cache.keys, self.cache.values):
                keys[target] = keys[source]  # the gather copies before the scatter writes
                values[target] = values[source]
        self.lengths = [self.lengths[old] for old in keep]


def fitting_length(bytes_per_token: int, rows: int, free_bytes: int, context: int,
                   share: float = 0.5) -> int:
    """Slot length (a multiple of 16, at most ``context``) whose cache for ``rows`` rows
    takes ``share`` of the free memory left after the 2 GiB kept for activations."""
    usable = share * max(0, free_bytes - 2 * 2**30)
    return min(context, int(usable // (bytes_per_token * rows)) // 16 * 16)


def _bytes_per_token(model: Any) -> int:
    config = text_config(model.config)
    heads = getattr(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def size_slots(loaded: Any, max_rows: int) -> None:
    """``max_length`` unset on a GPU: shorten the served context to what fits.

    The model's own context (e.g. 128k tokens) times max_batch_size rarely fits; half
    of the free memory does. ``loaded.context_length`` is lowered with it, so requests
    beyond it are refused at submit, naming the limit, instead of failing the batch.
    """
    try:
        per_token = _bytes_per_token(loaded.model)
    except (AttributeError, TypeError):  # an unusual config: the allocation check decides
        log.info("kv_cache='static': cannot size slots from %s; using the model's context",
                 type(getattr(loaded.model, "config", None)).__name__)
        return
    free, _ = torch.cuda.mem_get_info(loaded.device)
    length = fitting_length(per_token, max_rows, free, loaded.context_length)
    if length < 64:
        raise RuntimeError(
            f"kv_cache='static': {free / 2**30:.1f} GiB free on {loaded.device} leave "
            f"{length} tokens per row for max_batch_size={max_rows}: lower max_batch_size "
            "or use kv_cache='dynamic'")
    if length < loaded.context_length:
        log.info("[progress] kv_cache='static' without max_length: %d-token slots for %d "
                 "rows (half the free memory); longer requests are refused",
                 length, max_rows)
        loaded.context_length = length


def make_slot_state(loaded: Any, max_rows: int, cuda_graphs: bool, world_size: int,
                    compile_decode: bool, length_given: bool, prefill_budget: int) -> SlotState:
    """``kv_cache="static"``: slots of ``max_length`` tokens (the same on every rank)."""
    single = world_size == 1
    # Ranks of one replica must agree on the length; each sees only its own memory.
    if not length_given and single and loaded.device.type == "cuda":
        size_slots(loaded, max_rows)
    from mii_engines.runtime.patches.attention import use_grouped_decode_attention

    use_grouped_decode_attention(loaded.model)
    if single:  # sharded (AutoTP) layers are not plain nn.Linear; fusing is for tp=1
        from mii_engines.runtime.patches.fusion import fuse_projections

        fuse_projections(loaded.model)
    # NCCL collectives inside captured graphs are not set up here: eager for TP > 1.
    return SlotState(loaded.model, loaded.device, max_rows, loaded.context_length,
                     cuda_graphs=cuda_graphs and single, compile_decode=compile_decode and single,
                     prefill_budget=prefill_budget)
