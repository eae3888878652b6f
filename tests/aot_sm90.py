"""Compile every Triton kernel ahead of time for an H100 / H200 (sm_90) exactly as its launcher launches it, and
report registers and spills per variant. No GPU needed: Triton's bundled ptxas builds the cubin on the CPU. This
catches what the interpreter cannot: the real compiler's type and layout errors, tl.dot shape limits, shared memory
over the 227 KiB an sm_90 block may use, and register spills.

The launch parameters come from the launchers themselves, so the list cannot drift from what they pick: the
launchers (rms_norm, decode_attention, fused_moe, ...) run on meta tensors of the built-in model shapes
(models.config.BUILTIN_CONFIGS), and each kernel[grid](...) call is intercepted and specialised by Triton's own JIT
binder, as on a GPU: 16-byte divisibility of pointers and integers, integers equal to 1 as constants. Without that
specialisation every load is scalar and the register counts are those of a kernel the GPU never runs (checked on an
H200 with Triton 3.6: these counts equal the JIT's n_regs / n_spills). The choices enumerated: decode attention with
block tables for the longest context (up to 128 splits of 256-token chunks) and for a short one (one split; the
batch never changes what it compiles: a sequence's chunking does not depend on it), the MoE DEFAULT_CONFIGS and
TUNING_CANDIDATES of every token bucket (float and quantized experts), the shared expert folded and separate, the
prefill attention tiles of PREFILL_CANDIDATES, bf16 and fp16. --quick (the pytest suite): bf16, decode at the
longest context, the defaults of everything else, and the MoE decode tuning candidates of the layer with the most
registers (most pairs per token, shared expert folded).

Per variant: registers per thread, spill = the stack frame in bytes per thread (ptxas -v's "bytes stack frame", read
from the cubin by cuobjdump; what CUDA reports as CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, of which Triton's n_spills is a
quarter: these kernels keep no arrays in local memory, so a stack frame is spilled registers), shared memory, and
compile seconds. Exit 1 if a kernel fails to compile, needs more shared memory than sm_90 allows, or a decode-path
kernel (DECODE_PATH) spills inside an innermost loop of its SASS (tests/sass_loops.py: a local load or store run on
every iteration of the hot loop). A decode-path kernel whose spills all lie outside its innermost loops (values
stored before the weight loop and loaded after it: ptxas trading a few spills for one more block per SM, as it does
under Triton 3.6 for some quantized GEMVs at M > 1) is printed as a NOTE with where the spills are; a prefill kernel
that spills is printed as a warning.

--warm (on a GPU machine; benchmarks/gpu_check runs it first): the same variants, each compiled in parallel workers
through its kernel's own JIT (JITFunction.warmup with the recorded launch's arguments) into Triton's on-disk cache,
under the key a later launch of the same specialisation looks up. A fresh machine otherwise compiles every variant
one after another on its first launch (8-15 s each for the sampled forms' two sampler kernels, on the 2-core
development machine), and the MoE tuning compiles every candidate. Variants the recording does not cover still
compile on their first launch.

    python tests/aot_sm90.py [--quick] [--capability 90] [--jobs N (default: all cores)]
                             [--only NAME (the kernels whose name contains NAME)]
                             [--models NAME ...] [--dtypes bf16 fp16] [--no-quantized] [--warm]
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# --warm (and its spawned workers): compile through the JIT on this machine's GPU, whose cache keys include
# TRITON_DEFAULT_FP_FUSION when it is set, so the environment is left as the later runs will have it
_WARM = "--warm" in sys.argv or os.environ.get("QWEN2RT_AOT_WARM") == "1"
os.environ["TRITON_INTERPRET"] = "0"
if not _WARM:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen2rt.engine import DEFAULT_BUCKETS  # noqa: E402
from qwen2rt.kernels import gemv, moe, quant, rmsnorm, rope_attention, sampler, swiglu  # noqa: E402
from qwen2rt.sampling import SamplingRows  # noqa: E402
from qwen2rt.models.config import BUILTIN_CONFIGS  # noqa: E402
from sass_loops import spill_sites  # noqa: E402  (tests/, beside this file)

MAX_SHARED = 227 * 1024  # sm_90: largest dynamic shared memory per block
BLOCK_SIZE = 16  # the KV cache block size LLM uses by default
SHORT_CONTEXT = 208  # the benchmarks' max_seq_len: 13 blocks, a block-table stride Triton cannot specialise
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the decode path: a kernel here that spills fails the run
DECODE_PATH = {"_decode_attention_kernel", "_decode_reduce_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel",
               "_route_kernel", "_gemv_gate_up_kernel", "_gemv_down_kernel", "_fused_linear_kernel",
               "_candidates_kernel", "_draw_kernel", "_fallback_kernel", "_quant_linear_kernel"}
# the published shapes (the tiny built-ins are float32 shapes for the CPU tests)
MODELS = {name: c for name, c in BUILTIN_CONFIGS.items() if not name.startswith("tiny")}


# ---- recording the launches ---------------------------------------------------------------------------------------

@dataclass
class Variant:
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    launch: tuple = ((), {})  # (args, kwargs) of its first launch: --warm replays it through the JIT
    where: list[str] = field(default_factory=list)  # the launches that use it

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def describe(self) -> str:
        """The meta-parameters and launch options (not the integers the JIT specialised to 1)."""
        declared = {p.name for p in self.fn.params if p.is_constexpr}
        meta = ", ".join(f"{k}={v}" for k, v in self.constexprs.items() if k in declared)
        return f"{meta} | " + ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))


class Recorder:
    """Replaces kernel[grid](...) with a recording of what Triton's JIT would compile for that call, specialised by
    the JIT's own binder (create_function_from_signature, JITFunction._pack_args: Triton 3.6 to 3.9)."""

    def __init__(self, target: GPUTarget):
        self.backend = make_backend(target)
        self.variants: dict[tuple, Variant] = {}
        self.where = ""
        self._binders = {}

    def launch(self, fn: JITFunction, args, kwargs):
        binder = self._binders.get(fn)
        if binder is None:
            binder = self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        # names, not argument paths, for readable output (ASTSource accepts both)
        constexprs = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
        src = ASTSource(fn, signature, constexprs, attrs)
        key = (src.hash(), tuple(sorted(options.items())))
        variant = self.variants.setdefault(key, Variant(fn, signature, constexprs, attrs, dict(options),
                                                        (args, kwargs)))
        variant.where.append(self.where)

    @contextlib.contextmanager
    def recording(self):
        original = JITFunction.__getitem__
        JITFunction.__getitem__ = lambda fn, grid: (lambda *args, **kwargs: self.launch(fn, args, kwargs))
        try:
            yield self
        finally:
            JITFunction.__getitem__ = original


# ---- calling the launchers on meta tensors ------------------------------------------------------------------------

def meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def attention(c, dtype, batch: int, tokens: int, max_seq_len: int, decode: bool = False, config=None):
    """Prefill (`batch` sequences of tokens / batch new tokens; config: its tiles, default the launcher's) or decode
    (`tokens` = `batch` sequences) with block tables sized for max_seq_len."""
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    max_blocks = triton.cdiv(max_seq_len, BLOCK_SIZE)
    cache = [meta(batch * max_blocks, BLOCK_SIZE, hkv, d, dtype=dtype) for _ in range(2)]
    qkv = meta(tokens, (hq + 2 * hkv) * d, dtype=dtype)
    cos = meta(c.max_position_embeddings, d // 2, dtype=torch.float32)
    positions, slots = meta(tokens, dtype=torch.int64), meta(tokens, dtype=torch.int64)
    block_tables = meta(batch, max_blocks, dtype=torch.int32)
    scale = d ** -0.5
    if not decode:  # prefill: the engine's int32 lengths and query starts
        seq_lens, query_start = meta(batch, dtype=torch.int32), meta(batch + 1, dtype=torch.int32)
        rope_attention.prefill_attention(qkv, *cache, cos, cos, positions, slots, block_tables, seq_lens,
                                         query_start, tokens // batch, hq, hkv, scale, config=config)
    else:  # decode: the decode runner's int64 rows
        seq_lens = meta(batch, dtype=torch.int64)
        rope_attention.decode_attention(qkv, *cache, cos, cos, positions, slots, block_tables, seq_lens, hq, hkv,
                                        scale)


def norms_and_mlp(c, dtype, tokens: int):
    x = meta(tokens, c.hidden_size, dtype=dtype)
    w = meta(c.hidden_size, dtype=dtype)
    rmsnorm.rms_norm(x, w, c.rms_norm_eps)
    rmsnorm.add_rms_norm(x, x, w, c.rms_norm_eps)
    if not all(c.is_moe_layer(i) for i in range(c.num_hidden_layers)):  # a dense MLP
        swiglu.silu_and_mul(meta(tokens, 2 * c.intermediate_size, dtype=dtype))


def decode_projections(c, dtype, rows: int):
    """Every decode GEMV as the triton backend calls it (kernels.gemv.fused_linear): norm + qkv (+ bias), o +
    residual, norm + gate_up + SwiGLU and down + residual (dense layers), norm + lm_head into float32 logits."""
    h, q = c.hidden_size, c.num_attention_heads * c.head_dim
    x, g = meta(rows, h, dtype=dtype), meta(h, dtype=dtype)
    gemv.fused_linear(x, meta(c.qkv_size, h, dtype=dtype), meta(c.qkv_size, dtype=dtype) if c.qkv_bias else None,
                      norm_weight=g)
    gemv.fused_linear(meta(rows, q, dtype=dtype), meta(h, q, dtype=dtype), residual=x)
    if not all(c.is_moe_layer(i) for i in range(c.num_hidden_layers)):  # a dense MLP
        i = c.intermediate_size
        gemv.fused_linear(x, meta(2 * i, h, dtype=dtype), norm_weight=g, swiglu=True)
        gemv.fused_linear(meta(rows, i, dtype=dtype), meta(h, i, dtype=dtype), residual=x)
    gemv.fused_linear(x, meta(c.vocab_size, h, dtype=dtype), norm_weight=g, out_dtype=torch.float32)


# the weight-only quantized layouts compiled (kernels.quant): (kind, group size; None = per channel, act-order perm)
QUANT_FORMS = {"int4-g128": ("int4", 128, False), "int4-g128-actorder": ("int4", 128, True),
               "int8-channel": ("int8", None, False), "fp8-channel": ("fp8", None, False)}
QUANT_MODELS = ("qwen2-7b", "qwen2-72b")


def quantized(n: int, k: int, form: str) -> quant.QuantizedWeight:
    kind, group, act_order = QUANT_FORMS[form]
    group = group or k
    if kind == "fp8":
        return quant.QuantizedWeight("fp8", meta(n, k, dtype=torch.float8_e4m3fn), meta(n, 1, dtype=torch.float16),
                                     None, k)
    words, groups = k * quant.KINDS[kind] // 32, k // group
    return quant.QuantizedWeight(kind, meta(n, words, dtype=torch.int32), meta(n, groups, dtype=torch.float16),
                                 meta(n, groups, dtype=torch.float16), group,
                                 meta(k, dtype=torch.int32) if act_order else None)


def quant_projections(c, dtype, rows: int, form: str):
    """The decode GEMVs of a quantized model as the triton backend calls them (kernels.quant.quant_linear): norm +
    qkv (+ bias), o + residual, norm + gate_up + SwiGLU, down + residual; and, per channel, a quantized lm_head into
    float32 logits. Then the prefill paths for each weight: the dequantize kernel and the fused dequantize-GEMM."""
    h, q, i = c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size
    x, g = meta(rows, h, dtype=dtype), meta(h, dtype=dtype)
    weights = [quantized(c.qkv_size, h, form), quantized(h, q, form), quantized(2 * i, h, form),
               quantized(h, i, form)]
    quant.quant_linear(x, weights[0], meta(c.qkv_size, dtype=dtype) if c.qkv_bias else None, norm_weight=g)
    quant.quant_linear(meta(rows, q, dtype=dtype), weights[1], residual=x)
    quant.quant_linear(x, weights[2], norm_weight=g, swiglu=True)
    quant.quant_linear(meta(rows, i, dtype=dtype), weights[3], residual=x)
    if QUANT_FORMS[form][1] is None:
        quant.quant_linear(x, quantized(c.vocab_size, h, form), norm_weight=g, out_dtype=torch.float32)
    for w in weights:
        quant.dequantize_weight(w, dtype)
        for tokens in (48, 512):  # the fused dequantize-GEMM's two tilings (up to 64 rows and above)
            quant.quant_linear_gemm(meta(tokens, w.shape[1], dtype=dtype), w, path="fused")


def sampler_forms(c, rows: int, forms=sampler.FORMS):
    """The Triton sampler on float32 logits [rows, V] (its variants depend on the vocabulary's divisibility only)."""
    v = c.vocab_size
    params = SamplingRows(*(meta(rows, dtype=sampler.ROW_FIELDS[f]) for f in SamplingRows.FIELDS))
    for form in forms:  # with the bias and held rows, as the engine calls it
        sampler.sample(meta(rows, v, dtype=torch.float32), params, meta(rows + 1, v, dtype=torch.int32),
                       meta(rows + 1, v, dtype=torch.bool), form, bias=meta(rows + 1, v, dtype=torch.float32),
                       held=meta(rows + 1, v, dtype=torch.bool))


def moe_pairs(c) -> int:
    """(token, expert) pairs per token with the shared expert folded: top-k + its chunks."""
    return c.num_experts_per_tok + c.shared_expert_intermediate_size // c.moe_intermediate_size


def moe_block(c, dtype, recorder: Recorder, where: str, candidates: str):
    """Every token bucket at its tuning token count, with its default config, the shared expert folded and separate;
    candidates "all": also every tuning candidate, "decode-folded": the decode buckets' candidates, folded only."""
    h, i, e, s = c.hidden_size, c.moe_intermediate_size, c.num_experts, c.shared_expert_intermediate_size
    router, gate_up, down = meta(e, h, dtype=dtype), meta(e, 2 * i, h, dtype=dtype), meta(e, h, i, dtype=dtype)
    shared = (meta(2 * s, h, dtype=dtype), meta(h, s, dtype=dtype), meta(1, h, dtype=dtype)) if s else (None,) * 3
    folds = (True, False) if moe.shared_chunks(i, shared[0]) else (False,)
    for bucket, tokens in moe.TUNING_TOKENS.items():
        decode = bucket in moe.GEMV_BUCKETS
        runs = [(moe.DEFAULT_CONFIGS[bucket], fold) for fold in folds]
        if candidates == "all" or (candidates == "decode-folded" and decode):
            runs += [(cfg, fold) for cfg in moe.TUNING_CANDIDATES[bucket]
                     for fold in (folds if candidates == "all" else folds[:1])]
        for cfg, fold in runs:
            recorder.where = f"{where} {bucket} fold={fold}"
            x = meta(tokens, h, dtype=dtype)
            slots = meta(tokens, dtype=torch.int64)  # as the model and the tuner pass them
            moe.fused_moe(x, router, gate_up, down, c.num_experts_per_tok, c.norm_topk_prob, *shared, config=cfg,
                          regime="decode" if decode else "prefill", fold_shared=fold, token_slots=slots)
            if decode:  # as the model calls it: the post-attention norm and the residual fused in
                moe.fused_moe(x, router, gate_up, down, c.num_experts_per_tok, c.norm_topk_prob, *shared,
                              config=cfg, regime="decode", fold_shared=fold, norm_weight=meta(h, dtype=dtype),
                              residual=x, token_slots=slots)


# the quantized expert layouts compiled for the MoE decode GEMVs (no act-order: MoE experts have none)
MOE_QUANT_FORMS = ("int4-g128", "int8-channel", "fp8-channel")


def moe_quant_block(c, dtype, recorder: Recorder, where: str, form: str, candidates: bool):
    """The token buckets of a MoE layer with quantized experts (kernels.moe's QUANT path: gate_up [E 2I, H], down
    [E H, I] flattened), default configs, the shared expert folded and separate: decode plain and with the norm and
    the residual fused in; prefill with the shared expert separate (the grouped GEMMs dequantize the experts in their
    K loops) and folded (dequantize into scratch + the float grouped GEMMs). candidates: also every tuning candidate
    (kernels.moe_config.tune times them at a CUDA model load, with the bucket's default FOLD_SHARED and then the
    best one with the other)."""
    h, i, e, s = c.hidden_size, c.moe_intermediate_size, c.num_experts, c.shared_expert_intermediate_size
    router, gate_up, down = meta(e, h, dtype=dtype), quantized(e * 2 * i, h, form), quantized(e * h, i, form)
    shared = (quantized(2 * s, h, form), quantized(h, s, form), meta(1, h, dtype=dtype)) if s else (None,) * 3
    folds = (True, False) if moe.shared_chunks(i, shared[0]) else (False,)
    for bucket, tokens in moe.TUNING_TOKENS.items():
        decode = bucket in moe.GEMV_BUCKETS
        runs = [(moe.DEFAULT_CONFIGS[bucket], fold) for fold in folds]
        if candidates:
            runs += [(cfg, fold) for cfg in moe.TUNING_CANDIDATES[bucket] for fold in folds]
        for cfg, fold in runs:
            recorder.where = f"{where} {form} experts {bucket} fold={fold}"
            x = meta(tokens, h, dtype=dtype)
            slots = meta(tokens, dtype=torch.int64)
            moe.fused_moe(x, router, gate_up, down, c.num_experts_per_tok, c.norm_topk_prob, *shared,
                          config=cfg, regime="decode" if decode else "prefill", fold_shared=fold, token_slots=slots)
            if decode:
                moe.fused_moe(x, router, gate_up, down, c.num_experts_per_tok, c.norm_topk_prob, *shared,
                              config=cfg, regime="decode", fold_shared=fold, norm_weight=meta(h, dtype=dtype),
                              residual=x, token_slots=slots)


def record(quick: bool, recorder: Recorder, models=tuple(MODELS), dtypes=tuple(DTYPES), quantized_forms=True):
    """quick: bf16; decode at the longest context; the MoE defaults, and the decode tuning candidates of the layer
    with the most pairs per token (the most registers); the prefill defaults. Else: `dtypes`; decode at the longest
    context and at a short one whose block-table stride is not a multiple of 16 (one split), at batch 1 and at the
    largest bucket; the decode GEMVs at each row count Triton compiles apart (1, one that is not a multiple of 16,
    one that is); every MoE default and candidate. models: the built-in shapes to record; quantized_forms: also
    the weight-only quantized kernels (QUANT_FORMS on QUANT_MODELS, MOE_QUANT_FORMS on the MoE models)."""
    batches = (1,) if quick else (1, max(DEFAULT_BUCKETS))
    gemv_rows = (1,) if quick else (1, 2, max(DEFAULT_BUCKETS))  # Triton specialises an int equal to 1, or to 0 mod 16
    widest = max((c for c in MODELS.values() if c.is_moe), key=moe_pairs, default=None)
    for dname in ("bf16",) if quick else dtypes:
        dtype = DTYPES[dname]
        for name, c in ((n, MODELS[n]) for n in models):
            where = f"{name} {dname}"
            for max_seq_len in (c.max_position_embeddings,) if quick else (c.max_position_embeddings, SHORT_CONTEXT):
                for batch in batches:
                    recorder.where = f"{where} decode B={batch} max_seq_len={max_seq_len}"
                    attention(c, dtype, batch, batch, max_seq_len, decode=True)
            recorder.where = f"{where} decode"
            norms_and_mlp(c, dtype, tokens=1)
            for rows in gemv_rows:
                recorder.where = f"{where} decode GEMVs M={rows}"
                decode_projections(c, dtype, rows)
                recorder.where = f"{where} sampler B={rows}"
                sampler_forms(c, rows)
            for form in QUANT_FORMS if name in QUANT_MODELS and quantized_forms else ():
                for rows in gemv_rows:
                    recorder.where = f"{where} {form} GEMVs M={rows}"
                    quant_projections(c, dtype, rows, form)
            recorder.where = f"{where} prefill"
            for max_seq_len in (c.max_position_embeddings,) if quick else (c.max_position_embeddings, SHORT_CONTEXT):
                for config in [None] + ([] if quick else rope_attention.PREFILL_CANDIDATES):
                    attention(c, dtype, batch=2, tokens=512, max_seq_len=max_seq_len, config=config)
            norms_and_mlp(c, dtype, tokens=512)
            if c.is_moe:
                moe_block(c, dtype, recorder, where,
                          "all" if not quick else "decode-folded" if c == widest else "defaults")
                for form in MOE_QUANT_FORMS if quantized_forms else ():
                    moe_quant_block(c, dtype, recorder, where, form, candidates=not quick)


# ---- compiling ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    regs: int = 0
    spill: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""
    spill_ops: int = 0  # local loads and stores in the SASS (counted when the kernel spills)
    loop_spill_ops: int = 0  # of them inside an innermost loop


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers per thread, stack frame bytes per thread) of kernel `name` in a cubin, read by cuobjdump."""
    out = cuobjdump(cubin, "-res-usage")
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump's output: {out[-300:]}")
    return int(m.group(1)), int(m.group(2))


_VARIANTS: list[Variant] = []
_TARGET: GPUTarget | None = None


def _compile(index: int) -> Result:
    v = _VARIANTS[index]
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs), target=_TARGET,
                                  options=v.options)
        regs, spill = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
        sites = spill_sites(cuobjdump(compiled.asm["cubin"], "-sass")) if spill else None
        return Result(regs, spill, compiled.metadata.shared, time.perf_counter() - start,
                      spill_ops=sites.instructions if sites else 0, loop_spill_ops=sites.in_loops if sites else 0)
    except Exception as e:  # report every failure, not just the first
        return Result(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _warm(index: int) -> Result:
    """Variant `index` through its kernel's own JIT on this machine's GPU (JITFunction.warmup: the launch's
    arguments, compiled, not run), so that Triton's on-disk cache holds it under the key a later launch looks up;
    then loaded, which also builds (and caches) its launcher. Registers and spills as the driver reports them."""
    if _WORKER_ERROR:
        return Result(error=_WORKER_ERROR)
    v = _VARIANTS[index]
    args, kwargs = v.launch
    start = time.perf_counter()
    try:
        kernel = v.fn.warmup(*args, grid=(1,), **kwargs)
        kernel._init_handles()  # loads it (n_regs, n_spills) and builds its launcher (Triton 3.6 to 3.9)
        return Result(kernel.n_regs, 4 * kernel.n_spills, kernel.metadata.shared, time.perf_counter() - start)
    except Exception as e:
        return Result(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _record_variants(quick: bool, models, dtypes, quantized_forms: bool, only: str) -> None:
    recorder = Recorder(_TARGET)
    with recorder.recording():
        record(quick, recorder, models, dtypes, quantized_forms)
    _VARIANTS[:] = sorted((v for v in recorder.variants.values() if only in v.kernel),
                          key=lambda v: (v.kernel not in DECODE_PATH, v.kernel, v.describe()))


_WORKER_ERROR = ""


def _spawned_worker(capability: int, *recording) -> None:
    """--warm's workers start afresh (CUDA cannot cross a fork) and record the same variants in the same order. A
    failure is kept for _warm to report (an initializer that raises would have the pool start workers forever)."""
    global _TARGET, _WORKER_ERROR
    try:
        _TARGET = GPUTarget("cuda", capability, 32)
        _record_variants(*recording)
    except Exception as e:
        _WORKER_ERROR = f"worker start-up: {type(e).__name__}: {e}"


def _list_arg(args: list[str], flag: str, default: tuple) -> tuple:
    if flag not in args:
        return default
    values = []
    for a in args[args.index(flag) + 1:]:
        if a.startswith("--"):
            break
        values.append(a)
    if not values:
        raise SystemExit(f"{flag} needs at least one value")
    return tuple(values)


def main() -> int:
    global _TARGET
    args = sys.argv[1:]
    capability = int(args[args.index("--capability") + 1]) if "--capability" in args else 90
    jobs = int(args[args.index("--jobs") + 1]) if "--jobs" in args else (os.cpu_count() or 1)
    models, dtypes = _list_arg(args, "--models", tuple(MODELS)), _list_arg(args, "--dtypes", tuple(DTYPES))
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; the built-in shapes are {sorted(MODELS)}")
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    only = args[args.index("--only") + 1] if "--only" in args else ""
    _TARGET = GPUTarget("cuda", capability, 32)
    recording = ("--quick" in args, models, dtypes, "--no-quantized" not in args, only)
    _record_variants(*recording)
    start = time.perf_counter()
    if _WARM:
        os.environ["QWEN2RT_AOT_WARM"] = "1"  # the spawned workers import this file afresh: keep its environment
        with multiprocessing.get_context("spawn").Pool(max(1, jobs), _spawned_worker,
                                                       (capability, *recording)) as pool:
            results = pool.map(_warm, range(len(_VARIANTS)), chunksize=1)
        return _report_warm(results, time.perf_counter() - start, jobs)
    # fork: the workers inherit the recorded variants; each compile is independent
    with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
        results = pool.map(_compile, range(len(_VARIANTS)), chunksize=1)

    failed, spills, notes, warnings = [], [], [], []
    print(f"{'regs':>4} {'spill':>6} {'smem':>6} {'s':>5}  kernel meta-parameters | options  (first launch +others)")
    for v, r in zip(_VARIANTS, results):
        line = f"{v.kernel} {v.describe()}  ({v.where[0]}{f' +{len(v.where) - 1}' if len(v.where) > 1 else ''})"
        if r.error:
            failed.append(f"{line}: {r.error}")
            continue
        print(f"{r.regs:>4} {r.spill:>6} {r.shared:>6} {r.seconds:>5.1f}  {line}")
        if r.shared > MAX_SHARED:
            failed.append(f"{line}: needs {r.shared} bytes of shared memory, sm_{capability} allows {MAX_SHARED}")
        if r.spill:
            where = (f"{r.spill} bytes/thread ({r.regs} registers; {r.spill_ops} local loads and stores, "
                     f"{r.loop_spill_ops} in innermost loops): {line}")
            if v.kernel not in DECODE_PATH:
                warnings.append(where)
            else:
                (spills if r.loop_spill_ops else notes).append(where)
    print(f"compiled {len(_VARIANTS) - len(failed)} of {len(_VARIANTS)} kernel variants for sm_{capability} "
          f"(triton {triton.__version__}): {len(spills)} decode-path spills in loops, {len(notes)} outside them, "
          f"{len(warnings)} prefill spills")
    for line in warnings:
        print("WARNING prefill kernel spills", line)
    for line in notes:
        print("NOTE decode-path kernel spills outside its loops", line)
    for line in spills:
        print("SPILL decode-path kernel spills in a loop", line)
    for line in failed:
        print("FAILED", line)
    return 1 if failed or spills else 0


def _report_warm(results: list[Result], wall_s: float, jobs: int) -> int:
    failed = [(v, r) for v, r in zip(_VARIANTS, results) if r.error]
    print(f"{'regs':>4} {'spill':>6} {'smem':>6} {'s':>5}  kernel meta-parameters | options  (first launch +others)")
    for v, r in zip(_VARIANTS, results):
        if not r.error:
            print(f"{r.regs:>4} {r.spill:>6} {r.shared:>6} {r.seconds:>5.1f}  {v.kernel} {v.describe()}  "
                  f"({v.where[0]})")
    print(f"warmed {len(_VARIANTS) - len(failed)} of {len(_VARIANTS)} kernel variants into Triton's cache through "
          f"the JIT (triton {triton.__version__}) in {wall_s:.1f} s with {jobs} workers "
          f"({sum(r.seconds for r in results):.0f} s of compiles)")
    for v, r in failed:
        print(f"FAILED {v.kernel} {v.describe()}  ({v.where[0]}): {r.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
