"""Configs of the MoE kernels (kernels/moe.py): the token buckets, the default block sizes per bucket, the tuning
candidates, warm-up tuning on the GPU and its on-disk cache. A config is keyed on the layer's dimensions, dtype, GPU,
expert weight form and kernels_version() (Triton's version and the kernels' source), never on the token count (the
bucket stands for it); everything is resolved at warm-up, before graph capture, and QWEN2RT_MOE_CONFIG (a JSON
object) pins one config for every bucket."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import torch

log = logging.getLogger("qwen2rt")

DECODE_MAX_TOKENS = 32  # up to this many tokens the block takes the GEMV path (every decode bucket)


# ---- configs ----------------------------------------------------------------------------------------------------

def token_bucket(tokens: int) -> str:
    """Configs are tuned per bucket of token counts: two GEMV buckets (1-4 and 5-32 rows: the GEMVs read a selected
    expert's weights once per row, so the best tiles, and whether folding the shared expert pays, can differ) and
    two grouped-GEMM ones."""
    if tokens <= 4:
        return "decode"
    if tokens <= DECODE_MAX_TOKENS:
        return "decode-wide"
    return "prefill-small" if tokens <= 512 else "prefill-large"


GEMV_BUCKETS = ("decode", "decode-wide")


# FOLD_SHARED: run a shared expert as extra experts in the grouped launches (see the module docstring); ignored
# when the layer has none or its width is not a multiple of the expert width.
DEFAULT_CONFIGS = {
    "decode": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "FOLD_SHARED": True, "SPLIT_PAIRS": 1},
    "decode-wide": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "FOLD_SHARED": True, "SPLIT_PAIRS": 1},
    "prefill-small": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3,
                      "FOLD_SHARED": False},
    "prefill-large": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
                      "FOLD_SHARED": False},
}
# On CPU (the Triton interpreter, ~10 ms per program whatever its size): few large programs, as gemv_config does
INTERPRETER_GEMV_TILES = {"BLOCK_N": 64, "BLOCK_K": 128}
# Kept small: every candidate is a Triton compile (about a second) at the first warm-up of a model shape. Block sizes
# are tuned with the bucket's default FOLD_SHARED; the best one is then also timed with the other choice.
TUNING_CANDIDATES = {
    "decode": [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
               for n, k, w in ((8, 256, 2), (16, 128, 2), (16, 256, 2), (16, 256, 4), (32, 128, 4), (32, 256, 4))]
    # the down GEMV with each token's pairs split over 2 or 4 programs: at batch 1 the unsplit one has only
    # H / BLOCK_N programs (128 for Qwen1.5-MoE), each streaming all k + S experts' rows in turn
    + [{"BLOCK_N": n, "BLOCK_K": 256, "num_warps": w, "SPLIT_PAIRS": p} for n, w, p in ((16, 4, 2), (16, 4, 4),
                                                                                        (32, 4, 4))],
    "prefill-small": [{"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": 64, "num_warps": 4, "num_stages": s}
                      for n in (64, 128) for s in (3, 4)],
    "prefill-large": [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "num_warps": w, "num_stages": 3}
                      for m, n, w in ((64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8))],
}
TUNING_CANDIDATES["decode-wide"] = TUNING_CANDIDATES["decode"]  # the same kernels: no extra compile, only timing
TUNING_TOKENS = {"decode": 1, "decode-wide": 16, "prefill-small": 256, "prefill-large": 2048}


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# the modules whose source the MoE kernels and their launcher are built from (kernels/, beside this file)
KERNEL_SOURCES = ("moe.py", "moe_config.py", "quant.py", "gemv.py", "rmsnorm.py", "swiglu.py")


@functools.lru_cache(maxsize=None)
def kernels_version() -> str:
    """The Triton version and a hash of KERNEL_SOURCES: a config was timed against these kernels by this compiler, so
    an edit of either makes a new key (tuned again at the next warm-up) instead of reusing a choice timed against
    other code (the same reason Triton's own cache keys hold the kernel's source)."""
    import triton

    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(f.read())
    return f"triton{triton.__version__}-{digest.hexdigest()[:12]}"


def config_key(hidden: int, inter: int, num_experts: int, top_k: int, shared_inter: int, dtype: torch.dtype,
               bucket: str, device: torch.device, weights: str = "") -> str:
    """weights: weight_tag of the experts ("" for float weights, the key of the float kernels). The second field is
    kernels_version()."""
    gpu = _device_name(device)
    return (f"{gpu}|{kernels_version()}|H{hidden}|I{inter}|E{num_experts}|k{top_k}|S{shared_inter}|"
            f"{str(dtype).replace('torch.', '')}{'|' + weights if weights else ''}|{bucket}")


def _same_layer(a: str, b: str) -> bool:
    """Two cache keys of the same GPU and layer form, whatever their kernels_version."""
    fa, fb = a.split("|"), b.split("|")
    return fa[:1] + fa[2:] == fb[:1] + fb[2:]


def cache_path() -> str:
    root = os.environ.get("QWEN2RT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2rt")
    return os.path.join(root, "moe_configs.json")


_resolved: dict[tuple, dict] = {}  # (key, bucket, pin, cache file) -> config: the decode path never reads the disk
_tuned: dict[str, dict] = {}  # configs tuned by this process (also written to the cache file when possible)


def _load_cache() -> dict:
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def get_config(key: str, bucket: str) -> dict:
    """QWEN2RT_MOE_CONFIG (a JSON object, pins every bucket) > the on-disk tuning cache > the defaults."""
    pinned = os.environ.get("QWEN2RT_MOE_CONFIG")
    memo = (key, bucket, pinned, cache_path())
    if memo not in _resolved:
        chosen = json.loads(pinned) if pinned else _tuned.get(key) or _load_cache().get(key, {})
        base = DEFAULT_CONFIGS[bucket]
        if key.startswith("cpu|") and bucket in GEMV_BUCKETS:  # the interpreter runs programs one after another
            base = dict(base, **INTERPRETER_GEMV_TILES)
        _resolved[memo] = dict(base, **chosen)
    return _resolved[memo]


def tune(x_like: torch.Tensor, router, gate_up, down, top_k: int, renormalize: bool, tokens: int,
         shared_gate_up=None, shared_down=None, shared_gate=None, candidates: list[dict] | None = None,
         bench=None) -> dict:
    """Time every candidate config for this layer shape at `tokens` tokens (then, for a foldable shared expert, the
    best one with FOLD_SHARED flipped), store the fastest in the on-disk cache and return it. `bench(fn) -> ms`
    defaults to triton.testing.do_bench (GPU)."""
    from .moe import fused_moe, moe_sizes, shared_chunks, shared_width, weight_tag

    bucket = token_bucket(tokens)
    shared_inter = shared_width(shared_gate_up)
    hidden, inter, num_experts = moe_sizes(router, gate_up)
    key = config_key(hidden, inter, num_experts, top_k, shared_inter, x_like.dtype, bucket, x_like.device,
                     weight_tag(gate_up))
    x = torch.randn(tokens, hidden, device=x_like.device, dtype=x_like.dtype)
    slots = torch.arange(tokens, device=x_like.device)  # every token live, as the model's forward passes them
    if bench is None:
        from triton.testing import do_bench as bench
    fold_default = DEFAULT_CONFIGS[bucket]["FOLD_SHARED"]

    def timed(cfg):
        try:
            return bench(lambda: fused_moe(x, router, gate_up, down, top_k, renormalize, shared_gate_up, shared_down,
                                           shared_gate, config=cfg, token_slots=slots))
        except Exception as e:  # a config that does not compile here (shared memory, ...) is skipped
            log.debug("moe config %s failed: %r", cfg, e)
            return float("inf")

    best, best_ms = None, float("inf")
    for cfg in candidates or TUNING_CANDIDATES[bucket]:
        cfg = dict(cfg, FOLD_SHARED=cfg.get("FOLD_SHARED", fold_default))
        ms = timed(cfg)
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no MoE config ran for {key}")
    if shared_chunks(inter, shared_gate_up):
        flipped = dict(best, FOLD_SHARED=not best["FOLD_SHARED"])
        ms = timed(flipped)
        log.info("moe: %s shared expert folded %.4f ms, separate %.4f ms", key,
                 *((ms, best_ms) if flipped["FOLD_SHARED"] else (best_ms, ms)))
        if ms < best_ms:
            best, best_ms = flipped, ms
    _tuned[key] = best
    _resolved.clear()
    try:
        # entries of this layer timed against other kernels are dropped: the file keeps one per GPU and layer form
        cache = {k: v for k, v in _load_cache().items() if not _same_layer(k, key)}
        cache[key] = best
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        with open(cache_path(), "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
    except OSError as e:  # a read-only home: keep the result for this process, say so
        log.warning("moe: could not write the tuning cache %s (%s); set QWEN2RT_CACHE_DIR to keep tuned configs",
                    cache_path(), e)
    log.info("moe: tuned %s -> %s (%.4f ms)", key, best, best_ms)
    return best


def warmup(router, gate_up, down, top_k: int, renormalize: bool, shared_gate_up=None, shared_down=None,
           shared_gate=None) -> None:
    """At model load on CUDA: tune every token bucket of this layer shape that the on-disk cache does not hold yet.
    Skipped when QWEN2RT_MOE_TUNE=0 (the defaults are then used, and logged) or a config is pinned."""
    from .moe import moe_sizes, shared_width, weight_tag

    device = gate_up.device
    if device.type != "cuda" or os.environ.get("QWEN2RT_MOE_CONFIG"):
        return
    hidden, inter, num_experts = moe_sizes(router, gate_up)
    shared_inter = shared_width(shared_gate_up)
    cache = _load_cache()
    for bucket, tokens in TUNING_TOKENS.items():
        key = config_key(hidden, inter, num_experts, top_k, shared_inter, router.dtype, bucket, device,
                         weight_tag(gate_up))
        if key in cache or key in _tuned:
            continue
        if os.environ.get("QWEN2RT_MOE_TUNE", "1") == "0":
            log.warning("moe: no tuned config for %s (QWEN2RT_MOE_TUNE=0): using the defaults %s", key,
                        DEFAULT_CONFIGS[bucket])
            continue
        tune(router, router, gate_up, down, top_k, renormalize, tokens, shared_gate_up, shared_down, shared_gate)
