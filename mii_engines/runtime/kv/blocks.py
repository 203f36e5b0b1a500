"""Blocks of the paged KV cache: the pool, each sequence's block table, and the prefix cache.

Host-side bookkeeping on rank 0 (the scheduler's ``KVSpace`` for the paged state);
the device tensors live in ``kv/paged.py``. A block holds ``block_size`` consecutive
token positions of one sequence, for every layer.

Prefix cache: once a block is full of prompt tokens, it is registered under a hash of
its tokens and of every token before it (the parent block's hash). A later sequence
whose prompt starts with the same tokens takes those blocks (reference counted)
instead of computing them. A block nobody references stays cached ("evictable") and
is reused, least recently released first, only when no never-used block is left.
Block 0 is never handed out: padding tokens of a captured graph write there.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

from mii_engines.runtime.kv.interface import KVStats

TRASH_BLOCK = 0


def block_hash(parent: bytes, tokens: List[int]) -> bytes:
    """The identity of a full block: its tokens and (through ``parent``) all before them."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Reference-counted blocks, with the content hashes of cached ones."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free: Deque[int] = deque(range(1, num_blocks))  # never cached, or evicted
        self._evictable: "OrderedDict[int, bytes]" = OrderedDict()  # refs 0, still cached
        self._by_hash: Dict[bytes, int] = {}
        self._hash_of: Dict[int, bytes] = {}
        self.peak_used = 0

    @property
    def usable(self) -> int:
        """Blocks that sequences can hold (all but the trash block)."""
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks an allocation can take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.usable - self.available()

    def allocate(self) -> int:
        """A block for new content (an evictable one loses its cached content)."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, digest = self._evictable.popitem(last=False)
            del self._by_hash[digest], self._hash_of[block]
        else:
            raise RuntimeError("the KV pool is exhausted")
        self.refs[block] = 1
        self.peak_used = max(self.peak_used, self.used())
        return block

    def lookup(self, digest: bytes) -> Optional[int]:
        """The cached block holding this content, if any."""
        return self._by_hash.get(digest)

    def acquire(self, block: int) -> None:
        """One more sequence uses this (cached) block."""
        if self.refs[block] == 0:
            del self._evictable[block]
        self.refs[block] += 1
        self.peak_used = max(self.peak_used, self.used())

    def release(self, block: int) -> None:
        """One sequence less uses ``block``; unused, it stays cached if it has a hash."""
        self.refs[block] -= 1
        if self.refs[block] < 0:
            raise RuntimeError(f"block {block} released more often than taken")
        if self.refs[block] == 0:
            digest = self._hash_of.get(block)
            if digest is None:
                self._free.append(block)
            else:
                self._evictable[block] = digest  # most recently released last

    def register(self, block: int, digest: bytes) -> None:
        """``block`` is full and holds the content ``digest`` names (first one wins)."""
        if digest not in self._by_hash and block not in self._hash_of:
            self._by_hash[digest] = block
            self._hash_of[block] = digest


@dataclass
class _Table:
    blocks: List[int] = field(default_factory=list)
    hashes: List[bytes] = field(default_factory=list)  # of its leading full prompt blocks
    tokens: List[int] = field(default_factory=list)  # fed so far (for hashing)


class PagedSpace:
    """The scheduler's view of the paged cache: block tables per slot, prefix hits."""

    chunked = True

    def __init__(self, pool: BlockPool, block_size: int, max_tokens: int,
                 prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = block_size
        self._max_tokens = min(max_tokens, pool.usable * block_size)
        self.prefix_caching = prefix_caching
        self._tables: Dict[int, _Table] = {}
        self._updates: List[Tuple[int, int, List[int]]] = []
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    def max_tokens(self) -> int:
        """The longest sequence: the model's context, or what the whole pool holds."""
        return self._max_tokens

    def max_blocks_per_seq(self) -> int:
        """Block-table width that holds the longest sequence."""
        return -(-self._max_tokens // self.block_size)

    def prefill_cost(self, lengths: List[int]) -> int:
        """Tokens are packed, not padded: the cost is their sum."""
        return sum(lengths)

    def open(self, slot: int, tokens: List[int]) -> int:
        """Start ``slot``'s table with the cached blocks its tokens begin with."""
        if slot in self._tables:
            raise RuntimeError(f"slot {slot} is already open")
        table = self._tables[slot] = _Table()
        if not self.prefix_caching:
            return 0
        size, parent = self.block_size, b""
        # At least one token is always computed: its logits give the first new token.
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % size, size):
            digest = block_hash(parent, tokens[start:start + size])
            block = self.pool.lookup(digest)
            if block is None:
                break
            self.pool.acquire(block)
            table.blocks.append(block)
            table.hashes.append(digest)
            parent = digest
        hit = len(table.blocks) * size
        table.tokens = list(tokens[:hit])
        self.prefix_query_tokens += len(tokens)
        self.prefix_hit_tokens += hit
        if table.blocks:
            self._updates.append((slot, 0, list(table.blocks)))
        return hit

    def reserve(self, slot: int, length: int) -> bool:
        """Blocks for ``length`` tokens in ``slot`` (all or none)."""
        table = self._tables[slot]
        needed = -(-length // self.block_size) - len(table.blocks)
        if needed <= 0:
            return True
        if length > self._max_tokens or needed > self.pool.available():
            return False
        new = [self.pool.allocate() for _ in range(needed)]
        self._updates.append((slot, len(table.blocks), new))
        table.blocks.extend(new)
        return True

    def fed(self, slot: int, tokens: List[int], start: int) -> None:
        """Register the prompt blocks these tokens complete (prefix caching)."""
        if not self.prefix_caching:
            return
        table = self._tables[slot]
        if start != len(table.tokens):  # a gap (never for prompts): stop caching this one
            return
        table.tokens.extend(tokens)
        size = self.block_size
        while (len(table.hashes) + 1) * size <= len(table.tokens):
            index = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else b""
            digest = block_hash(parent, table.tokens[index * size:(index + 1) * size])
            self.pool.register(table.blocks[index], digest)
            table.hashes.append(digest)

    def close(self, slot: int) -> None:
        """Return ``slot``'s blocks to the pool (cached ones stay reusable)."""
        table = self._tables.pop(slot)
        for block in reversed(table.blocks):  # the tail first: it is the least shared
            self.pool.release(block)

    def blocks_of(self, slot: int) -> List[int]:
        """``slot``'s block table (for tests and stats)."""
        return list(self._tables[slot].blocks)

    def take_table_updates(self) -> List[Tuple[int, int, List[int]]]:
        """Table writes since the last call."""
        updates, self._updates = self._updates, []
        return updates

    def stats(self) -> KVStats:
        """Pool use and prefix-cache figures."""
        return KVStats(kind="paged", block_size=self.block_size,
                       blocks_total=self.pool.usable, blocks_used=self.pool.used(),
                       blocks_peak=self.pool.peak_used, prefix_hit_tokens=self.prefix_hit_tokens,
                       prefix_query_tokens=self.prefix_query_tokens)
