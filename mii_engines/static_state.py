"""A preallocated ("static") KV cache with one slot per running row, and CUDA-graph decode.

Same contract as :class:`mii_engines.batch_state.BatchState` (``apply(plan)``), so the
batching loop does not care which one runs. Differences:

- Every row owns a slot of a preallocated [rows, kv_heads, max_len, head_dim] buffer per
  layer; its tokens start at column 0, so positions equal columns and no padding exists.
- A decode step writes each row's new key/value at that row's own column (an
  ``index_put_`` with device tensors) and attends over the whole slot with a mask built
  on the device from the rows' lengths. Shapes depend only on the number of rows, so
  on CUDA each row-count bucket (1, 2, 4, ... max rows) is captured once as a CUDA graph
  and replayed: one launch per step instead of hundreds.
- Prompts are prefilled eagerly with a dynamic cache, then copied into their slots.
- Rows that leave are compacted: the rows after them move down one slot at a time.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import DynamicCache

from mii_engines.batch_state import BatchState, StepPlan

log = logging.getLogger(__name__)


class SlotCache:
    """The cache object handed to the model: ``update`` writes one column per row."""

    is_compileable = False

    def __init__(self) -> None:
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.write_pos: Optional[torch.Tensor] = None  # [max_rows] column each row writes
        self.row_index: Optional[torch.Tensor] = None  # [max_rows] 0..max_rows-1

    def allocate(self, like: DynamicCache, max_rows: int, max_len: int) -> None:
        """Allocate buffers shaped after a prefilled dynamic cache's layers."""
        for layer in like.layers:
            _, heads, _, dim = layer.keys.shape
            shape = (max_rows, heads, max_len, dim)
            self.keys.append(torch.zeros(shape, dtype=layer.keys.dtype, device=layer.keys.device))
            self.values.append(torch.zeros(shape, dtype=layer.values.dtype,
                                           device=layer.values.device))
        device = like.layers[0].keys.device
        self.write_pos = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.row_index = torch.arange(max_rows, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused: mii always passes cache_position and a 4D mask."""
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write the new column of every row; return the rows' whole slots."""
        rows = key_states.shape[0]
        index, columns = self.row_index[:rows], self.write_pos[:rows]
        self.keys[layer_idx][index, :, columns, :] = key_states[:, :, 0, :]
        self.values[layer_idx][index, :, columns, :] = value_states[:, :, 0, :]
        return self.keys[layer_idx][:rows], self.values[layer_idx][:rows]


class StaticBatchState:
    """Running rows in fixed slots; decode steps replayed from CUDA graphs on GPUs."""

    def __init__(self, model: Any, device: torch.device, max_rows: int, max_len: int,
                 cuda_graphs: bool = True) -> None:
        self.model = model
        self.device = device
        self.max_rows = max_rows
        self.max_len = max_len
        self.eager = BatchState(model, device)  # prefill path and mask rules
        self.cache = SlotCache()
        self.lengths: List[int] = []  # tokens held by each running row
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.input_ids: Optional[torch.Tensor] = None
        self.columns = torch.arange(max_len, device=device)

    @property
    def rows(self) -> int:
        """Number of running rows."""
        return len(self.lengths)

    # The same three operations in the same order as the dynamic state.
    apply = BatchState.apply

    # -- decode ----------------------------------------------------------------------------
    def _decode(self, tokens: List[int]) -> torch.Tensor:
        rows = len(tokens)
        assert rows == self.rows, "decode rows mismatch"
        if max(self.lengths) >= self.max_len:
            raise RuntimeError(f"a row reached the static cache length {self.max_len}")
        bucket = self._bucket(rows)
        self.input_ids[:bucket].zero_()
        self.input_ids[:rows, 0] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.cache.write_pos[:bucket].zero_()
        self.cache.write_pos[:rows] = torch.tensor(self.lengths, dtype=torch.long,
                                                   device=self.device)
        if self.use_graphs:
            graph, output = self._graph(bucket)
            graph.replay()
            logits = output[:rows].clone()
        else:
            logits = self._decode_forward(bucket)[:rows]
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def _decode_forward(self, bucket: int) -> torch.Tensor:
        positions = self.cache.write_pos[:bucket]
        allowed = (self.columns[None, :] <= positions[:, None])[:, None, None, :]
        out = self.model(input_ids=self.input_ids[:bucket], position_ids=positions[:, None],
                         attention_mask=self.eager._mask_for_model(allowed),
                         cache_position=positions[:1], use_cache=True, logits_to_keep=1,
                         **{self.eager.cache_arg: self.cache})
        return out.logits[:, -1, :]

    def _bucket(self, rows: int) -> int:
        bucket = 1
        while bucket < rows:
            bucket *= 2
        return min(bucket, self.max_rows)

    def _graph(self, bucket: int) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if bucket not in self.graphs:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm up outside the graph, as CUDA requires
                for _ in range(2):
                    self._decode_forward(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self._decode_forward(bucket)
            self.graphs[bucket] = (graph, output)
            log.info("captured the decode step for %d rows as a CUDA graph", bucket)
        return self.graphs[bucket]

    # -- prefill and leaving rows -----------------------------------------------------------
    def _prefill(self, prompts: List[List[int]]) -> torch.Tensor:
        if self.rows + len(prompts) > self.max_rows:
            raise RuntimeError(f"more than {self.max_rows} rows for the static cache")
        if max(len(p) for p in prompts) >= self.max_len:
            raise RuntimeError(f"a prompt reaches the static cache length {self.max_len}")
        scratch = BatchState(self.model, self.device)
        logits = scratch._prefill(prompts)
        if not self.cache.keys:
            self.cache.allocate(scratch.cache, self.max_rows, self.max_len)
            self.input_ids = torch.zeros((self.max_rows, 1), dtype=torch.long, device=self.device)
        width = scratch.mask.shape[1]
        for offset, prompt in enumerate(prompts):
            slot, length = self.rows + offset, len(prompt)
            for layer, source in enumerate(scratch.cache.layers):
                self.cache.keys[layer][slot, :, :length] = source.keys[offset, :, width - length:]
                self.cache.values[layer][slot, :, :length] = source.values[offset, :,
                                                                           width - length:]
        self.lengths += [len(p) for p in prompts]
        return logits

    def _select(self, keep: List[int]) -> None:
        for new, old in enumerate(keep):
            if new != old:  # keep is increasing, so sources are never overwritten first
                for keys, values in zip(self.cache.keys, self.cache.values):
                    keys[new].copy_(keys[old])
                    values[new].copy_(values[old])
        self.lengths = [self.lengths[old] for old in keep]


def make_state(loaded: Any, kv_cache: str, max_rows: int, cuda_graphs: bool,
               world_size: int) -> Any:
    """The batch state the configuration asks for (same on every rank of a replica)."""
    if kv_cache == "static":
        # NCCL collectives inside captured graphs are not set up here: eager for TP > 1.
        return StaticBatchState(loaded.model, loaded.device, max_rows, loaded.context_length,
                                cuda_graphs=cuda_graphs and world_size == 1)
    return BatchState(loaded.model, loaded.device)
