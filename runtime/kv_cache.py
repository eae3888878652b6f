"""Paged KV cache: one preallocated pool of blocks per layer and a block allocator.

Layout per layer: k and v are [num_blocks, block_size, num_kv_heads, head_dim] (see qwen2rt.models.backend).
The pool is zero-filled once so that rows past a sequence's length, which a kernel may load and mask, are never
NaN garbage.
"""

from __future__ import annotations

import torch

from qwen2rt.models.config import Qwen2Config


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

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"KV cache: {num_blocks} blocks requested, {len(self._free)} free")
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
