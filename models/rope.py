"""Rotary position embedding tables: rope_theta with the default, linear and YaRN scalings, computed the way
Hugging Face's `modeling_rope_utils` computes them (fp32 inverse frequencies; YaRN's attention factor multiplies
both cos and sin)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import Qwen2Config


def inverse_frequencies(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention factor)."""
    dim = config.head_dim
    base = config.rope_theta
    rs = config.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    pos_freqs = base ** exponents
    if rs.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rs.rope_type == "linear":
        return (1.0 / pos_freqs) / rs.factor, 1.0
    if rs.rope_type != "yarn":
        raise ValueError(f"rope type {rs.rope_type!r} is not supported")

    factor = rs.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.attention_factor is not None:
        attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = float(mscale(factor, rs.mscale) / mscale(factor, rs.mscale_all_dim))
    else:
        attention_factor = mscale(factor)

    def correction_dim(num_rotations):
        orig = rs.original_max_position_embeddings
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


@dataclass
class RotaryTables:
    """cos and sin per position, [max_positions, head_dim // 2] float32, on the model's device. The rotation is
    the "rotate half" form Qwen2 uses: for x = [x1 | x2], out = [x1*cos - x2*sin | x2*cos + x1*sin]."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, config: Qwen2Config, max_positions: int, device) -> "RotaryTables":
        inv_freq, attention_factor = inverse_frequencies(config)
        positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        return cls((freqs.cos() * attention_factor).to(device), (freqs.sin() * attention_factor).to(device))

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]
