"""The small interface every op of the model goes through, and its pure-PyTorch implementation.

The model never calls a kernel directly: it calls a `Backend`, so the same model code runs on CPU (`torch`) and
on GPU (`triton`, from the kernel issues), and tests compare the two. A backend is registered by name with
`register_backend`.

KV cache layout (paged): per layer, k and v are `[num_blocks, block_size, num_kv_heads, head_dim]`; a sequence
owns the blocks listed in its row of `block_tables`; the token at position p of sequence b lives in block
`block_tables[b, p // block_size]`, row `p % block_size`. `slot_mapping[t] = block * block_size + row` is where
new token t is written, -1 for a padding row that writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .rope import RotaryTables


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit, for all layers. T new tokens from B sequences.

    positions:     [T] int64  rotary position of each new token
    slot_mapping:  [T] int64  cache slot each new token's k/v is written to; -1 writes nothing
    block_tables:  [B, max_blocks] int32  cache blocks of each sequence, in order
    seq_lens:      [B] int32  context length of each sequence after this step (cached prefix + new tokens);
                              0 marks a padding row
    query_start:   [B + 1] int32  prefill only: new tokens of sequence b are rows query_start[b]:query_start[b+1]
    is_prefill:    prefill (any number of new tokens per sequence) or decode (exactly one per sequence, row b)
    max_seq_len:   host int, the largest entry of seq_lens (bounds the torch backend's gathers)
    query_lens_host, seq_lens_host: host copies for loops in the torch backend (prefill only)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    is_prefill: bool
    max_seq_len: int
    query_start: torch.Tensor | None = None
    query_lens_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


@dataclass
class MoEWeights:
    """One sparse MoE block. E experts of width I, shared expert of width Is (absent when Is == 0)."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H]  rows [gate | up]
    down: torch.Tensor  # [E, H, I]
    shared_gate_up: torch.Tensor | None  # [2Is, H]
    shared_down: torch.Tensor | None  # [H, Is]
    shared_gate: torch.Tensor | None  # [1, H]  sigmoid gate of the shared expert
    top_k: int
    norm_topk_prob: bool


class Backend:
    """The ops the model needs. Shapes: x is [T, H]; weights are in `nn.Linear` layout [out, in]."""

    name = "abstract"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """-> (rms_norm(x + residual), x + residual)"""
        raise NotImplementedError

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2I] packing [gate | up] -> silu(gate) * up, [..., I]"""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rope: RotaryTables,
                  meta: AttentionMetadata, shape: AttentionShape) -> torch.Tensor:
        """Rotary-embed q and k of the packed projection qkv [T, (Hq + 2 Hkv) D], write rotated k and v to the
        cache at meta.slot_mapping, attend causally over each sequence's cached context; -> [T, Hq D]."""
        raise NotImplementedError

    def moe(self, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
        """Sparse MoE block, Hugging Face semantics: softmax router in fp32, top-k, optional renormalisation,
        experts weighted and summed, plus the shared expert scaled by sigmoid(shared_gate x)."""
        raise NotImplementedError


# ---- pure PyTorch ----------------------------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D/2] float32 -> rotated x, computed in fp32, in x's dtype."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def split_qkv_rotated(qkv, rope: RotaryTables, positions, shape: AttentionShape):
    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    cos, sin = rope.cos[positions], rope.sin[positions]
    q = apply_rotary(q.reshape(t, hq, d), cos, sin)
    k = apply_rotary(k.reshape(t, hkv, d), cos, sin)
    return q, k, v.reshape(t, hkv, d)


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter new k/v [T, Hkv, D] into the paged cache; slot -1 writes nothing."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots] = k[valid].to(k_cache.dtype)
    flat_v[slots] = v[valid].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence -> [length, Hkv, D]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def attention_reference(q, k, v, scale: float, q_positions: torch.Tensor, kv_valid: torch.Tensor | None = None):
    """Causal GQA attention in fp32. q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; key j is visible to query i when
    j <= q_positions[b, i] (and kv_valid[b, j]). Rows that see no key get 0. -> [B, Tq, Hq, D] in q's dtype."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    qf = q.float().reshape(b, tq, hkv, group, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, k.float()) * scale
    visible = torch.arange(tk, device=q.device)[None, None, :] <= q_positions[:, :, None]  # [B, Tq, Tk]
    if kv_valid is not None:
        visible = visible & kv_valid[:, None, :]
    visible = visible[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float())
    return out.reshape(b, tq, hq, d).to(q.dtype)


class TorchBackend(Backend):
    """Reference implementation: plain PyTorch, CPU or GPU, fp32 accumulation where it matters."""

    name = "torch"
    # prefill attends in query chunks so that the fp32 score matrix stays ~256 MB whatever the prompt length
    max_score_elements = 1 << 26

    def rms_norm(self, x, weight, eps):
        # Same order as Hugging Face's Qwen2RMSNorm: normalise in fp32, cast back, then scale.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(x.dtype)

    def add_rms_norm(self, x, residual, weight, eps):
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def attention(self, qkv, k_cache, v_cache, rope, meta, shape):
        q, k, v = split_qkv_rotated(qkv, rope, meta.positions, shape)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        hq, d = shape.num_heads, shape.head_dim
        if meta.is_prefill:
            out = torch.empty_like(q)
            starts = meta.query_start.tolist()
            for b, (qlen, ctx) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
                kb = gather_kv(k_cache, meta.block_tables[b], ctx)[None]
                vb = gather_kv(v_cache, meta.block_tables[b], ctx)[None]
                chunk = max(1, self.max_score_elements // (hq * ctx))
                for c0 in range(0, qlen, chunk):
                    c1 = min(qlen, c0 + chunk)
                    q_pos = torch.arange(ctx - qlen + c0, ctx - qlen + c1, device=q.device)[None]
                    out[starts[b] + c0:starts[b] + c1] = attention_reference(
                        q[starts[b] + c0:starts[b] + c1][None], kb, vb, shape.scale, q_pos)[0]
            return out.reshape(-1, hq * d)
        # decode: one token per sequence; gather every sequence's blocks up to the longest context
        block_size = k_cache.shape[1]
        width = max(1, (meta.max_seq_len + block_size - 1) // block_size)
        blocks = meta.block_tables[:, :width].long()
        bsz = blocks.shape[0]
        kb = k_cache[blocks].reshape(bsz, width * block_size, *k_cache.shape[2:])
        vb = v_cache[blocks].reshape(bsz, width * block_size, *v_cache.shape[2:])
        seq_lens = meta.seq_lens.long()
        kv_valid = torch.arange(width * block_size, device=q.device)[None, :] < seq_lens[:, None]
        q_pos = (seq_lens - 1)[:, None]
        out = attention_reference(q[:, None], kb, vb, shape.scale, q_pos, kv_valid)
        return out.reshape(bsz, hq * d)

    def moe(self, x, w):
        num_experts = w.router.shape[0]
        logits = F.linear(x, w.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, w.top_k, dim=-1)
        if w.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(x.dtype)
        out = torch.zeros_like(x)
        counts = torch.bincount(top_i.flatten(), minlength=num_experts).tolist()
        for e in range(num_experts):
            if counts[e] == 0:
                continue
            token, slot = torch.where(top_i == e)
            h = self.silu_and_mul(F.linear(x[token], w.gate_up[e]))
            y = F.linear(h, w.down[e]) * top_w[token, slot, None]
            out.index_add_(0, token, y)
        if w.shared_gate_up is not None:
            shared = F.linear(self.silu_and_mul(F.linear(x, w.shared_gate_up)), w.shared_down)
            out = out + torch.sigmoid(F.linear(x, w.shared_gate)) * shared
        return out


BACKENDS: dict[str, Callable[[], Backend]] = {"torch": TorchBackend}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    BACKENDS[name] = factory


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]()


def default_backend_name(device: torch.device) -> str:
    """`triton` on CUDA once the Triton backend is registered, `torch` otherwise."""
    return "triton" if device.type == "cuda" and "triton" in BACKENDS else "torch"
