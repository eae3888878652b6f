"""`python -m qwen2rt profile`: a torch.profiler Chrome trace of one prefill and a few decode steps, with a named
range (record_function, and NVTX on CUDA for Nsight Systems) per layer and per backend op, and a per-op table of
time, bytes moved and % of the bandwidth floor, so the kernel furthest from its limit stands out. Decode steps run
eagerly while profiling (same kernels as the CUDA-graph replays, whose insides the profiler cannot label); the
summed kernel time of one step is what a replay would cost with no launch gaps (`decode_step_ms`)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from qwen2rt.kernels import QuantizedWeight, rms_norm_ref
from qwen2rt.models.backend import Backend, MoEWeights
from qwen2rt.models.qwen2 import named_range


def _nbytes(*tensors) -> int:
    """Bytes of the tensors and quantized weights given (None skipped)."""
    return sum(t.nbytes() if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()
               for t in tensors if t is not None)


class ProfilingBackend(Backend):
    """Wraps a backend: every op runs inside a range named `qwen2rt.<op>` and adds the bytes it must move (inputs,
    outputs, and for attention the cached K/V it reads; for MoE the experts actually selected) to a tally."""

    def __init__(self, inner: Backend, cuda: bool, linear_names: dict[int, str] | None = None):
        self.inner = inner
        self.linear_names = linear_names or {}  # id(weight) -> "norm+qkv", "o+residual", ... (the fused op)
        self.name = inner.name
        self.cuda = cuda
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def _run(self, op, nbytes, fn, *args):
        with named_range(f"qwen2rt.{op}", self.cuda):
            out = fn(*args)
        self.calls[op] += 1
        self.bytes[op] += nbytes + _nbytes(*(out if isinstance(out, tuple) else (out,)))
        return out

    def _linear_op(self, weight) -> str:
        return f"linear.{self.linear_names.get(id(weight), 'other')}"

    def norm_linear(self, x, norm_weight, eps, weight, bias=None, out_dtype=None):
        return self._run(self._linear_op(weight), _nbytes(x, norm_weight, weight, bias), self.inner.norm_linear, x,
                         norm_weight, eps, weight, bias, out_dtype)

    def norm_swiglu(self, x, norm_weight, eps, gate_up):
        return self._run(self._linear_op(gate_up), _nbytes(x, norm_weight, gate_up), self.inner.norm_swiglu, x,
                         norm_weight, eps, gate_up)

    def linear_residual(self, x, weight, residual):
        return self._run(self._linear_op(weight), _nbytes(x, weight, residual), self.inner.linear_residual, x,
                         weight, residual)

    def attention(self, qkv, k_cache, v_cache, rope, meta, shape):
        row = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
        kv_read = 2 * row * int(meta.seq_lens.sum())  # each sequence's cached K and V, once
        op = "attention.prefill" if meta.is_prefill else "attention.decode"
        return self._run(op, _nbytes(qkv) + kv_read, self.inner.attention, qkv, k_cache, v_cache, rope, meta, shape)

    def moe_residual(self, x, norm_weight, eps, w: MoEWeights, token_slots=None):
        with torch.no_grad():
            live = x if token_slots is None else x[token_slots >= 0]  # the bytes a step needs: not the padding
            # rows' experts (the triton kernels skip them; the torch reference computes them)
            h = rms_norm_ref(live, norm_weight, eps)
            top = torch.topk(F.linear(h, w.router), w.top_k, dim=-1).indices.unique().numel()
        per_expert = _nbytes(w.gate_up, w.down) // w.router.shape[0]  # every expert the same size
        nbytes = _nbytes(x, norm_weight, w.router, w.shared_gate_up, w.shared_down, w.shared_gate) + top * per_expert
        return self._run("moe", nbytes, self.inner.moe_residual, x, norm_weight, eps, w, token_slots)


def copy_bandwidth_GBps(device: torch.device) -> float:
    n = (1 << 27) if device.type == "cuda" else (1 << 23)
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n * 2 * reps / (time.perf_counter() - t0) / 1e9


@contextlib.contextmanager
def eager_with_ranges(llm, backend: Backend | None = None):
    """While profiling: decode steps run eagerly (a CUDA-graph replay hides the ranges of the ops inside it; the
    kernels are the same) with named ranges on, and `backend`, when given, in place of the model's. All restored
    afterwards."""
    decoder, model = llm.engine.decoder, llm.model
    saved = decoder.use_graphs, model.backend, model.profile_ranges
    decoder.use_graphs, model.profile_ranges = False, True
    if backend is not None:
        model.backend = backend
    try:
        yield
    finally:
        decoder.use_graphs, model.backend, model.profile_ranges = saved


def range_times(prof, cuda: bool) -> dict[str, tuple[float, int]]:
    """name -> (total µs, count) of each host-side range: on CUDA the device time of its kernels (no launch gaps),
    elsewhere its CPU time. On CUDA two counts, each of which can miss kernels, and the larger is taken: the
    profiler's attribution of kernels to the host range (it missed most of a Qwen1.5-MoE step on an H200: 0.64 ms
    of kernels for a step whose graph replay takes 3.2 ms, suspected to be the Triton kernels, launched through
    the driver API), and the device activities that start inside the range's device-side window (the annotation
    from its first to its last attributed kernel)."""
    out = {}
    for e in prof.key_averages():
        if e.device_type == DeviceType.CPU:
            out[e.key] = ((getattr(e, "device_time_total", 0) or 0) if cuda else e.cpu_time_total, e.count)
    if cuda:
        for name, (us, count) in _device_window_times(prof).items():
            if name in out and us > out[name][0]:
                out[name] = (us, out[name][1])
    return out


def _device_window_times(prof) -> dict[str, tuple[float, int]]:
    import bisect

    windows, activities = defaultdict(list), []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        if getattr(e, "is_user_annotation", False):
            windows[e.name].append((e.time_range.start, e.time_range.end))
        else:
            activities.append((e.time_range.start, e.time_range.end))
    activities.sort()
    starts = [a[0] for a in activities]
    ends = [0.0]  # prefix sums of the durations
    for lo, hi in activities:
        ends.append(ends[-1] + hi - lo)
    out = {}
    for name, spans in windows.items():
        total = 0.0
        for lo, hi in spans:
            i, j = bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)
            total += ends[j] - ends[i]
        out[name] = (total, len(spans))
    return out


def _random_prompts(llm, batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, min(llm.config.vocab_size, 32000), (batch, prompt_len), generator=g).tolist()


def _activities(cuda: bool):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _profiled_generate(llm, batch: int, prompt_len: int, steps: int, backend: "ProfilingBackend | None" = None):
    """A warm-up, then one profiled greedy generation of `steps` decode steps after a prefill of `batch` prompts of
    prompt_len tokens, decode eager and ranges on (eager_with_ranges). -> the profiler."""
    from qwen2rt import SamplingParams

    prompts = _random_prompts(llm, batch, prompt_len)
    with eager_with_ranges(llm, backend):
        llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        if backend is not None:
            backend.bytes.clear()
            backend.calls.clear()
        with torch.profiler.profile(activities=_activities(llm.device.type == "cuda")) as prof:
            llm.generate(prompts, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    return prof


def decode_step_ms(llm, batch: int = 1, prompt_len: int = 128, steps: int = 8) -> float | None:
    """Time of one decode step (after a prompt_len prompt, batch rows): on CUDA the summed device time of its kernels
    — what the step costs with no launch gaps, to compare against a CUDA-graph replay — elsewhere its CPU time.
    Measured on the model's own backend: the per-op wrapper's byte tallies launch kernels of their own."""
    prof = _profiled_generate(llm, batch, prompt_len, steps)
    us, count = range_times(prof, llm.device.type == "cuda").get("qwen2rt.decode_step", (0.0, 0))
    return us / count / 1e3 if count else None


def prefill_kernel_ms(llm, prompt_len: int) -> float | None:
    """Device time of the kernels of one prefill of a prompt_len prompt (forward, logits, first token; every chunk
    of a prompt longer than max_prefill_tokens) on CUDA, CPU time elsewhere: beside the time to first token, how
    much of it the GPU is busy (the rest is host work). With prefix caching on, a prompt seen before prefills only
    its uncached tail: measure on an LLM without it."""
    prof = _profiled_generate(llm, 1, prompt_len, 0)
    us, count = range_times(prof, llm.device.type == "cuda").get("qwen2rt.prefill", (0.0, 0))
    return us / 1e3 if count else None


def profile(llm, batch: int = 1, prompt_len: int = 128, steps: int = 8, trace_path: str | None = None) -> list[dict]:
    """Profile one prefill of `batch` prompts and `steps` decode steps (run eagerly: see eager_with_ranges). -> per-op
    rows (also printed)."""
    cuda = llm.device.type == "cuda"
    w = llm.model.weights
    names = {id(w.lm_head): "norm+lm_head"}
    for layer in w.layers:
        names.update({id(layer.qkv): "norm+qkv", id(layer.o): "o+residual"})
        if not isinstance(layer.mlp, MoEWeights):
            names.update({id(layer.mlp.gate_up): "norm+gate_up+swiglu", id(layer.mlp.down): "down+residual"})
    wrapped = ProfilingBackend(llm.model.backend, cuda, names)
    prof = _profiled_generate(llm, batch, prompt_len, steps, wrapped)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    bandwidth = copy_bandwidth_GBps(llm.device)
    times = range_times(prof, cuda)
    rows = []
    for op, nbytes in wrapped.bytes.items():
        us, _ = times.get(f"qwen2rt.{op}", (0.0, 0))
        if not us:
            continue
        floor_us = nbytes / (bandwidth * 1e3)
        rows.append({"op": op, "calls": wrapped.calls[op], "time_ms": us / 1e3, "MB": nbytes / 1e6,
                     "GBps": nbytes / us / 1e3, "pct_of_floor": 100 * floor_us / us})
    rows.sort(key=lambda r: -r["time_ms"])
    total = sum(r["time_ms"] for r in rows)
    print(f"profile: {llm.model_name}, batch {batch}, prompt {prompt_len}, {steps} decode steps (eager), backend "
          f"{wrapped.name}, {'device' if cuda else 'CPU'} time; copy bandwidth {bandwidth:.0f} GB/s")
    print(f"{'op':<20}{'calls':>7}{'time ms':>11}{'share':>8}{'MB':>11}{'GB/s':>9}{'% floor':>9}")
    for r in rows:
        print(f"{r['op']:<20}{r['calls']:>7}{r['time_ms']:>11.3f}{100 * r['time_ms'] / total:>7.1f}%"
              f"{r['MB']:>11.2f}{r['GBps']:>9.1f}{r['pct_of_floor']:>8.1f}%")
    step_ms = decode_step_ms(llm, batch, prompt_len, steps)
    if step_ms is not None:
        print(f"decode step: {step_ms:.3f} ms of {'kernel' if cuda else 'CPU'} time per step (a second run, without "
              f"the per-op ranges)")
    if trace_path:
        print(f"Chrome trace: {trace_path} (open in chrome://tracing or Perfetto; NVTX ranges on CUDA for nsys)")
    return rows
