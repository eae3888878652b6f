"""The Python API: `LLM(model).generate(...)`, `.stream(...)`, `.chat(...)`, `.logits(...)`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import numbers
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qwen2rt.models.backend import default_backend_name, get_backend
from qwen2rt.models.config import BUILTIN_CONFIGS, Qwen2Config, builtin_config, load_config, read_json
from qwen2rt.models.loader import load_weights, untie_distinct_lm_head
from qwen2rt.models.quant import QuantConfig, at_load_config, check_fp8_device
from qwen2rt.models.qwen2 import Qwen2Model, random_weights
from qwen2rt.models.rope import RotaryTables

from .engine import DEFAULT_BUCKETS, DEFAULT_PREFILL_BUCKETS, Engine, Sequence
from .kv_cache import KVCache, kv_bytes_per_token
from .sampling import SamplingParams, defaults_from_generation_config
from .scheduler import Scheduler
from .sequence import check_min_tokens
from .structured import Matcher, TokenIndex
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger("qwen2rt")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_CPU_KV_BUDGET = 4 << 30  # bytes of KV cache on CPU when num_kv_blocks is not given
_GPU_KV_FRACTION = 0.85  # of free GPU memory after weights
_warned_builtin: set[str] = set()


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's CompletionOutput): its index among the request's n, text, token ids,
    finish reason, logprobs (with SamplingParams.logprobs) and their sum over the generated tokens."""

    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """One finished request. finish_reason: "stop" (eos, stop id or stop string) or "length". `outputs` holds its
    SamplingParams.n completions (vLLM's layout); text, token_ids, finish_reason, logprobs and the timings are the
    first completion's."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str | None  # None when the checkpoint ships no tokenizer
    token_ids: list[int]
    finish_reason: str
    time_to_first_token_s: float
    decode_tokens_per_s: float | None  # None with fewer than 2 generated tokens
    num_cached_tokens: int = 0  # prompt tokens whose k/v came from the prefix cache (not prefilled)
    # SamplingParams.logprobs = N: per generated token, (its log-probability, [(token id, log-probability)] of the N
    # most likely tokens at that step), from the model's distribution before any sampling transform; else None
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # SamplingParams.prompt_logprobs = N: per prompt token, the same given the tokens before it (None for the first)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A Qwen2 / Qwen2-MoE model ready to generate.

    model: a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json, ...) or a built-in
    shape name (random weights): see `qwen2rt.models.BUILTIN_CONFIGS`.
    Defaults: CUDA if present else CPU; bf16 on GPU, fp32 on CPU; backend `triton` on CUDA, `torch` on CPU;
    max_seq_len = the model's context (Qwen2Config.max_context: max_position_embeddings, or longer with a YaRN or
    linear rope scaling in config.json); max_batch_size 16. The KV cache holds num_kv_blocks blocks
    of block_size tokens (default: enough for max_batch_size full-length sequences, capped at 85% of free GPU
    memory, or 4 GiB on CPU).
    Decode runs as CUDA graphs (per batch bucket in cuda_graph_buckets, plus max_batch_size: the forward, and each
    sampler form as a small graph after it) on CUDA with the triton backend, captured at start-up
    (capture_graphs="startup") or on first use ("lazy");
    enforce_eager=True runs the same step without graphs. Prompts are prefilled in chunks of at most
    max_prefill_tokens tokens per step, alternating with decode steps; with graphs, a prefill step of at most
    max(cuda_graph_prefill_tokens) tokens from at most 8 prompts runs padded to the next of those token counts, as a
    graph captured with the decode ones (an empty tuple: every prefill eager; a prefill graph whose capture on first
    use fails is dropped with a warning, its prefills eager).
    enable_prefix_caching (default True): full blocks of prompt tokens stay in the KV cache after their request
    (until their memory is needed), and a prompt that starts with the same blocks reuses them instead of prefilling
    them (RequestOutput.num_cached_tokens; counters in `engine.prefix_cache_stats()`).
    scheduling_policy: "fcfs" (default: first come, first served) or "priority" (vLLM's): generate / agenerate /
    stream / astream / new_request take a priority per request, a lower value scheduled first, and a request that
    finds no slot or too few KV blocks preempts running requests of a larger value (they recompute later).
    quantization: None, "int8" (per output channel), "int4" (groups of 128, asymmetric) or "fp8" (e4m3, per output
    channel; CUDA needs sm_89+) quantizes a floating-point model's decoder linears at load, built-in shapes included
    (their random weights are made quantized; MoE experts too, for the built-in MoE shapes only as yet). GPTQ and
    AWQ checkpoints load quantized as they are (config.json's quantization_config) and take no `quantization`.
    """

    def __init__(self, model: str, *, device=None, dtype=None, backend: str | None = None,
                 max_seq_len: int | None = None, max_batch_size: int | None = None, seed: int | None = None,
                 num_kv_blocks: int | None = None, block_size: int = 16, enforce_eager: bool = False,
                 cuda_graph_buckets=DEFAULT_BUCKETS, capture_graphs: str = "startup",
                 max_prefill_tokens: int = 2048, quantization: str | None = None, enable_prefix_caching: bool = True,
                 cuda_graph_prefill_tokens=DEFAULT_PREFILL_BUCKETS, scheduling_policy: str = "fcfs"):
        try:
            self.device = torch.device(device) if device is not None else torch.device(
                "cuda" if torch.cuda.is_available() else "cpu")
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r}: not a device torch knows ({e})") from None
        # Streams, events, CUDA graphs and Triton launches use the calling thread's current device, and a thread
        # starts on device 0 (the server steps the engine in worker threads): all device work of this LLM runs with
        # its device made current (the engine lock serialises the uses of this one guard). On one GPU, a no-op.
        self._on_device = contextlib.nullcontext()
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {str(self.device)!r} requested but torch sees no CUDA device")
            count, index = torch.cuda.device_count(), self.device.index
            if index is not None and not 0 <= index < count:
                raise ValueError(f"device {str(self.device)!r}: torch sees {count} CUDA device(s)")
            self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
            self._on_device = torch.cuda.device(self.device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.backend = get_backend(backend or default_backend_name(self.device))
        self.seed = 0 if seed is None else seed
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        # arguments that need no model are checked before any weight is loaded
        self.max_batch_size = 16 if max_batch_size is None else max_batch_size
        if not (isinstance(self.max_batch_size, int) and self.max_batch_size >= 1):
            raise ValueError(f"max_batch_size = {max_batch_size!r}: must be an integer >= 1")
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size = {block_size!r}: must be an integer >= 1")
        if num_kv_blocks is not None and not (isinstance(num_kv_blocks, int) and num_kv_blocks >= 1):
            raise ValueError(f"num_kv_blocks = {num_kv_blocks!r}: must be an integer >= 1")
        if scheduling_policy not in Scheduler.POLICIES:
            raise ValueError(f"scheduling_policy = {scheduling_policy!r}: must be one of "
                             f"{', '.join(Scheduler.POLICIES)}")
        if capture_graphs not in ("startup", "lazy"):
            raise ValueError(f"capture_graphs = {capture_graphs!r}: must be 'startup' or 'lazy'")
        if not (isinstance(max_prefill_tokens, int) and max_prefill_tokens >= 1):
            raise ValueError(f"max_prefill_tokens = {max_prefill_tokens!r}: must be an integer >= 1")
        for name, buckets in (("cuda_graph_buckets", cuda_graph_buckets),
                              ("cuda_graph_prefill_tokens", cuda_graph_prefill_tokens)):
            if not (isinstance(buckets, (tuple, list, range)) and
                    all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets)):
                raise ValueError(f"{name} = {buckets!r}: must be a tuple of integers >= 1")

        at_load = None if quantization is None else at_load_config(quantization)
        if at_load is not None and at_load.method == "fp8":
            check_fp8_device(self.device)

        self.generation_defaults: dict = {}
        generation_eos = None
        builtin = model in BUILTIN_CONFIGS
        if not builtin and not os.path.isdir(model):
            raise ValueError(f"model {model!r} is neither a checkpoint folder nor a built-in name "
                             f"({', '.join(sorted(BUILTIN_CONFIGS))})")
        self.config: Qwen2Config = builtin_config(model) if builtin else load_config(model)
        cfg = self.config
        self.max_seq_len = cfg.max_context if max_seq_len is None else max_seq_len
        if not (isinstance(self.max_seq_len, int) and 2 <= self.max_seq_len <= cfg.max_context):
            scaled = " (with its rope scaling)" if cfg.max_context != cfg.max_position_embeddings else ""
            raise ValueError(f"max_seq_len = {max_seq_len!r}: must be an integer in [2, {cfg.max_context}], the "
                             f"model's context{scaled}")
        if at_load is not None and cfg.quantization is not None:
            raise ValueError(f"quantization = {quantization!r}: {model} is already quantized "
                             f"({cfg.quantization.describe()}); it loads as it is, without quantization=")
        # the decoder linears' quantization: the checkpoint's (GPTQ, AWQ), the one asked for, or None
        self.quantization: QuantConfig | None = cfg.quantization or at_load
        with self._on_device:  # loading (quantizing at load), warm-up, capture: on this LLM's device
            if builtin:
                if model not in _warned_builtin:
                    _warned_builtin.add(model)
                    log.warning("built-in shape %r with random weights (seed %d): the generated text is noise",
                                model, self.seed)
                weights = random_weights(cfg, self.device, self.dtype, seed=self.seed, quantization=at_load)
                self.tokenizer: Tokenizer | None = ByteTokenizer(cfg.vocab_size)
            else:
                cfg = self.config = untie_distinct_lm_head(model, cfg)
                weights = load_weights(model, cfg, self.device, self.dtype, quantization=at_load)
                self.tokenizer = load_tokenizer(model)
                gc_path = os.path.join(model, "generation_config.json")
                if os.path.isfile(gc_path):
                    gc = read_json(gc_path)
                    self.generation_defaults = defaults_from_generation_config(gc)
                    generation_eos = gc.get("eos_token_id")
            self.model_name = model
            self.eos_token_ids = self._collect_eos(generation_eos)
            self._token_index: TokenIndex | None = None  # structured outputs' view of the vocabulary (on first use)
            if self.device.type == "cuda":  # quantizing at load leaves freed staging blocks cached; the KV budget
                torch.cuda.empty_cache()  # below is the driver's free memory after the weights: hand them back first
            if num_kv_blocks is None:
                num_kv_blocks = self._default_kv_blocks(block_size)

            self.rope = RotaryTables.build(cfg, self.max_seq_len, self.device)
            self.model = Qwen2Model(cfg, weights, self.backend, self.rope)
            self.backend.warmup(weights.layers)
            self.kv_cache = KVCache(cfg, num_kv_blocks, block_size, self.device, self.dtype)
            # graphs need a backend whose decode step never synchronises (the torch reference reads lengths on the
            # host)
            self.use_graphs = self.device.type == "cuda" and self.backend.graph_safe and not enforce_eager
            self.engine = Engine(self.model, self.kv_cache, self.max_batch_size, self.max_seq_len, self.seed,
                                 max_prefill_tokens, self.use_graphs, cuda_graph_buckets, enable_prefix_caching,
                                 cuda_graph_prefill_tokens, scheduling_policy)
            if self.device.type == "cuda":
                # compile the prefill kernels now rather than on the first request (33 tokens: past the decode GEMVs
                # and the MoE decode regime, kernels.gemv.MAX_ROWS and kernels.moe.DECODE_MAX_TOKENS)
                self.engine.prompt_logits([0] * min(33, self.max_seq_len - 1, num_kv_blocks * block_size))
            if self.use_graphs and capture_graphs == "startup":
                try:
                    self.engine.decoder.capture_all()
                except Exception as e:
                    raise RuntimeError(f"CUDA graph capture failed ({e!r}); LLM(..., cuda_graph_prefill_tokens=()) "
                                       "captures no prefill graphs, enforce_eager=True runs without graphs, "
                                       "backend='torch' without the Triton kernels") from e
        self._lock = threading.Lock()
        self._lock_owner: int | None = None  # the thread holding _lock
        self._deferred_aborts: list[Sequence] = []  # aborts asked for by the holder itself, run as it lets go
        # agenerate / astream: one driver per event loop (made on first use)
        self._drivers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._drivers_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self):
        """The engine lock and this LLM's device. Aborts the holding thread asks for meanwhile (a stream generator
        finalised by the garbage collector inside a step: its `finally` aborts its request) run as it lets go:
        re-taking the lock would deadlock, and freeing a request's blocks in the middle of a step is not safe. The
        owner is recorded right after the lock is taken and cleared right before it is let go, with nothing
        allocated in between that could start a collection; a deferred abort leaves the list once it has run."""
        me = threading.get_ident()
        self._lock.acquire()
        self._lock_owner = me
        try:
            with self._on_device:
                yield
        finally:
            try:
                while self._deferred_aborts:
                    self._abort_now(self._deferred_aborts[-1])
                    self._deferred_aborts.pop()
            finally:
                self._lock_owner = None
                self._lock.release()

    def _collect_eos(self, generation_eos) -> frozenset[int]:
        """eos ids of config.json, generation_config.json and the tokenizer, together (as vLLM does)."""
        ids = set(self.config.eos_token_id)
        if generation_eos is not None:
            ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        if self.tokenizer is not None:
            ids.update(self.tokenizer.eos_token_ids)
        return frozenset(ids)

    def _default_kv_blocks(self, block_size: int) -> int:
        wanted = self.max_batch_size * -(-self.max_seq_len // block_size)
        per_block = kv_bytes_per_token(self.config, self.dtype) * block_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * _GPU_KV_FRACTION)
        else:
            budget = _CPU_KV_BUDGET
        return max(1, min(wanted, budget // per_block))

    # ---- inputs -----------------------------------------------------------------------------------------------
    def _encode(self, prompt, generating: bool = True, truncate: int | None = None) -> tuple[str | None, list[int]]:
        """-> (text or None, token ids), checked; generating: room for one more token is needed too. truncate
        (SamplingParams.truncate_prompt_tokens): the last `truncate` tokens only (-1: as many as leave room for one
        generated token); the text is then theirs, decoded."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_name} ships no tokenizer.json: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
            text = prompt
            if ids and max(ids) >= self.config.vocab_size:  # an embedding lookup past the table: a device assert
                raise ValueError(f"the tokenizer encodes this text to id {max(ids)}, outside the model's vocabulary "
                                 f"[0, {self.config.vocab_size}): tokenizer.json does not match config.json")
        else:
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            ids, text = list(prompt), None
            bad = [t for t in ids if not (isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                          and 0 <= t < self.config.vocab_size)]
            if bad:
                raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.config.vocab_size})")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        if truncate is not None:
            keep = self.max_seq_len - 1 if truncate == -1 else truncate
            if keep >= self.max_seq_len:
                raise ValueError(f"SamplingParams.truncate_prompt_tokens = {truncate}: must be below the context "
                                 f"({self.max_seq_len} tokens, max_seq_len), leaving room to generate")
            if len(ids) > keep:
                ids = ids[len(ids) - keep:]
                text = None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)
        if len(ids) > self.max_seq_len or (generating and len(ids) == self.max_seq_len):
            raise ValueError(f"prompt has {len(ids)} tokens but the context holds {self.max_seq_len} "
                             f"(max_seq_len){', leaving no room to generate' if generating else ''}")
        return text, ids

    def _normalise_prompts(self, prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            if not prompts:
                raise ValueError("prompts is empty")
            if all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in prompts):
                return [list(prompts)]
            if all(isinstance(p, str) or (isinstance(p, (list, tuple))) for p in prompts):
                return list(prompts)
        raise ValueError("prompts must be a str, a list of str, a list of token ids, or a list of token-id lists")

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop = {params.stop!r}: stop strings match the generated text, and "
                             f"{self.model_name} ships no tokenizer.json (stop_token_ids work without one)")
        for name in ("logit_bias", "allowed_token_ids"):
            outside = [t for t in (getattr(params, name) or ()) if t >= self.config.vocab_size]
            if outside:
                raise ValueError(f"SamplingParams.{name}: token id {outside[0]} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        return params.resolved(self.generation_defaults)

    def _new_sequence(self, prompt, params: SamplingParams, priority: int = 0) -> Sequence:
        self.engine.scheduler.check_priority(priority)  # before the prompt is encoded
        text, ids = self._encode(prompt, truncate=params.truncate_prompt_tokens)
        seq = Sequence(ids, params, self.max_seq_len, self.tokenizer, self.eos_token_ids, text, priority)
        check_min_tokens(seq, self.config.vocab_size)
        if params.structured_outputs is not None:
            seq.matcher = self._matcher(seq)
        return seq

    def _matcher(self, seq: Sequence) -> Matcher:
        """A structured request's Matcher over this model's vocabulary (its TokenIndex built on first use)."""
        if self.tokenizer is None:
            raise ValueError(f"SamplingParams.structured_outputs: {self.model_name} ships no tokenizer.json, and "
                             "structured outputs need the tokens' bytes")
        if not any(t < self.config.vocab_size for t in seq.stop_ids):
            raise ValueError("SamplingParams.structured_outputs: the request has no stop token id (no eos in the "
                             "tokenizer and no stop_token_ids), so a complete output could never end")
        if self._token_index is None:
            self._token_index = TokenIndex(self.tokenizer.token_bytes(), self.config.vocab_size)
        text = sorted(t for t in seq.stop_ids if t < self.config.vocab_size and self._token_index.token_bytes[t])
        if text:  # it would end the output wherever the structure allows its bytes, complete or not
            raise ValueError(f"SamplingParams.stop_token_ids: {text[0]} is a text token "
                             f"({self._token_index.token_bytes[text[0]]!r}); with structured outputs a stop id may "
                             "only end a complete output (use special tokens)")
        return Matcher(seq.params.structured_outputs.automaton(), self._token_index, seq.stop_ids)

    def _batch(self, prompts, params, priority=None) -> list[list[Sequence]]:
        """generate / agenerate: validated sequences for every prompt, n (SamplingParams.n) of each (nothing
        submitted yet). params: one SamplingParams for all, or a list of one per prompt (as vLLM takes them);
        priority: None (0 for all) or a list of one per prompt."""
        prompts = self._normalise_prompts(prompts)
        if priority is None:
            priority = [0] * len(prompts)
        elif not isinstance(priority, (list, tuple)) or len(priority) != len(prompts):
            raise ValueError(f"priority: {priority!r} is not a list of one integer per prompt ({len(prompts)})")
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"params: a list of {len(params)} SamplingParams for {len(prompts)} prompts (give "
                                 "one per prompt, or one for all)")
            params = [self._params(q) for q in params]
        else:
            params = [self._params(params)] * len(prompts)
        groups = []
        for prompt, p, rank in zip(prompts, params, priority):
            choices = p.choices()
            first = self._new_sequence(prompt, choices[0], rank)
            groups.append([first] + [self._new_sequence(first.prompt_ids, q, rank) for q in choices[1:]])
        return groups

    # ---- request-level API (servers, custom schedulers) -------------------------------------------------------
    # new_request validates a prompt into a Sequence; submit queues sequences; step runs one engine step (prefill
    # or decode of the running batch); abort frees what is left of sequences. A Sequence's output_ids, finished,
    # finish_reason, logprobs and take_new_text() then say what happened. All of them take the engine's lock, so
    # threads may share one LLM; generate / stream / agenerate / astream are built on them.
    def new_request(self, prompt, params: SamplingParams | None = None, priority: int = 0) -> Sequence:
        """One validated request (text or token ids; params resolved against the checkpoint's generation
        defaults), not yet submitted; a ValueError names what is wrong. Needs a tokenizer (its text is streamed).
        One completion: n > 1 is for generate / agenerate / chat. priority: see scheduling_policy."""
        params = self._params(params)
        if params.n > 1:
            raise ValueError(f"SamplingParams.n = {params.n}: a request of the request-level API, stream or astream "
                             "is one completion; generate, agenerate and chat return n")
        if self.tokenizer is None:
            raise ValueError(f"{self.model_name} ships no tokenizer.json: streaming text needs one")
        return self._new_sequence(prompt, params, priority)

    # ---- API --------------------------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Generate for one or several prompts, run together as one batch (up to max_batch_size at a time). params:
        one SamplingParams for every prompt, or a list of one per prompt; priority: one per prompt (see
        scheduling_policy). -> one RequestOutput per prompt, in order."""
        groups = self._batch(prompts, params, priority)
        seqs = [s for group in groups for s in group]
        self.submit(seqs)
        try:
            while not all(s.finished for s in seqs):
                self.step()
        finally:
            self.abort(seqs)
        return [self._output(group) for group in groups]

    def stream(self, prompt, params: SamplingParams | None = None, priority: int = 0) -> Iterator[str]:
        """Yield text pieces of one prompt's generation as tokens arrive; they join to the `generate` text.
        Closing the iterator early cancels the request and frees its cache blocks."""
        return self._stream(self.new_request(prompt, params, priority))

    def _stream(self, seq: Sequence) -> Iterator[str]:
        self.submit([seq])
        try:
            while True:
                piece, done = self._step_and_take(seq)
                if piece:
                    yield piece
                if done:
                    _check_not_aborted(seq)
                    return
        finally:
            self.abort([seq])

    async def agenerate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                        priority: list[int] | None = None) -> list[RequestOutput]:
        """`generate` for asyncio: the event loop stays free and concurrent coroutines share the running batch. One
        task per event loop steps the engine for all its agenerate / astream requests, one step at a time in a thread
        of the loop's default executor (_AsyncDriver): a waiting request holds no thread."""
        groups = self._batch(prompts, params, priority)
        seqs = [s for group in groups for s in group]
        driver, waiter = self._async_driver(), None
        try:
            await driver.call(self.submit, seqs)  # the lock may be held for a step: never wait for it on the loop
            waiter = driver.watch(seqs, stream=False)
            while not waiter.done:
                await waiter.next()
            waiter.check()
        finally:
            driver.forget(waiter)
            await driver.call(self.abort, seqs)
        return [self._output(group) for group in groups]

    async def astream(self, prompt, params: SamplingParams | None = None, priority: int = 0):
        """`stream` for asyncio: an async iterator of text pieces; closing it early cancels the request."""
        seq = self.new_request(prompt, params, priority)
        driver, waiter = self._async_driver(), None
        try:
            await driver.call(self.submit, [seq])
            waiter = driver.watch([seq], stream=True)
            while True:
                piece = await waiter.next()
                if piece:
                    yield piece
                if waiter.done:
                    waiter.check()
                    return
        finally:
            driver.forget(waiter)
            await driver.call(self.abort, [seq])

    def _async_driver(self) -> "_AsyncDriver":
        """The running event loop's driver of agenerate / astream (one per loop, made on first use)."""
        import asyncio

        loop = asyncio.get_running_loop()
        with self._drivers_lock:
            driver = self._drivers.get(loop)
            if driver is None:
                driver = self._drivers[loop] = _AsyncDriver(self)
            return driver

    def _step_for(self, waiters: list["_Waiter"]) -> tuple[Exception | None, list[tuple[str, bool]]]:
        """In a worker thread: one engine step (when there is work), then, under the same lock, what each waiter's
        sequences have to say: (the step's error or None, [(new text (streams only), all finished)])."""
        error = None
        with self._locked():
            try:
                if self.engine.has_work():
                    self.engine.step()
            except Exception as e:  # reported to the waiters: the stepping task goes on for the others
                error = e
            return error, [(w.seqs[0].take_new_text() if w.stream else "", all(s.finished for s in w.seqs))
                           for w in waiters]

    def step(self) -> list[Sequence]:
        """One engine step over the submitted sequences (a no-op when there are none). -> the sequences that
        received a token (only their text and state can have changed)."""
        with self._locked():
            return self.engine.step()

    def _step_and_take(self, seq: Sequence) -> tuple[str, bool]:
        with self._locked():
            if not seq.finished:
                self.engine.step()
            return seq.take_new_text(), seq.finished

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             priority: int | list[int] = 0, add_generation_prompt: bool = True, continue_final_message: bool = False,
             **template_kwargs) -> RequestOutput | list[RequestOutput]:
        """One assistant reply to `messages` ([{"role": ..., "content": ...}, ...]) using the checkpoint's chat
        template; or, for a list of such conversations, a list of replies run as one batch (as vLLM's chat takes
        them; params and priority then one for all or a list of one per conversation). continue_final_message=True
        (with add_generation_prompt=False, as vLLM asks) continues the final message, e.g. an assistant reply begun
        by the caller: the reply is the continuation alone. Extra keyword arguments go to the template (e.g.
        enable_thinking=False)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model_name} ships no tokenizer.json: chat needs one")
        batch = isinstance(messages, list) and bool(messages) and all(isinstance(m, list) for m in messages)
        render = self.tokenizer.apply_chat_template
        prompts = [render(m, add_generation_prompt, continue_final_message, **template_kwargs)
                   for m in (messages if batch else [messages])]
        if not isinstance(priority, list):
            priority = [priority] * len(prompts)
        outs = self.generate(prompts, params, priority)
        return outs if batch else outs[0]

    def logits(self, token_ids) -> torch.Tensor:
        """Full-sequence logits of one token-id list: float32 [len(token_ids), vocab]."""
        _, ids = self._encode(token_ids if isinstance(token_ids, (str, torch.Tensor)) else list(token_ids),
                              generating=False)
        with self._locked():
            return self.engine.prompt_logits(ids)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for the next steps, all or none: a ValueError (e.g. a request that can never fit the KV
        cache) leaves none of them queued (those already added are aborted: new requests are needed to retry)."""
        with self._locked():
            added = []
            try:
                for s in seqs:
                    self.engine.add(s)
                    added.append(s)
            except BaseException:
                for s in added:
                    self.engine.abort(s)
                raise

    def abort(self, seqs: list[Sequence]) -> None:
        """Cancel the unfinished ones and free every cache block the sequences still hold (finished ones too). A
        sequence not submitted yet is marked aborted (it cannot be submitted after). From the thread that holds the
        engine lock (inside a step), the aborts run as it lets go of it."""
        if self._lock_owner == threading.get_ident():
            self._deferred_aborts.extend(seqs)
            return
        with self._locked():
            for s in seqs:
                self._abort_now(s)

    def _abort_now(self, s: Sequence) -> None:
        if not s.finished or s.blocks:
            self.engine.abort(s)

    def has_unfinished(self) -> bool:
        """Whether any submitted sequence is still waiting or running. Lock-free (a read of the scheduler's queues),
        so an event loop may poll it while a step runs in a worker thread."""
        return self.engine.has_work()

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _output(self, group: list[Sequence]) -> RequestOutput:
        """The RequestOutput of one prompt's sequences (its n completions)."""
        for s in group:
            _check_not_aborted(s)
        outputs = [CompletionOutput(i, s.text if s.detok is not None else None, list(s.output_ids), s.finish_reason,
                                    None if s.logprobs is None else list(s.logprobs),
                                    None if s.logprobs is None else sum(lp for lp, _ in s.logprobs))
                   for i, s in enumerate(group)]
        s, first = group[0], outputs[0]
        rate = None
        if len(s.output_ids) > 1 and s.last_token_time > s.first_token_time:
            rate = (len(s.output_ids) - 1) / (s.last_token_time - s.first_token_time)
        return RequestOutput(
            prompt=s.prompt,
            prompt_token_ids=s.prompt_ids,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            time_to_first_token_s=s.first_token_time - s.arrival,
            decode_tokens_per_s=rate,
            num_cached_tokens=s.num_cached_tokens,
            logprobs=first.logprobs,
            prompt_logprobs=None if s.prompt_logprobs is None else list(s.prompt_logprobs),
            outputs=outputs,
        )


def _check_not_aborted(s: Sequence) -> None:
    """A request of generate / stream that ended as aborted while its caller was still waiting for it was ended by
    a failed engine step, or by an abort() from elsewhere (its own caller's come after it stops waiting): an error,
    not a short output."""
    if s.finish_reason == "abort":
        if s.error is not None:
            raise RuntimeError(f"the request failed: {s.error}")
        raise RuntimeError("the request was aborted by a failed engine step (see the error raised there) or by an "
                           "abort() from elsewhere")


class _Waiter:
    """One agenerate / astream request as its driver sees it: its sequences, the text the driver has handed it and
    it has not taken yet (streams), whether they have all finished, and the error of a failed step."""

    def __init__(self, seqs: list[Sequence], stream: bool):
        import asyncio

        self.seqs, self.stream = seqs, stream
        self.pieces: list[str] = []
        self.done = False
        self.error: RuntimeError | None = None
        self.changed = asyncio.Event()

    async def next(self) -> str:
        """Wait for new text or the end -> the text handed over since the last call."""
        await self.changed.wait()
        self.changed.clear()
        piece = "".join(self.pieces)
        self.pieces.clear()
        return piece

    def fail(self, message: str, cause: BaseException | None) -> None:
        self.error = RuntimeError(message)  # one per waiter: raised in its own task, with its own traceback
        self.error.__cause__ = cause

    def check(self) -> None:
        """At the end: the failed step's error, or the abort of a sequence by a failed step or another caller."""
        if self.error is not None:
            raise self.error
        for s in self.seqs:
            _check_not_aborted(s)


class _AsyncDriver:
    """agenerate / astream of one event loop: one task steps the engine while any of their requests is unfinished,
    one step at a time in a thread of the loop's default executor, and after each step hands each waiting request
    its new text or its end. A waiting request holds no thread (it used to hold one of the default executor, each
    waiting on the engine lock and then stepping the engine once more, so that the application's own to_thread
    calls queued behind them). The default executor, not a thread of the LLM's own: a thread that has run torch
    CPU ops and stays alive (idle) made every later torch CPU op of the process's other threads ~4x slower on the
    2-core machine (OpenMP thread teams), while the default executor's threads end with asyncio.run. Threads calling
    generate / stream step the same engine meanwhile: a step advances every sequence, whoever runs it. A failed
    step fails the requests waiting here (as the server's driver does); their cleanup aborts their sequences."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.waiters: list[_Waiter] = []
        self.task = None

    async def call(self, fn, *args):
        """fn(*args) in a worker thread, in the caller's context (contextvars: request ids, tracing spans), as
        asyncio.to_thread would run it."""
        return await _in_worker(contextvars.copy_context().run, fn, *args)

    def watch(self, seqs: list[Sequence], stream: bool) -> _Waiter:
        """Follow submitted sequences; starts the stepping task if it is not running."""
        import asyncio

        if self.task is not None and self.task.done():  # its callback may not have run yet: the requests it left
            self._stopped(self.task)  # (a step's text taken in a cancelled task is lost) end now, not in a new task
        waiter = _Waiter(seqs, stream)
        self.waiters.append(waiter)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(self._stopped)
        return waiter

    def forget(self, waiter: _Waiter | None) -> None:
        """Its caller has stopped waiting (done, or cancelled: its sequences are aborted next)."""
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    async def _run(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        while self.waiters:
            waiters = list(self.waiters)
            error, updates = await loop.run_in_executor(None, self.llm._step_for, waiters)
            if error is not None:
                log.error("engine step failed: %r", error, exc_info=error)
            for waiter, (piece, finished) in zip(waiters, updates):
                if piece:
                    waiter.pieces.append(piece)
                if error is not None:
                    waiter.fail(f"engine step failed: {error!r}", error)
                if finished or error is not None:
                    waiter.done = True
                    self.forget(waiter)
                if piece or waiter.done:
                    waiter.changed.set()

    def _stopped(self, task) -> None:
        """The stepping task ended (its done callback, or watch finding it done first): with requests left only when
        it was cancelled (the loop shutting down; a task cancelled before it started never ran) or failed. Nothing
        steps for them any more: end them, with an error."""
        if task is not self.task:  # handled already (watch calls this when the callback has not run yet)
            return
        self.task = None  # (the task holds the loop: kept, it would keep every loop ever used alive)
        cause = None if task.cancelled() else task.exception()
        if cause is not None:
            log.error("the asyncio task stepping the engine failed: %r", cause, exc_info=cause)
        for waiter in self.waiters:
            waiter.fail("the asyncio task stepping the engine stopped", cause)
            waiter.done = True
            waiter.changed.set()
        self.waiters.clear()


async def _in_worker(fn, *args):
    """fn(*args), which takes the engine lock, in a thread of the loop's default executor: the event loop never
    waits on the lock (held for whole steps). If the awaiting task is cancelled meanwhile, the CancelledError goes on
    only once fn has run to its end, so a request's cleanup (abort) follows its submit (cancelled again while
    waiting, as at the loop's shutdown, it goes on at once: the thread finishes fn, and a submit after its abort is
    refused)."""
    import asyncio

    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise
