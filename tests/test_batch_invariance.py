"""Batch invariance of the decode step (triton backend, through the interpreter): a sequence's logits are bitwise the
same alone, among 7 others, in a batch of 16 or 32, and with padding rows, because every decode kernel (GEMVs,
attention, the MoE GEMVs) reduces a row in an order fixed by the model's shapes, never by the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen2rt.models.backend import AttentionMetadata, get_backend
from qwen2rt.models.config import builtin_config
from qwen2rt.models.qwen2 import Qwen2Model, random_weights
from qwen2rt.models.rope import RotaryTables


def _setup(name: str, batch: int, max_len: int, seed: int, device="cpu", dtype=torch.float32, layers=None):
    config = builtin_config(name)
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    model = Qwen2Model(config, random_weights(config, device, dtype, seed=seed), get_backend("triton"),
                       RotaryTables.build(config, max_len, device))
    block_size = 16
    blocks_per_seq = -(-max_len // block_size)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch * blocks_per_seq, block_size, config.num_key_value_heads, config.head_dim)
    # random cached context (what earlier steps would have written); each sequence owns its own blocks
    caches = [tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
              for _ in range(config.num_hidden_layers)]
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq).to(device)
    lengths = torch.randint(1, max_len, (batch,), generator=gen).to(device)
    tokens = torch.randint(0, config.vocab_size, (batch,), generator=gen).to(device)
    return model, caches, tables, lengths, tokens, block_size


def _decode_logits(model, caches, tables, lengths, tokens, block_size, rows: list[int], pad_to: int):
    """One decode step of the sequences `rows` (in that order), padded to `pad_to` rows like a graph bucket."""
    dev = tables.device
    rows_t = torch.tensor(rows, device=dev)
    lens, pos = lengths[rows_t], lengths[rows_t] - 1
    slots = tables[rows_t, pos // block_size].long() * block_size + pos % block_size
    pad = pad_to - len(rows)
    meta = AttentionMetadata(
        positions=torch.cat([pos, torch.zeros(pad, dtype=torch.long, device=dev)]),
        slot_mapping=torch.cat([slots, torch.full((pad,), -1, dtype=torch.long, device=dev)]),
        block_tables=torch.cat([tables[rows_t], torch.zeros(pad, tables.shape[1], dtype=torch.int32, device=dev)]),
        seq_lens=torch.cat([lens, torch.zeros(pad, dtype=torch.long, device=dev)]), is_prefill=False)
    ids = torch.cat([tokens[rows_t], torch.zeros(pad, dtype=torch.long, device=dev)])
    return model.compute_logits(model.forward(ids, meta, caches))[:len(rows)]


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_decode_logits_bitwise_equal_alone_and_among_others(name):
    """Bucket 1 vs a bucket of 8 (the sequence at another row, with padding rows), one long context (two attention
    chunks) among short ones. MoE: the 1-4 and 5-32 token buckets have equal default configs; on a GPU their
    tuned configs (kernels.moe.tune) may differ, and then a MoE model is invariant within each bucket only."""
    model, caches, tables, lengths, tokens, bs = _setup(name, batch=8, max_len=300, seed=3)
    lengths[5] = 299
    args = (model, caches, tables, lengths, tokens, bs)
    alone = _decode_logits(*args, rows=[5], pad_to=1)[0]
    among = _decode_logits(*args, rows=[2, 7, 5, 0, 1], pad_to=8)
    assert torch.equal(alone, among[2])
    assert not torch.equal(among[2], among[1])  # rows differ: the comparison is not vacuous


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_decode_logits_bitwise_equal_in_buckets_16_and_32(name, monkeypatch):
    """The first 16 sequences of a batch of 32 give the same logits as those 16 alone (MoE: both in the 5-32 token
    bucket of the decode GEMVs; one MoE layer, large tiles pinned: few programs for the interpreter)."""
    moe = name == "tiny-moe"
    if moe:
        monkeypatch.setenv("QWEN2RT_MOE_CONFIG", '{"BLOCK_N": 128, "BLOCK_K": 128}')
    model, caches, tables, lengths, tokens, bs = _setup(name, batch=32, max_len=40, seed=4, layers=2 if moe else None)
    args = (model, caches, tables, lengths, tokens, bs)
    sixteen = _decode_logits(*args, rows=list(range(16)), pad_to=16)
    all32 = _decode_logits(*args, rows=list(range(32)), pad_to=32)
    assert torch.equal(sixteen, all32[:16])


@pytest.mark.gpu
def test_decode_logits_bitwise_equal_on_gpu():
    """bf16 on the GPU, Qwen2-0.5B shapes (2 layers): M = 1 compiles to its own GEMV kernel there, so this is the
    check the interpreter cannot make. Alone vs among 8 (padded), 16 vs 32, one context of several chunks."""
    model, caches, tables, lengths, tokens, bs = _setup("qwen2-0.5b", batch=32, max_len=2000, seed=5, device="cuda",
                                                        dtype=torch.bfloat16, layers=2)
    lengths[5] = 1999
    args = (model, caches, tables, lengths, tokens, bs)
    alone = _decode_logits(*args, rows=[5], pad_to=1)[0]
    among = _decode_logits(*args, rows=[2, 7, 5, 0, 1], pad_to=8)
    assert torch.equal(alone, among[2])
    sixteen = _decode_logits(*args, rows=list(range(16)), pad_to=16)
    all32 = _decode_logits(*args, rows=list(range(32)), pad_to=32)
    assert torch.equal(sixteen, all32[:16]) and torch.equal(alone, sixteen[5])
