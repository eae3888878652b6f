"""Sampling parameters and the sampler.

Order of the logits transforms (Hugging Face's and vLLM V0's; vLLM V1 applies min-p before top-k / top-p, which
keeps fewer tokens when min-p and top-p both cut): the request's logit bias and min_tokens' hold on its stop tokens
(first, as vLLM V1 applies them), repetition / presence / frequency penalties, then temperature
(below GREEDY_TEMPERATURE: greedy), top-k, top-p, min-p, then one draw. The draw is an exponential race (argmax of p / E
with E ~ Exp(1)), which samples from p exactly; the uniforms behind E are a hash of (request seed, step, token id),
so a seeded request gets the same tokens whatever else is in the batch, and the whole sampler runs on the device
with static shapes and no generator state: it is captured inside the decode CUDA graph. Three forms of it
(`sampler_variant`): argmax alone, a draw among the top TOPK_CANDIDATES logits, and a sort of the whole
vocabulary; candidates are strictly ordered (ties toward the lower token id), so the forms agree token for token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .structured import StructuredOutputs

# Values used when neither the caller nor the checkpoint's generation_config.json sets a field.
DEFAULTS = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, stop=(), stop_token_ids=(), ignore_eos=False,
                seed=None, logprobs=None, min_tokens=0, logit_bias=None, prompt_logprobs=None,
                skip_special_tokens=True, include_stop_str_in_output=False, n=1, allowed_token_ids=None,
                structured_outputs=None, truncate_prompt_tokens=None)
MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's top_logprobs limit)
# a temperature below this is greedy (vLLM's _SAMPLING_EPS): logits divided by a subnormal temperature overflow
GREEDY_TEMPERATURE = 1e-5
FLOAT32_MAX = 3.4028234663852886e38  # the sampler's rows are float32: a larger value would turn into inf
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100], as OpenAI's API takes them


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. A field left as None takes the checkpoint's generation_config.json value, else the
    default in `DEFAULTS`. temperature 0 (or below GREEDY_TEMPERATURE) is greedy; top_k 0 (or -1) disables top-k."""

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
    # log-probabilities of each generated token and of the `logprobs` most likely tokens at its step (0: the chosen
    # token's alone), from the model's distribution before any sampling transform (logit bias, penalties, temperature,
    # top-k / top-p / min-p), as vLLM reports them by default; None: none
    logprobs: int | None = None
    # at least this many tokens before a stop token may end the request: the stop token ids (stop_token_ids, and
    # the checkpoint's eos ids unless ignore_eos) get no probability before then, and stop strings are not looked
    # for before then (vLLM's min_tokens; Hugging Face's min_new_tokens holds back eos alone)
    min_tokens: int | None = None
    # {token id: bias in [-100, 100]} added to the logits before every other transform (OpenAI's logit_bias:
    # -100 in effect bans a token, +100 all but forces it); not in the hash (a dict)
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)
    # log-probabilities of each prompt token after the first (and of the `prompt_logprobs` most likely tokens at
    # its position) under the model, computed during the prefill, as vLLM's prompt_logprobs; such a request reads
    # nothing from the prefix cache (every prompt position is computed); None: none
    prompt_logprobs: int | None = None
    # the text: special tokens left out (True) or written out, as vLLM's detokenizer does
    skip_special_tokens: bool | None = None
    # the text keeps the stop string that ended it (or the stop token's text), as vLLM's option; it streams with
    # nothing held back then
    include_stop_str_in_output: bool | None = None
    # completions of the prompt (vLLM's n): LLM.generate / agenerate / chat return them in RequestOutput.outputs;
    # a seeded request's completion i draws with seed + i (choices)
    n: int | None = None
    # the only token ids that may be generated (vLLM's allowed_token_ids: every other token's logit is -inf before
    # every other transform; a logit_bias applies to these); not in the hash (a list)
    allowed_token_ids: list[int] | tuple[int, ...] | None = field(default=None, hash=False)
    # the output held to a JSON object or to one of a list of strings (vLLM's structured_outputs; see
    # structured.py): at each step every token that cannot continue it gets -inf before every other transform
    structured_outputs: StructuredOutputs | None = None
    # the prompt's last truncate_prompt_tokens tokens only (vLLM's left truncation; -1: as many as the context takes
    # with room for one generated token); None: the whole prompt (one longer than the context is an error)
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, Mapping):  # a copy: the caller's dict may change after
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        if isinstance(self.allowed_token_ids, (list, tuple)):
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        _validate(self)

    def resolved(self, defaults: dict | None = None) -> "SamplingParams":
        """Every field filled: the caller's value, else `defaults` (from generation_config.json), else DEFAULTS."""
        merged = dict(DEFAULTS)
        merged.update(defaults or {})
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return SamplingParams(**{k: (merged[k] if v is None else v) for k, v in values.items()})

    def choices(self) -> list["SamplingParams"]:
        """The params of each of the n completions, each with n = 1. As in vLLM, a seeded request's completion i
        draws with seed + i (wrapping at 2**63), so the completions differ and the request stays reproducible;
        unseeded ones draw their own seeds."""
        n = self.n or 1
        if self.seed is None:
            return [dataclasses.replace(self, n=1)] * n
        return [dataclasses.replace(self, seed=(self.seed + i) % 2 ** 63, n=1) for i in range(n)]

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < GREEDY_TEMPERATURE


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float's range (10**400): no number a sampler can use
        return False


def _validate(p: SamplingParams) -> None:
    def bad(name, why, show=True):  # show: the value (not a whole logit_bias mapping)
        raise ValueError(f"SamplingParams.{name}{f' = {getattr(p, name)!r}' if show else ''}: {why}")

    if p.max_tokens is not None and not (_is_int(p.max_tokens) and p.max_tokens >= 1):
        bad("max_tokens", "must be an integer >= 1")
    if p.n is not None and not (_is_int(p.n) and p.n >= 1):
        bad("n", "must be an integer >= 1")
    if p.temperature is not None and not (_is_num(p.temperature) and 0 <= p.temperature <= FLOAT32_MAX):
        bad("temperature", "must be a number >= 0 (0 is greedy) within float32's range")
    if p.top_k is not None and not (_is_int(p.top_k) and -1 <= p.top_k < 2 ** 31):
        bad("top_k", "must be an integer in [1, 2**31), or 0 / -1 to disable")  # an int64 row of the sampler
    if p.top_p is not None and not (_is_num(p.top_p) and 0 < p.top_p <= 1):
        bad("top_p", "must be in (0, 1]")
    if p.min_p is not None and not (_is_num(p.min_p) and 0 <= p.min_p <= 1):
        bad("min_p", "must be in [0, 1]")
    if p.repetition_penalty is not None and not (_is_num(p.repetition_penalty)
                                                 and 0 < p.repetition_penalty <= FLOAT32_MAX):
        bad("repetition_penalty", "must be a number > 0 (1 disables it) within float32's range")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if v is not None and not (_is_num(v) and -2 <= v <= 2):
            bad(name, "must be in [-2, 2]")
    if p.stop is not None and not all(isinstance(s, str) and s for s in p.stop):
        bad("stop", "must be a non-empty string or a list of non-empty strings")
    if p.stop_token_ids is not None and not all(_is_int(t) and t >= 0 for t in p.stop_token_ids):
        bad("stop_token_ids", "must be a list of token ids >= 0")
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        if getattr(p, name) is not None and not isinstance(getattr(p, name), bool):
            bad(name, "must be a bool")
    if p.seed is not None and not (_is_int(p.seed) and 0 <= p.seed < 2 ** 63):
        bad("seed", "must be an integer in [0, 2**63)")
    if p.logprobs is not None and not (_is_int(p.logprobs) and 0 <= p.logprobs <= MAX_LOGPROBS):
        bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
    if p.prompt_logprobs is not None and not (_is_int(p.prompt_logprobs) and 0 <= p.prompt_logprobs <= MAX_LOGPROBS):
        bad("prompt_logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
    if p.min_tokens is not None and not (_is_int(p.min_tokens) and 0 <= p.min_tokens < 2 ** 31):
        bad("min_tokens", "must be an integer in [0, 2**31)")  # an int64 row of the sampler
    if p.min_tokens is not None and p.max_tokens is not None and p.min_tokens > p.max_tokens:
        bad("min_tokens", f"must be at most max_tokens ({p.max_tokens})")
    if p.logit_bias is not None:
        if not isinstance(p.logit_bias, dict):
            bad("logit_bias", "must be a mapping {token id: bias}")
        for token, value in p.logit_bias.items():
            if not (_is_int(token) and token >= 0):
                bad("logit_bias", f"token id {str(token)[:40]!r} must be an integer >= 0", show=False)
            if not (_is_num(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
                bad("logit_bias", f"the bias of token {token} must be a number in [-100, 100], got "
                    f"{str(value)[:40]}", show=False)
    if p.allowed_token_ids is not None:
        if not isinstance(p.allowed_token_ids, tuple) or not p.allowed_token_ids:
            bad("allowed_token_ids", "must be None or a non-empty list of token ids", show=False)
        for token in p.allowed_token_ids:
            if not (_is_int(token) and token >= 0):
                bad("allowed_token_ids", f"token id {str(token)[:40]!r} must be an integer >= 0", show=False)
    if p.truncate_prompt_tokens is not None and not (_is_int(p.truncate_prompt_tokens)
                                                     and (p.truncate_prompt_tokens >= 1
                                                          or p.truncate_prompt_tokens == -1)):
        bad("truncate_prompt_tokens", "must be None, an integer >= 1, or -1 (as many as the context takes)")
    if p.structured_outputs is not None:
        if not isinstance(p.structured_outputs, StructuredOutputs):
            bad("structured_outputs", "must be None or a qwen2rt.StructuredOutputs")
        # each would let the output end or go on where the structure says otherwise
        for name, clash in (("ignore_eos", p.ignore_eos), ("min_tokens", p.min_tokens),
                            ("allowed_token_ids", p.allowed_token_ids)):
            if clash:
                bad(name, "cannot be combined with structured_outputs (the structure decides which tokens may "
                    "come and when the output ends)", show=name != "allowed_token_ids")


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


@dataclass
class SamplingRows:
    """Per-row sampling parameters of one batch, as device tensors [B] (static buffers inside a CUDA graph)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; <= 0 disables
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    repetition: torch.Tensor  # float32; 1 disables
    presence: torch.Tensor  # float32
    frequency: torch.Tensor  # float32
    seed: torch.Tensor  # int64: the request's seed (drawn from the engine's RNG when it has none)
    step: torch.Tensor  # int64: tokens the request has generated so far
    slot: torch.Tensor  # int64: the request's row in SamplerState (the last row absorbs padding rows)
    min_tokens: torch.Tensor  # int64: SamplerState.held's tokens get no probability while step < min_tokens
    bias: torch.Tensor  # int64: 1 adds SamplerState.bias's row (logit_bias, allowed_token_ids), 0 reads nothing

    FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency", "seed", "step", "slot",
              "min_tokens", "bias")
    INT_FIELDS = ("top_k", "seed", "step", "slot", "min_tokens", "bias")


def row_values(p: SamplingParams, seed: int, step: int, slot: int) -> tuple:
    """One row of SamplingRows, in FIELDS order."""
    return (0.0 if p.greedy else p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, seed, step, slot, p.min_tokens,
            int(bool(p.logit_bias or p.allowed_token_ids or p.structured_outputs)))


def rows_tensor(values: list[tuple], device) -> SamplingRows:
    cols = list(zip(*values))
    return SamplingRows(*(torch.tensor(col, device=device, dtype=torch.int64 if name in SamplingRows.INT_FIELDS
                                       else torch.float32) for name, col in zip(SamplingRows.FIELDS, cols)))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = MAX_LOGPROBS):
    """float32 logits [B, V] (before any sampling transform), chosen tokens [B] -> (their log-probabilities [B],
    the `top` largest log-probabilities [B, top] and their token ids [B, top] int64, largest first). Device ops with
    static shapes: capturable in a CUDA graph."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = torch.topk(logits, min(top, logits.shape[-1]), dim=-1)
    chosen = logits.gather(1, tokens[:, None])[:, 0] - lse
    return chosen, values - lse[:, None], ids


# top-k up to this many tokens samples among torch.topk candidates instead of sorting the whole vocabulary
TOPK_CANDIDATES = 256
VARIANTS = ("greedy", "topk", "full")  # the sampler's forms, cheapest first; each decode bucket has a graph per form


def sampler_variant(params: list[SamplingParams]) -> str:
    """The cheapest exact form of the sampler for a batch: "greedy" when every row is greedy without penalties,
    logit bias, allowed_token_ids, structured outputs or min_tokens (argmax alone), "topk" when every sampled row has
    1 <= top_k <= TOPK_CANDIDATES (the draw only ever sees the top candidates: Qwen's instruct checkpoints set top_k
    20), else "full" (a sort of the whole vocabulary)."""
    if all(p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
           and not p.min_tokens and not p.logit_bias and not p.allowed_token_ids and not p.structured_outputs
           for p in params):
        return "greedy"
    if all(p.greedy or 1 <= p.top_k <= TOPK_CANDIDATES for p in params):
        return "topk"
    return "full"


class SamplerState:
    """Per-request device state: which tokens a request has seen (prompt + output) and how often it has generated
    each one (the penalties), its logit bias and the tokens min_tokens holds back. One row per engine slot plus a
    last row that padding rows write to. A row's bias and held tokens are read only by rows whose SamplingRows say
    so (bias = 1, step < min_tokens), so they are written only for requests that have them."""

    def __init__(self, num_slots: int, vocab_size: int, device):
        self.padding_slot = num_slots
        self.seen = torch.zeros(num_slots + 1, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(num_slots + 1, vocab_size, dtype=torch.int32, device=device)
        self.bias = torch.zeros(num_slots + 1, vocab_size, dtype=torch.float32, device=device)
        self.held = torch.zeros(num_slots + 1, vocab_size, dtype=torch.bool, device=device)

    def reset(self, slot: int, prompt_ids: list[int], logit_bias: Mapping[int, float] | None = None,
              held_ids=None, output_ids: list[int] = (), allowed_ids=None) -> None:
        """A new request in `slot`: its prompt marked seen and its output so far (a preempted request admitted again)
        seen and counted; its logit bias where it has one, or with allowed_ids (allowed_token_ids) -inf but at
        those ids, which keep their bias (the row's bias flag is set then); and with min_tokens > 0 the token ids it
        holds back (its stop ids; None for a request without min_tokens, whose rows never read them)."""
        self.seen[slot].zero_()
        self.counts[slot].zero_()
        self.seen[slot, to_device(prompt_ids, torch.long, self.seen.device)] = True
        if output_ids:
            out = to_device(output_ids, torch.long, self.seen.device)
            self.seen[slot, out] = True
            self.counts[slot].index_add_(0, out, torch.ones_like(out, dtype=self.counts.dtype))
        if allowed_ids:
            allowed = np.zeros(self.bias.shape[1], dtype=bool)
            allowed[list(allowed_ids)] = True
            self.set_allowed(slot, allowed, logit_bias)
        elif logit_bias:
            self.bias[slot].zero_()
            self.bias[slot, to_device(list(logit_bias), torch.long, self.seen.device)] = \
                to_device(list(logit_bias.values()), torch.float32, self.seen.device)
        if held_ids is not None:
            self.held[slot].zero_()
            held_ids = sorted(t for t in held_ids if t < self.held.shape[1])  # one past the vocabulary is never drawn
            if held_ids:
                self.held[slot, to_device(held_ids, torch.long, self.seen.device)] = True

    def set_allowed(self, slot: int, allowed, logit_bias: Mapping[int, float] | None = None) -> None:
        """`slot`'s bias row -inf but at the `allowed` tokens (a host bool array [V]: allowed_token_ids, or a
        structured request's next-token mask), which keep their logit_bias; one copy, enqueued after the steps
        already launched."""
        row = np.full(self.bias.shape[1], -np.inf, dtype=np.float32)
        row[allowed] = 0.0
        for token, value in (logit_bias or {}).items():
            if allowed[token]:
                row[token] = value
        self.bias[slot].copy_(to_device(torch.from_numpy(row), None, self.bias.device))


def to_device(values, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) as a tensor on `device`. On CUDA through pinned memory: a copy from pageable
    memory may wait for the stream, which holds the decode step launched before."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def apply_bias_and_holds(logits: torch.Tensor, bias: torch.Tensor, held: torch.Tensor, rows: SamplingRows):
    """float32 logits [B, V]; bias [B, V] and held [B, V] bool (the rows' SamplerState rows). Adds the bias of
    rows with rows.bias = 1 and gives -inf to the held tokens of rows still below min_tokens; other rows are left
    exactly as they are."""
    logits = torch.where(rows.bias[:, None] != 0, logits + bias, logits)
    return logits.masked_fill(held & (rows.step < rows.min_tokens)[:, None], float("-inf"))


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V]; seen [B, V] bool (prompt and output tokens); counts [B, V] (output tokens).
    Repetition penalty over prompt and output (Hugging Face: divide positive logits, multiply negative ones);
    presence and frequency penalties over the output only (OpenAI / vLLM). Neutral values change nothing."""
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    counts = counts.float()
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2^32; every product
    stays below 2^63, so CPU and GPU give the same bits."""
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): [B] seeds and steps, [B, N] (or [1, N]) int64 token ids -> [B, N] float32.
    A pure function of (seed, step, token id), so a seeded request draws the same numbers in any batch and among
    any candidates, eagerly or inside a CUDA graph, with no generator state to carry."""
    s = _mix32((seed & _M32) ^ _mix32((seed >> 32) & _M32))
    s = _mix32(s ^ ((step & 0x7FFFFFFF) * 0x9E3779B1 & _M32))
    x = _mix32(s[:, None] ^ ((token_ids * 0x85EBCA6B) & _M32))
    # 23 bits: (k + 0.5) / 2^23 is exact in float32 and lies in [2^-24, 1 - 2^-24]. (With 24 bits, k = 2^24 - 1
    # rounded k + 0.5 up to 2^24: U = 1, E = 0, and a token the filters had dropped scored 0 / 0 = NaN, which
    # argmax takes.)
    return ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))


IMPLS = ("auto", "torch", "triton")


def sample_tokens(logits: torch.Tensor, rows: SamplingRows, state: SamplerState, variant: str = "full",
                  impl: str = "auto") -> torch.Tensor:
    """float32 logits [B, V] -> token ids [B] int64, all on the device with static shapes (capturable in a CUDA
    graph), and records each token in `state` for later penalties. `variant` (see sampler_variant): "greedy" is
    argmax alone; "topk" draws among the TOPK_CANDIDATES largest logits (exact when every sampled row's top_k is
    at most that); "full" handles any parameters. All three give the same token for the rows they accept.
    `impl`: "triton" (qwen2rt.kernels.sampler: two or three launches, no sort of the vocabulary), "torch" (the
    reference, sample_tokens_ref), or "auto": triton for CUDA logits, torch otherwise."""
    if variant not in VARIANTS:
        raise ValueError(f"sampler variant must be one of {VARIANTS}, got {variant!r}")
    if impl not in IMPLS:
        raise ValueError(f"sampler impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" or (impl == "auto" and logits.is_cuda):
        from qwen2rt.kernels import sampler

        return sampler.sample(logits, rows, state.counts, state.seen, variant, bias=state.bias, held=state.held)
    return sample_tokens_ref(logits, rows, state.counts, state.seen, variant, bias=state.bias, held=state.held)


def sample_tokens_ref(logits: torch.Tensor, rows: SamplingRows, counts: torch.Tensor, seen: torch.Tensor,
                      variant: str = "full", *, bias: torch.Tensor | None = None,
                      held: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch sampler (the CPU path and the Triton sampler's reference): sample_tokens on SamplerState's
    tensors, counts [S, V] int32 and seen [S, V] bool, which it updates, and bias [S, V] float32 and held [S, V]
    bool, both or neither (neither: the rows' min_tokens and bias are not read)."""
    if variant not in VARIANTS:
        raise ValueError(f"sampler variant must be one of {VARIANTS}, got {variant!r}")
    logits = logits.float()
    if variant == "greedy":
        tokens = logits.argmax(dim=-1)
    else:
        if (bias is None) != (held is None):
            raise ValueError("bias and held go together: pass both (SamplerState.bias, .held) or neither")
        if bias is not None:
            logits = apply_bias_and_holds(logits, bias[rows.slot], held[rows.slot], rows)
        logits = apply_penalties(logits, seen[rows.slot], counts[rows.slot], rows.repetition, rows.presence,
                                 rows.frequency)
        hot = rows.temperature > 0
        temperature = torch.where(hot, rows.temperature, torch.ones_like(rows.temperature))
        # the candidates in a strict order (ties toward the lower token id, as argmax): every variant and batch
        # sees the same top-k set, so a seeded request draws the same token whatever shares its batch
        n = logits.shape[1] if variant == "full" else min(TOPK_CANDIDATES, logits.shape[1])
        top, ids = ordered_candidates(logits, n)
        probs = filter_sorted_logits(top / temperature[:, None], rows.top_k, rows.top_p, rows.min_p)
        # exponential race: argmax p / E with E = -log(U) ~ Exp(1) samples exactly from p
        noise = -torch.log(hash_uniform(rows.seed, rows.step, ids))
        sampled = ids.gather(1, (probs / noise).argmax(dim=-1, keepdim=True))[:, 0]
        tokens = torch.where(hot, sampled, ids[:, 0])
    # record the tokens with scatters on flat views (graph-safe; padding rows may repeat, hence the add)
    flat = rows.slot * counts.shape[1] + tokens
    counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    seen.view(-1).scatter_(0, flat, True)
    return tokens


def ordered_candidates(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest float32 logits of each row [B, V], in descending order with ties toward the lower token id
    (a strict order, so a top-k set never depends on how a sort or top-k kernel breaks ties). -> (logits [B, n],
    token ids [B, n] int64). n = V sorts the whole row; a smaller n takes torch.topk."""
    bits = logits.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order == float order (negatives flipped)
    vocab = logits.shape[1]
    keys = ordered * (1 << 32) + (vocab - 1 - torch.arange(vocab, device=logits.device))
    if n >= vocab:
        ids = torch.sort(keys, dim=-1, descending=True).indices
    else:
        ids = torch.topk(keys, n, dim=-1).indices
    return logits.gather(1, ids), ids


def filter_sorted_logits(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         min_p: torch.Tensor) -> torch.Tensor:
    """Logits already divided by the temperature and sorted in descending order, [B, N] (the whole vocabulary, or
    its N largest when every row's top_k <= N) -> probabilities [B, N] after top-k, top-p and min-p."""
    n = sorted_logits.shape[1]
    rank = torch.arange(n, device=sorted_logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=n), torch.full_like(top_k, n))
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
    return torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
