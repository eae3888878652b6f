"""Hugging Face transformers baselines built from a qwen2rt config (random weights, made on the device)."""

from __future__ import annotations

import statistics
import time

import torch

from qwen2rt.models.config import Qwen2Config


def hf_config(config: Qwen2Config):
    import transformers

    rope = {"rope_type": config.rope_scaling.rope_type, "rope_theta": config.rope_theta}
    if config.rope_scaling.rope_type != "default":
        rope["factor"] = config.rope_scaling.factor
    if config.rope_scaling.rope_type == "yarn":
        rope["original_max_position_embeddings"] = config.rope_scaling.original_max_position_embeddings
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
                  tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope)
    if config.is_moe:
        return transformers.Qwen2MoeConfig(
            num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            shared_expert_intermediate_size=config.shared_expert_intermediate_size,
            norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers), **common)
    return transformers.Qwen2Config(**common)


def hf_model(config: Qwen2Config, device, dtype, experts_implementation: str | None = None):
    """A random-weight transformers model on `device` (weights initialised there), eval mode."""
    import transformers

    cfg = hf_config(config)
    kwargs = {"dtype": dtype}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, **kwargs)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_generate(model, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> float:
    """Seconds for model.generate to produce exactly `new_tokens` greedy tokens."""
    mask = torch.ones_like(input_ids)
    _sync(input_ids.device)
    t0 = time.perf_counter()
    model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, **kwargs)
    _sync(input_ids.device)
    return time.perf_counter() - t0


def decode_ms_per_token(model, input_ids: torch.Tensor, steps: int, repeats: int = 3, stats: dict | None = None,
                        **kwargs) -> float:
    """Steady-state decode time per token: median over `repeats` of (generate 2 x steps - generate steps) / steps,
    after a warm-up of 2 x steps tokens (a static cache is sized to the longest generation so far: the timed calls
    reuse it rather than recompiling for a new length). Prefill and start-up cancel in the difference. `stats`, if
    given, receives the torch.compile graphs compiled during the timed calls (a recompile would be timed) and the
    spread."""
    from torch._dynamo.utils import counters

    time_generate(model, input_ids, 2 * steps, **kwargs)
    compiled_before = counters["stats"]["unique_graphs"]
    diffs = []
    for _ in range(repeats):
        short = time_generate(model, input_ids, steps, **kwargs)
        long = time_generate(model, input_ids, 2 * steps, **kwargs)
        diffs.append((long - short) / steps)
    if stats is not None:
        stats["graphs_compiled_while_timed"] = counters["stats"]["unique_graphs"] - compiled_before
        stats["ms_spread"] = [1000 * d for d in sorted(diffs)]
    ms = 1000 * statistics.median(diffs)
    if ms <= 0:  # noise (a loaded machine) larger than `steps` tokens' time: no number rather than a wrong one
        raise RuntimeError(f"timing noise exceeded the difference: generate({2 * steps}) - generate({steps}) "
                           f"gave {ms:.3g} ms per token (spread {[round(1000 * d, 3) for d in sorted(diffs)]})")
    return ms


@torch.inference_mode()
def prefill_ms(model, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """One forward over the prompt (logits of the last token only), best of `repeats` after a warm-up."""
    model(input_ids, logits_to_keep=1)
    best = float("inf")
    for _ in range(repeats):
        _sync(input_ids.device)
        t0 = time.perf_counter()
        model(input_ids, logits_to_keep=1)
        _sync(input_ids.device)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best
