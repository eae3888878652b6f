"""Load a Hugging Face checkpoint folder (single `model.safetensors` or sharded with
`model.safetensors.index.json`) into the fused weight layout of `qwen2.ModelWeights`.

Each destination tensor is allocated once on the target device in the target dtype; checkpoint tensors are read
one at a time from the memory-mapped file and copied (cast on the way) into their slice of the destination, so the
host never holds a second full copy of the model. The set of tensors consumed must equal the set the model
needs: a missing, unexpected or mis-shaped tensor, or an unreadable file, is a `CheckpointError` naming it.

Quantized checkpoints (GPTQ, AWQ: see `models.quant`) hold .qweight, .qzeros, .scales (and GPTQ's .g_idx) in place
of each decoder linear's .weight; the same checks apply to them, and each linear is re-packed on the target device
into its rows of the fused QuantizedWeight. A floating-point checkpoint can be quantized while it is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open

from qwen2rt.kernels.quant import QuantizedWeight

from .backend import MoEWeights
from .config import Qwen2Config
from .quant import (QuantConfig, QuantizationError, awq_to_layout, checkpoint_shapes, copy_into, gptq_to_layout,
                    quantize)
from .qwen2 import ModelWeights, allocate_weights, weight_shapes

log = logging.getLogger("qwen2rt")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_EMPTY_SHARED_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.shared_expert\.(gate|up|down)_proj\.weight")
_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class CheckpointError(ValueError):
    """The checkpoint folder does not hold exactly the tensors the config calls for."""


def checkpoint_files(model_dir: str) -> dict[str, list[str] | None]:
    """file path -> names the index says it holds (None for a single unindexed file)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(os.path.join(model_dir, file), []).append(name)
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path} lists shard {os.path.basename(path)}, which does not exist")
        if os.path.isfile(os.path.join(model_dir, SINGLE_FILE)) and os.path.join(model_dir, SINGLE_FILE) not in files:
            # vLLM reads what the index lists too; transformers reads the single file instead
            log.warning("%s: both %s and %s are present; loading the shards the index lists and ignoring %s",
                        model_dir, INDEX_FILE, SINGLE_FILE, SINGLE_FILE)
        return files
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {single: None}
    raise CheckpointError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def untie_distinct_lm_head(model_dir: str, config: Qwen2Config) -> Qwen2Config:
    """config.json ties the lm_head to the embeddings, yet the checkpoint holds an lm_head.weight with other values:
    -> the config untied (a warning says so), as transformers 5 loads such a folder (vLLM drops the tensor). An
    lm_head.weight equal to the embeddings (what exports that ship one hold) keeps the model tied."""
    if not config.tie_word_embeddings:
        return config
    found = _scan(checkpoint_files(model_dir))
    names = ("model.embed_tokens.weight", "lm_head.weight")
    if not all(n in found for n in names) or found[names[0]][1] != found[names[1]][1]:
        return config  # nothing to compare: load_weights names what is missing or mis-shaped
    tensors = []
    for name in names:
        with _open(found[name][0]) as f:
            tensors.append(f.get_tensor(name))
    if torch.equal(*tensors):
        return config
    log.warning("%s: config.json ties the embeddings, but the checkpoint's lm_head.weight differs from them: loading "
                "it as an untied lm_head, as transformers does", model_dir)
    return dataclasses.replace(config, tie_word_embeddings=False)


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


@dataclass
class LinearPart:
    """Rows [start, stop) of a fused quantized projection, filled from one checkpoint linear."""

    fused: QuantizedWeight
    start: int
    stop: int
    takes_perm: bool = True  # False for MoE experts (the flattened routed ones, the shared one): no act-order


def _destinations(config: Qwen2Config, w: ModelWeights) -> dict[str, torch.Tensor | LinearPart]:
    """checkpoint tensor name -> the view of the fused weights it fills. The views partition every allocated
    tensor, so filling all of them leaves nothing uninitialised. A quantized decoder linear is one entry, under its
    module name (e.g. model.layers.0.self_attn.q_proj), whatever tensors the checkpoint stores it as."""
    c = config
    d = c.head_dim
    q_rows, kv_rows = c.num_attention_heads * d, c.num_key_value_heads * d
    dst = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm}
    if not c.tie_word_embeddings:
        dst["lm_head.weight"] = w.lm_head
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        dst[p + "input_layernorm.weight"] = layer.input_norm
        dst[p + "post_attention_layernorm.weight"] = layer.post_attention_norm
        parts = {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows), "v": (q_rows + kv_rows, c.qkv_size)}
        for name, (start, stop) in parts.items():
            _linear(dst, p + f"self_attn.{name}_proj", layer.qkv, start, stop)
            if layer.qkv_bias is not None:
                dst[p + f"self_attn.{name}_proj.bias"] = layer.qkv_bias[start:stop]
        _linear(dst, p + "self_attn.o_proj", layer.o, 0, c.hidden_size)
        mlp = layer.mlp
        if isinstance(mlp, MoEWeights):
            dst[p + "mlp.gate.weight"] = mlp.router
            for e in range(mlp.router.shape[0]):
                if isinstance(mlp.gate_up, QuantizedWeight):  # flattened experts: expert e's rows (views)
                    two_inter, hidden = 2 * c.moe_intermediate_size, c.hidden_size
                    gate_up = mlp.gate_up.rows(e * two_inter, (e + 1) * two_inter)
                    down = mlp.down.rows(e * hidden, (e + 1) * hidden)
                else:
                    gate_up, down = mlp.gate_up[e], mlp.down[e]
                _mlp_destinations(dst, p + f"mlp.experts.{e}.", gate_up, down, takes_perm=False)
            if mlp.shared_gate_up is not None:
                _mlp_destinations(dst, p + "mlp.shared_expert.", mlp.shared_gate_up, mlp.shared_down,
                                  takes_perm=False)  # the expert kernels read it in input order too
                dst[p + "mlp.shared_expert_gate.weight"] = mlp.shared_gate
        else:
            _mlp_destinations(dst, p + "mlp.", mlp.gate_up, mlp.down)
    return dst


def _linear(dst, module, fused, start, stop, takes_perm=True):
    if isinstance(fused, QuantizedWeight):
        dst[module] = LinearPart(fused, start, stop, takes_perm)
    else:
        dst[module + ".weight"] = fused[start:stop]


def _mlp_destinations(dst, prefix, gate_up, down, takes_perm=True):
    inter = gate_up.shape[0] // 2
    _linear(dst, prefix + "gate_proj", gate_up, 0, inter, takes_perm)
    _linear(dst, prefix + "up_proj", gate_up, inter, 2 * inter, takes_perm)
    _linear(dst, prefix + "down_proj", down, 0, down.shape[0], takes_perm)


def expected_tensors(config: Qwen2Config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, is floating point) of every tensor the checkpoint must hold: `weight_shapes`, with each
    decoder linear's .weight replaced by its GPTQ / AWQ tensors when config.json says the checkpoint is quantized."""
    q = config.quantization
    expected = {}
    for name, shape in weight_shapes(config).items():
        module, _, suffix = name.rpartition(".")
        if q is not None and suffix == "weight" and module.rpartition(".")[2] in _LINEARS:
            try:
                parts = checkpoint_shapes(q, module, *shape)
            except QuantizationError as e:
                raise CheckpointError(str(e)) from None
            expected.update({n: (s, n.endswith(".scales")) for n, s in parts.items()})
        else:
            expected[name] = (shape, True)
    return expected


def _scan(files: dict[str, list[str] | None]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (file, shape, safetensors dtype), checking the index against each file's header."""
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for path, indexed in files.items():
        with _open(path) as f:
            names = list(f.keys())
            for name in names:
                if name in found:
                    raise CheckpointError(f"tensor {name!r} appears in both {found[name][0]} and {path}")
                sl = f.get_slice(name)
                found[name] = (path, tuple(sl.get_shape()), sl.get_dtype())
        if indexed is not None:
            missing = sorted(set(indexed) - set(names))
            if missing:
                raise CheckpointError(f"the index places {missing[0]!r} in {path}, but that file does not hold it")
    return found


def load_weights(model_dir: str, config: Qwen2Config, device, dtype: torch.dtype,
                 show_progress: bool | None = None, quantization: QuantConfig | None = None) -> ModelWeights:
    """Read, check, fuse, cast and place every tensor of the checkpoint in `model_dir`.

    A GPTQ / AWQ checkpoint (config.quantization) is re-packed into QuantizedWeights, one linear at a time.
    `quantization` (int8 / int4 / fp8, floating-point checkpoints only) quantizes each fused projection as it is
    read: at most one projection is held in floating point at a time."""
    if config.quantization is not None and quantization is not None:
        raise CheckpointError(f"{model_dir} is already quantized ({config.quantization.describe()}): "
                              f"quantization={quantization.method!r} applies to floating-point checkpoints only")
    files = checkpoint_files(model_dir)
    found = _scan(files)
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]!r}{more} is missing from the checkpoint")
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: some exports still ship it
    if config.is_moe and not config.shared_expert_intermediate_size:
        # transformers saves a MoE without a shared expert with one of width 0 (empty weights) and its gate, whose
        # output it multiplies by that expert's zeros: nothing to load
        for name, (_, shape, _) in found.items():
            if _EMPTY_SHARED_EXPERT.fullmatch(name) and 0 in shape:
                ignorable.add(name)
                ignorable.add(name.split(".shared_expert.")[0] + ".shared_expert_gate.weight")
    unexpected = sorted(set(found) - set(expected) - ignorable)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{model_dir}: unexpected tensor {unexpected[0]!r}{more} in {found[unexpected[0]][0]}"
                              " (does config.json match the checkpoint?)")
    for name, (shape, is_float) in expected.items():
        path, got, st_dtype = found[name]
        if got != shape:
            raise CheckpointError(f"tensor {name!r} in {path} has shape {list(got)}, expected {list(shape)}")
        if is_float and st_dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path} has dtype {st_dtype}, expected a float type")
        if not is_float and st_dtype != "I32":
            raise CheckpointError(f"tensor {name!r} in {path} has dtype {st_dtype}, expected I32 (packed int32)")
    tied_head = False
    if "lm_head.weight" in found and config.tie_word_embeddings:
        path, got, _ = found["lm_head.weight"]
        if got != (config.vocab_size, config.hidden_size):
            raise CheckpointError(f"tensor 'lm_head.weight' in {path} has shape {list(got)}, expected "
                                  f"{[config.vocab_size, config.hidden_size]}")
        tied_head = True  # compared with the embeddings once they are read

    scale_dtype = dtype
    if config.quantization is not None:  # keep the checkpoint's scales dtype (fp16): exact, whatever the model dtype
        scale_dtypes = {found[n][2] for n in expected if n.endswith(".scales")}
        if len(scale_dtypes) != 1:
            raise CheckpointError(f"{model_dir}: the .scales tensors mix dtypes {sorted(scale_dtypes)}")
        scale_dtype = _TORCH_DTYPES[scale_dtypes.pop()]
    try:
        weights = allocate_weights(config, device, dtype, quantization=config.quantization or quantization,
                                   scale_dtype=scale_dtype)
    except QuantizationError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    destinations = _destinations(config, weights)
    plain = {n: t for n, t in destinations.items() if not isinstance(t, LinearPart)}
    linears = {n: t for n, t in destinations.items() if isinstance(t, LinearPart)}
    total = sum(os.path.getsize(p) for p in files)
    if show_progress is None:
        show_progress = total > (1 << 30)
    progress = _Progress(total, show_progress)
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(_open(path)) for path in files}

        def read(name: str) -> torch.Tensor:
            path = found[name][0]
            try:
                tensor = handles[path].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
            progress.add(tensor.numel() * tensor.element_size())
            return tensor

        for name in sorted(plain, key=lambda n: found[n][0]):  # file by file
            plain.pop(name).copy_(read(name))
        if tied_head and not torch.equal(read("lm_head.weight").to(weights.embed), weights.embed):
            raise CheckpointError(f"{model_dir}: config.json ties the embeddings, but the checkpoint's lm_head.weight "
                                  "differs from them (untie_distinct_lm_head(model_dir, config) first loads it as "
                                  "transformers does, untied)")
        fused = [part.fused for part in linears.values()]
        try:
            if config.quantization is not None:
                _load_quantized_linears(linears, config.quantization, read, device)
            else:
                _quantize_linears(linears, quantization, read, device, dtype)
            for w in fused:
                w.validate()
        except QuantizationError as e:
            raise CheckpointError(str(e)) from None
    progress.done()
    if plain or linears:  # unreachable after the checks above; kept so a logic error can never leave weights empty
        raise CheckpointError(f"tensor {(sorted(plain) + sorted(linears))[0]!r} was never loaded")
    return weights


def _by_fused(linears: dict[str, LinearPart]) -> list[list[tuple[str, LinearPart]]]:
    """The linear parts grouped by the fused projection they fill (q, k, v together; gate, up together)."""
    groups: dict[int, list[tuple[str, LinearPart]]] = {}
    for name, part in linears.items():
        groups.setdefault(id(part.fused), []).append((name, part))
    return list(groups.values())


def _load_quantized_linears(linears: dict[str, LinearPart], q: QuantConfig, read, device) -> None:
    """GPTQ / AWQ tensors -> the fused QuantizedWeights, one checkpoint linear at a time (converted on `device`).
    The parts of one fused projection must share their g_idx (one act-order permutation for the fused weight)."""
    for group in _by_fused(linears):
        first_g_idx = None
        for name, part in group:
            if q.method == "gptq":
                g_idx = read(name + ".g_idx").to(device)
                converted = gptq_to_layout(q, read(name + ".qweight").to(device), read(name + ".qzeros").to(device),
                                           read(name + ".scales").to(device), g_idx, name)
                if converted.perm is not None and not part.takes_perm:
                    raise QuantizationError(f"tensor {name + '.g_idx'!r} orders the inputs by act-order groups (not "
                                            "input order): MoE experts (the shared one too) take GPTQ weights "
                                            "without act-order only")
                if first_g_idx is None:
                    first_g_idx = (name, g_idx)
                    part.fused.perm = converted.perm
                elif not torch.equal(g_idx, first_g_idx[1]):
                    raise QuantizationError(f"tensor {name + '.g_idx'!r} differs from {first_g_idx[0] + '.g_idx'!r}: "
                                            "the projections fused into one weight (q, k, v; gate, up) must share "
                                            "their act-order g_idx")
            else:
                converted = awq_to_layout(q, read(name + ".qweight").to(device), read(name + ".qzeros").to(device),
                                          read(name + ".scales").to(device), name)
            copy_into(part.fused.rows(part.start, part.stop), converted, name)
            del linears[name]


def _quantize_linears(linears: dict[str, LinearPart], q: QuantConfig, read, device, dtype) -> None:
    """Floating-point linears -> the fused QuantizedWeights: each fused projection is assembled in `dtype` on
    `device`, quantized, and freed before the next one is read."""
    for group in _by_fused(linears):
        fused = group[0][1].fused
        staging = torch.empty(fused.shape, device=device, dtype=dtype)
        for name, part in group:
            staging[part.start:part.stop].copy_(read(name + ".weight"))
        copy_into(fused, quantize(staging, q, fused.dtype, group[0][0]), group[0][0])
        del staging
        for name, _ in group:
            del linears[name]


class _Progress:
    def __init__(self, total: int, show: bool):
        self.total, self.show, self.read, self.start, self.last = total, show, 0, time.perf_counter(), 0.0

    def add(self, nbytes: int) -> None:
        self.read += nbytes
        now = time.perf_counter()
        if self.show and now - self.last > 0.5:
            self.last = now
            print(f"\rloading weights: {self.read / 1e9:.2f}/{self.total / 1e9:.2f} GB, {now - self.start:.1f} s",
                  end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.show:
            print(f"\rloading weights: {self.read / 1e9:.2f} GB, {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)
