"""How many kernels a decode step launches with the triton backend, counted on CPU during real decode steps through
the public API (Triton launches through the interpreter plus torch ops that are kernels: tests/launch_count.py).
At ~1.2-1.5 us per launch inside a CUDA graph, launches are most of a small model's step; these bounds keep them
from creeping back."""

from __future__ import annotations

import pytest

from launch_count import LaunchCounter, decode_layer_launches
from qwen2rt import LLM, SamplingParams, model_runner, sampling

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def test_dense_layer_launches():
    """norm+qkv GEMV, attention (split-KV + its reduction), o GEMV + residual, norm+gate_up+SwiGLU GEMV, down GEMV +
    residual: 6, and nothing from torch."""
    llm = LLM("tiny", device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2)
    for launches in decode_layer_launches(llm, [1, 2, 3], GREEDY):
        assert len(launches) <= 6, launches
        assert not [e for e in launches if e.startswith("torch:")], launches


def test_moe_layer_launches():
    """The attention half as in a dense layer (4), then the MoE block with the shared expert folded: the router and
    shared-gate GEMV (the post-attention norm in its prologue), the gate_up GEMV (norm again in its prologue, routing
    from the logits), the down GEMV (routing again, + residual): 7, none of them torch."""
    llm = LLM("tiny-moe", device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2)
    config = llm.model.config
    layers = decode_layer_launches(llm, [1, 2, 3], GREEDY)
    for i, launches in enumerate(layers):
        bound = 7 if config.is_moe_layer(i % config.num_hidden_layers) else 6
        assert len(launches) <= bound, (i, launches)
        assert not [e for e in launches if e.startswith("torch:")], launches



def decode_step_launches(llm, params: SamplingParams) -> list[tuple[int, list[str]]]:
    """(launches inside the decoder layers, all launches) of every decode step of one generation, with the Triton
    sampler (the one CUDA runs; the CPU's default is the torch sampler). A step is everything launch_decode does:
    the input copy, the gathers, the model, the sampler, the read-back copy."""
    runner, model = llm.engine.decoder, llm.model
    launch, layer_fn = runner.launch_decode, model._layer
    steps: list[tuple[int, list[str]]] = []
    in_layers = [0]

    def counted_layer(*args):
        start = len(counter.events)
        out = layer_fn(*args)
        in_layers[0] += len(counter.events) - start
        return out

    def counted_launch(seqs, split=False):
        start, in_layers[0] = len(counter.events), 0
        out = launch(seqs, split)
        steps.append((in_layers[0], counter.events[start:]))
        return out

    def triton_sampler(*args, **kwargs):
        return sampling.sample_tokens(*args, **kwargs, impl="triton")

    with pytest.MonkeyPatch.context() as patch, LaunchCounter() as counter:
        patch.setattr(model, "_layer", counted_layer)
        patch.setattr(runner, "launch_decode", counted_launch)
        patch.setattr(model_runner, "sample_tokens", triton_sampler)
        llm.generate([[1, 2, 3], [4, 5]], params)
    assert steps, "no decode step ran"
    return steps


@pytest.mark.parametrize("params, bound", [
    (GREEDY, 10),
    (SamplingParams(max_tokens=3, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1,
                    presence_penalty=0.2, seed=1, ignore_eos=True), 15),
])
def test_decode_step_launches_besides_the_layers(params, bound):
    """Per step, besides the layers: the values copy, the block-table gather (when the batch changes), the input
    ids gather, embedding, norm + lm_head, the sampler (2 launches greedy or top-k, 3 full), the sampled ids into
    the static buffer and into each slot's newest token, the read-back copy."""
    llm = LLM("tiny", device="cpu", dtype="float32", backend="triton", max_seq_len=64, max_batch_size=2)
    for in_layers, events in decode_step_launches(llm, params):
        assert 0 < in_layers <= 6 * llm.model.config.num_hidden_layers
        assert len(events) - in_layers <= bound, events
