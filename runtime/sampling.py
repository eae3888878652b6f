"""Sampling parameters and the sampler.

Order of the logits transforms (Hugging Face's and vLLM's): repetition / presence / frequency penalties, then
temperature (0 = greedy), top-k, top-p, min-p, then one draw. The draw is an exponential race
(argmax of p / E with E ~ Exp(1)), which samples from p exactly and lets each row use its own generator, so a
request with a seed gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# Values used when neither the caller nor the checkpoint's generation_config.json sets a field.
DEFAULTS = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, stop=(), stop_token_ids=(), ignore_eos=False,
                seed=None)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. A field left as None takes the checkpoint's generation_config.json value, else the
    default in `DEFAULTS`. temperature 0 is greedy; top_k 0 (or -1) disables top-k."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool | None = None
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _validate(self)

    def resolved(self, defaults: dict | None = None) -> "SamplingParams":
        """Every field filled: the caller's value, else `defaults` (from generation_config.json), else DEFAULTS."""
        merged = dict(DEFAULTS)
        merged.update(defaults or {})
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return SamplingParams(**{k: (merged[k] if v is None else v) for k, v in values.items()})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate(p: SamplingParams) -> None:
    def bad(name, why):
        raise ValueError(f"SamplingParams.{name} = {getattr(p, name)!r}: {why}")

    if p.max_tokens is not None and not (_is_int(p.max_tokens) and p.max_tokens >= 1):
        bad("max_tokens", "must be an integer >= 1")
    if p.temperature is not None and not (_is_num(p.temperature) and p.temperature >= 0):
        bad("temperature", "must be a number >= 0 (0 is greedy)")
    if p.top_k is not None and not (_is_int(p.top_k) and p.top_k >= -1):
        bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
    if p.top_p is not None and not (_is_num(p.top_p) and 0 < p.top_p <= 1):
        bad("top_p", "must be in (0, 1]")
    if p.min_p is not None and not (_is_num(p.min_p) and 0 <= p.min_p <= 1):
        bad("min_p", "must be in [0, 1]")
    if p.repetition_penalty is not None and not (_is_num(p.repetition_penalty) and p.repetition_penalty > 0):
        bad("repetition_penalty", "must be a number > 0 (1 disables it)")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if v is not None and not (_is_num(v) and -2 <= v <= 2):
            bad(name, "must be in [-2, 2]")
    if p.stop is not None and not all(isinstance(s, str) and s for s in p.stop):
        bad("stop", "must be a non-empty string or a list of non-empty strings")
    if p.stop_token_ids is not None and not all(_is_int(t) and t >= 0 for t in p.stop_token_ids):
        bad("stop_token_ids", "must be a list of token ids >= 0")
    if p.ignore_eos is not None and not isinstance(p.ignore_eos, bool):
        bad("ignore_eos", "must be a bool")
    if p.seed is not None and not (_is_int(p.seed) and 0 <= p.seed < 2 ** 63):
        bad("seed", "must be an integer in [0, 2**63)")


def defaults_from_generation_config(gc: dict) -> dict:
    """SamplingParams defaults from a checkpoint's generation_config.json (only the keys it sets)."""
    out = {}
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    elif gc.get("temperature") is not None:
        out["temperature"] = float(gc["temperature"])
    for key in ("top_k", "top_p", "min_p", "repetition_penalty"):
        if gc.get(key) is not None:
            out[key] = gc[key]
    if gc.get("max_new_tokens") is not None:
        out["max_tokens"] = int(gc["max_new_tokens"])
    return out


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]]):
    """In place on float32 logits [B, V]. histories[b] = (prompt ids, output ids). Repetition penalty over prompt
    and output (Hugging Face: divide positive logits, multiply negative ones); presence and frequency penalties
    over the output only (OpenAI / vLLM)."""
    vocab = logits.shape[1]
    for b, (p, (prompt, output)) in enumerate(zip(params, histories)):
        row = logits[b]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=row.device)
            seen = seen[seen < vocab]
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and output:
            ids = torch.tensor(output, dtype=torch.long, device=row.device)
            ids = ids[ids < vocab]
            counts = torch.zeros(vocab, device=row.device).index_add_(0, ids, torch.ones(len(ids), device=row.device))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V] and per-row parameters [B] -> probabilities [B, V] after temperature, top-k, top-p
    and min-p. top_k <= 0 disables top-k. Rows must have temperature > 0."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # top-p: drop a token when the mass before it already reaches top_p (the top token always stays); rows with
    # top_p = 1 keep everything, whatever the rounding of the cumulative sum
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = drop | ((mass_before >= top_p[:, None]) & (top_p[:, None] < 1))
    # min-p: drop tokens below min_p times the top token's probability
    drop = drop | (probs < min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], histories, generators: list[torch.Generator]):
    """float32 logits [B, V] -> token ids [B] (a tensor on logits' device). generators[b] draws row b's noise."""
    logits = logits.clone()
    if any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        apply_penalties(logits, params, histories)
    tokens = logits.argmax(dim=-1)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    dev = logits.device
    rows = torch.tensor(sampled, device=dev)
    sub = [params[b] for b in sampled]
    probs = filter_logits(
        logits[rows],
        torch.tensor([p.temperature for p in sub], device=dev, dtype=torch.float32),
        torch.tensor([p.top_k for p in sub], device=dev),
        torch.tensor([p.top_p for p in sub], device=dev, dtype=torch.float32),
        torch.tensor([p.min_p for p in sub], device=dev, dtype=torch.float32),
    )
    noise = torch.stack([torch.empty(probs.shape[1], device=dev).exponential_(generator=generators[b])
                         for b in sampled]).clamp_min_(1e-20)  # a draw of exactly 0 would give 0/0
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens
