"""Load a Hugging Face checkpoint folder (single `model.safetensors` or sharded with
`model.safetensors.index.json`) into the fused weight layout of `qwen2.ModelWeights`.

Each destination tensor is allocated once on the target device in the target dtype; checkpoint tensors are read
one at a time from the memory-mapped file and copied (cast on the way) into their slice of the destination, so the
host never holds a second full copy of the model. The set of tensors consumed must equal the set the model
needs: a missing, unexpected or mis-shaped tensor, or an unreadable file, is a `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
from safetensors import safe_open

from .backend import MoEWeights
from .config import Qwen2Config
from .qwen2 import ModelWeights, allocate_weights, weight_shapes

log = logging.getLogger("qwen2rt")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


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
        return files
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {single: None}
    raise CheckpointError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _destinations(config: Qwen2Config, w: ModelWeights) -> dict[str, torch.Tensor]:
    """checkpoint tensor name -> the view of the fused weights it fills. The views partition every allocated
    tensor, so filling all of them leaves nothing uninitialised."""
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
        parts = {"q": slice(0, q_rows), "k": slice(q_rows, q_rows + kv_rows), "v": slice(q_rows + kv_rows, None)}
        for name, rows in parts.items():
            dst[p + f"self_attn.{name}_proj.weight"] = layer.qkv[rows]
            if layer.qkv_bias is not None:
                dst[p + f"self_attn.{name}_proj.bias"] = layer.qkv_bias[rows]
        dst[p + "self_attn.o_proj.weight"] = layer.o
        mlp = layer.mlp
        if isinstance(mlp, MoEWeights):
            dst[p + "mlp.gate.weight"] = mlp.router
            for e in range(mlp.gate_up.shape[0]):
                _mlp_destinations(dst, p + f"mlp.experts.{e}.", mlp.gate_up[e], mlp.down[e])
            if mlp.shared_gate_up is not None:
                _mlp_destinations(dst, p + "mlp.shared_expert.", mlp.shared_gate_up, mlp.shared_down)
                dst[p + "mlp.shared_expert_gate.weight"] = mlp.shared_gate
        else:
            _mlp_destinations(dst, p + "mlp.", mlp.gate_up, mlp.down)
    return dst


def _mlp_destinations(dst, prefix, gate_up, down):
    inter = gate_up.shape[0] // 2
    dst[prefix + "gate_proj.weight"] = gate_up[:inter]
    dst[prefix + "up_proj.weight"] = gate_up[inter:]
    dst[prefix + "down_proj.weight"] = down


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
                 show_progress: bool | None = None) -> ModelWeights:
    """Read, check, fuse, cast and place every tensor of the checkpoint in `model_dir`."""
    files = checkpoint_files(model_dir)
    found = _scan(files)
    expected = weight_shapes(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]!r}{more} is missing from the checkpoint")
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: some exports still ship it
    unexpected = sorted(set(found) - set(expected) - ignorable)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{model_dir}: unexpected tensor {unexpected[0]!r}{more} in {found[unexpected[0]][0]}"
                              " (does config.json match the checkpoint?)")
    for name, shape in expected.items():
        path, got, st_dtype = found[name]
        if got != shape:
            raise CheckpointError(f"tensor {name!r} in {path} has shape {list(got)}, expected {list(shape)}")
        if st_dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path} has dtype {st_dtype}, expected a float type")
    if "lm_head.weight" in found and config.tie_word_embeddings:
        path, got, _ = found["lm_head.weight"]
        if got != (config.vocab_size, config.hidden_size):
            raise CheckpointError(f"tensor 'lm_head.weight' in {path} has shape {list(got)}, expected "
                                  f"{[config.vocab_size, config.hidden_size]}")
        log.info("tied embeddings: ignoring the checkpoint's lm_head.weight, as Hugging Face does")

    weights = allocate_weights(config, device, dtype)
    destinations = _destinations(config, weights)
    total = sum(os.path.getsize(p) for p in files)
    if show_progress is None:
        show_progress = total > (1 << 30)
    done, start = 0, time.perf_counter()
    for n, path in enumerate(files, 1):
        with _open(path) as f:
            for name in f.keys():
                if name not in destinations:
                    continue
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
                destinations.pop(name).copy_(tensor)
        done += os.path.getsize(path)
        if show_progress:
            print(f"\rloading weights: {n}/{len(files)} files, {done / 1e9:.2f}/{total / 1e9:.2f} GB, "
                  f"{time.perf_counter() - start:.1f} s", end="" if n < len(files) else "\n", file=sys.stderr,
                  flush=True)
    if destinations:  # unreachable after the checks above; kept so a logic error can never leave weights empty
        raise CheckpointError(f"tensor {sorted(destinations)[0]!r} was never loaded")
    return weights
