"""How many kernels a decode step launches with the triton backend, counted on CPU during real decode steps through
the public API (Triton launches through the interpreter plus torch ops that are kernels: tests/launch_count.py).
At ~1.2-1.5 us per launch inside a CUDA graph, launches are most of a small model's step; these bounds keep them
from creeping back."""

from __future__ import annotations

import pytest

from launch_count import LaunchCounter
from qwen2rt import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def decode_layer_launches(llm) -> list[list[str]]:
    """The launches of every decoder layer during the decode steps of one short greedy generation."""
    model = llm.model
    layer_fn = model._layer
    per_layer: list[list[str]] = []

    def counted(layer, x, k_cache, v_cache, meta):
        start = len(counter.events)
        out = layer_fn(layer, x, k_cache, v_cache, meta)
        if not meta.is_prefill:
            per_layer.append(counter.events[start:])
        return out

    with pytest.MonkeyPatch.context() as patch, LaunchCounter() as counter:
        patch.setattr(model, "_layer", counted)
        llm.generate([[1, 2, 3]], GREEDY)
    assert per_layer, "no decode step ran"
    return per_layer


def test_dense_layer_launches():
    """norm+qkv GEMV, attention (split-KV + its reduction), o GEMV + residual, norm+gate_up+SwiGLU GEMV, down GEMV +
    residual: 6, and nothing from torch."""
    llm = LLM("tiny", device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2)
    for launches in decode_layer_launches(llm):
        assert len(launches) <= 6, launches
        assert not [e for e in launches if e.startswith("torch:")], launches


def test_moe_layer_launches():
    """The attention half as in a dense layer (4), then the MoE block with the shared expert folded: the router GEMV
    (the post-attention norm in its prologue), routing, gate_up GEMV (norm again in its prologue), down GEMV (+
    residual): 8, none of them torch. (The issue's goal is 7: the router inside the routing kernel.)"""
    llm = LLM("tiny-moe", device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2)
    config = llm.model.config
    layers = decode_layer_launches(llm)
    for i, launches in enumerate(layers):
        bound = 8 if config.is_moe_layer(i % config.num_hidden_layers) else 6
        assert len(launches) <= bound, (i, launches)
        assert not [e for e in launches if e.startswith("torch:")], launches
