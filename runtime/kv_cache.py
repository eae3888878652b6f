"""Paged KV cache: one preallocated pool of blocks per layer, and the block allocator with its prefix cache.

Layout per layer: k and v are [num_blocks, block_size, num_kv_heads, head_dim] (see qwen2rt.models.backend).
The pool is zero-filled once so that rows past a sequence's length, which a kernel may load and mask, are never
NaN garbage.

Prefix cache. A full block whose k/v have been written (the steps that write them launched: a prefill's, or the
decode steps of generated tokens) may be registered under a key (parent entry, the block's token ids), where the
parent entry is the entry id of the cached block before it in the same sequence (-1 for a sequence's first block).
Entry ids come from a counter and are never reused, so a key matches only a block whose own tokens and, link by
link, every earlier token of its sequence are exactly the request's: reuse is exact by construction, with no hash to
collide (a key hashes one block's tokens, so looking up a prompt costs time linear in its length).

Every block is in exactly one of three states:
- free: never registered, or its entry evicted; in `_free`;
- owned: referenced by `_refs[block]` >= 1 sequences (a cached block may be shared by several);
- cached and unreferenced: registered, no sequence holds it; in `_lru`, oldest release first. Allocation takes
  free blocks first and then evicts from the front of the LRU (the entry is dropped, the block reused).
`num_free_blocks` counts both kinds a request may take: free, and cached unreferenced.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from qwen2rt.models.config import Qwen2Config

BlockKey = tuple[int, tuple[int, ...]]  # (parent entry id or -1, the block's token ids)


def kv_bytes_per_token(config: Qwen2Config, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem


class KVCache:
    def __init__(self, config: Qwen2Config, num_blocks: int, block_size: int, device, dtype):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(config.num_hidden_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self._refs = [0] * num_blocks  # sequences holding each block
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced blocks, the next to evict first
        self._cached: dict[BlockKey, int] = {}  # key -> block holding those tokens' k/v
        self._entry: dict[int, tuple[int, BlockKey]] = {}  # cached block -> (its entry id, its key)
        self._entry_ids = itertools.count()
        self.evictions = 0  # cached blocks whose entry was dropped to make room

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and cached ones no sequence holds (evicted on demand)."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held by a sequence or not."""
        return len(self._entry)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks that no sequence holds (in the LRU)."""
        return len(self._lru)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> list[int]:
        """`num_blocks` blocks, each referenced once, holding nothing cached: free blocks first, then the least
        recently released cached blocks, whose entries are dropped."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"KV cache: {num_blocks} blocks requested, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._lru.popitem(last=False)
                _, key = self._entry.pop(block)
                del self._cached[key]
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block nobody holds any more goes back to the free list, or, if it is
        cached, to the LRU's end; the blocks go in reverse order, so a sequence's later blocks (whose keys chain
        from the earlier ones) are evicted before its earlier ones."""
        for block in reversed(blocks):
            refs = self._refs[block]
            if refs < 1:
                raise RuntimeError(f"KV cache: block {block} freed but no sequence holds it (double free)")
            self._refs[block] = refs - 1
            if refs == 1:
                if block in self._entry:
                    self._lru[block] = None
                else:
                    self._free.append(block)

    # ---- prefix cache ----------------------------------------------------------------------------------------
    def match(self, block_tokens: list[tuple[int, ...]], parent: int = -1) -> tuple[list[int], list[int]]:
        """The longest cached run of full blocks that follows the block of entry `parent` (-1: starting at a
        sequence's first block). block_tokens: the token ids of the sequence's next full blocks, in order. ->
        (blocks, their entry ids); nothing is referenced yet (see `acquire`)."""
        blocks, entries = [], []
        for tokens in block_tokens:
            block = self._cached.get((parent, tokens))
            if block is None:
                break
            parent = self._entry[block][0]
            blocks.append(block)
            entries.append(parent)
        return blocks, entries

    def num_unreferenced(self, blocks: list[int]) -> int:
        """How many of these (cached) blocks sit in the LRU: acquiring them takes them out of `num_free_blocks`."""
        return sum(1 for b in blocks if b in self._lru)

    def acquire(self, blocks: list[int]) -> None:
        """Reference cached blocks that `match` returned (taking them out of the LRU if nobody held them)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._lru[block]
            self._refs[block] += 1

    def register(self, block: int, parent_entry: int, tokens: tuple[int, ...]) -> int:
        """Cache a full block whose k/v for `tokens` have been written (their step launched) after the block of
        entry `parent_entry` (-1: the sequence's first block). The caller holds the block. -> the entry id a
        sequence chains its next block from: this block's, or that of a block already cached under the same key.
        Then, if no sequence holds that other block, this one takes over its entry (the other is freed): the entry
        lives on in a held block, so the blocks this sequence registers after it, chained from it, stay reachable
        (an unheld copy could be evicted while the sequence runs); if a sequence holds it, this one stays uncached
        and is freed normally."""
        if self._refs[block] < 1:
            raise RuntimeError(f"KV cache: block {block} registered but no sequence holds it")
        key = (parent_entry, tokens)
        other = self._cached.get(key)
        if other is not None:
            entry = self._entry[other][0]
            if self._refs[other] == 0 and block not in self._entry:
                del self._lru[other], self._entry[other]
                self._free.append(other)
                self._cached[key] = block
                self._entry[block] = (entry, key)
            return entry
        if block in self._entry:
            raise RuntimeError(f"KV cache: block {block} is already cached under another key")
        entry = next(self._entry_ids)
        self._cached[key] = block
        self._entry[block] = (entry, key)
        return entry

    def forget(self, blocks: list[int]) -> None:
        """Drop the cache entries of these blocks (registered for writes that were planned but never launched); one
        that no sequence holds goes back to the free list."""
        for block in blocks:
            if block in self._entry:
                _, key = self._entry.pop(block)
                del self._cached[key]
                if block in self._lru:
                    del self._lru[block]
                    self._free.append(block)

    def check(self, holders: list[list[int]] | None = None) -> None:
        """Assert the allocator's invariants: every block is free, owned or cached-unreferenced, exactly once;
        the key table and the entries agree. holders: the block lists of every sequence holding blocks, whose
        counts must equal the reference counts."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & lru, "a block is both free and cached-unreferenced"
        for block in range(self.num_blocks):
            states = (self._refs[block] > 0) + (block in free) + (block in lru)
            assert states == 1, f"block {block} is in {states} states (owned, free, cached-unreferenced)"
            assert block not in free or block not in self._entry, f"free block {block} still has a cache entry"
            assert block not in lru or block in self._entry, f"block {block} is in the LRU without a cache entry"
        assert len(self._cached) == len(self._entry)
        for key, block in self._cached.items():
            assert self._entry[block][1] == key
        if holders is not None:
            counts = [0] * self.num_blocks
            for blocks in holders:
                for block in blocks:
                    counts[block] += 1
            assert counts == self._refs, "reference counts differ from the blocks sequences hold"
