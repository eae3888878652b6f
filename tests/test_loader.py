"""Checkpoint loading: fusion, dtype casting, and every way a folder can be wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2rt import LLM
from qwen2rt.models import CheckpointError, load_config, load_weights
from qwen2rt.models.backend import MoEWeights


def copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_single(path, edit):
    """Load model.safetensors, let `edit` change the dict, write it back."""
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_fused_layout_equals_checkpoint(hf_checkpoints):
    path, hf = hf_checkpoints["moe_renorm"]
    cfg = load_config(path)
    w = load_weights(path, cfg, "cpu", torch.float32)
    sd = hf.state_dict()
    layer = w.layers[0]
    p = "model.layers.0."
    torch.testing.assert_close(layer.qkv, torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
    torch.testing.assert_close(layer.qkv_bias, torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
    assert isinstance(layer.mlp, MoEWeights)
    # transformers 5 holds experts stacked as [E, 2I, H] and [E, H, I], the same layout as ours
    torch.testing.assert_close(layer.mlp.gate_up, sd[p + "mlp.experts.gate_up_proj"])
    torch.testing.assert_close(layer.mlp.down, sd[p + "mlp.experts.down_proj"])
    torch.testing.assert_close(layer.mlp.shared_gate, sd[p + "mlp.shared_expert_gate.weight"])
    assert not isinstance(w.layers[2].mlp, MoEWeights)  # mlp_only_layers=[2]


def test_tied_embeddings_share_storage(hf_checkpoints):
    path, _ = hf_checkpoints["dense_tied_mha_sharded"]
    w = load_weights(path, load_config(path), "cpu", torch.float32)
    assert w.lm_head is w.embed


def test_dtype_cast(hf_checkpoints):
    path, hf = hf_checkpoints["dense_gqa"]
    w = load_weights(path, load_config(path), "cpu", torch.bfloat16)
    assert w.embed.dtype == torch.bfloat16 and w.layers[1].qkv.dtype == torch.bfloat16
    torch.testing.assert_close(w.embed, hf.state_dict()["model.embed_tokens.weight"].bfloat16())


def test_missing_tensor(hf_checkpoints, tmp_path):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    rewrite_single(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias'.*missing"):
        LLM(path, device="cpu")


def test_unexpected_tensor(hf_checkpoints, tmp_path):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    rewrite_single(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.randn(3, 3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        LLM(path, device="cpu")


def test_misshaped_tensor(hf_checkpoints, tmp_path):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    rewrite_single(path, lambda t: t.update({"model.norm.weight": torch.randn(127)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*shape \[127\], expected \[128\]"):
        LLM(path, device="cpu")


def test_non_float_tensor(hf_checkpoints, tmp_path):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    rewrite_single(path, lambda t: t.update({"model.norm.weight": torch.ones(128, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*dtype I8"):
        LLM(path, device="cpu")


def test_config_checkpoint_mismatch(hf_checkpoints, tmp_path):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["num_hidden_layers"] = 2
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\..*config\.json match"):
        LLM(path, device="cpu")


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file(hf_checkpoints, tmp_path, cut):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        LLM(path, device="cpu")


def test_corrupt_header(hf_checkpoints, tmp_path):
    path = copy(hf_checkpoints["dense_gqa"][0], tmp_path / "c")
    f = os.path.join(path, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[8:20] = b"garbage!!!!!"
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        LLM(path, device="cpu")


def test_sharded_missing_shard_and_bad_index(hf_checkpoints, tmp_path):
    src = hf_checkpoints["dense_tied_mha_sharded"][0]
    path = copy(src, tmp_path / "a")
    shard = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"lists shard {shard}, which does not exist"):
        LLM(path, device="cpu")

    path = copy(src, tmp_path / "b")
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    name, file = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != file)
    index["weight_map"][name] = other
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match=f"places '{name}' in .*{other}"):
        LLM(path, device="cpu")


def test_index_beside_a_single_file_is_read_and_the_file_named(hf_checkpoints, tmp_path, caplog):
    """A sharded folder with a stray model.safetensors (an older download): the index's shards are read, as vLLM
    does, and a warning names the file left unread (transformers would read that one instead)."""
    path = copy(hf_checkpoints["dense_tied_mha_sharded"][0], tmp_path / "c")
    first = load_weights(path, load_config(path), "cpu", torch.float32)
    stray = {n: torch.full_like(t, 7.0) for n, t in load_file(os.path.join(
        path, sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0])).items()}
    save_file(stray, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    w = load_weights(path, load_config(path), "cpu", torch.float32)
    assert torch.equal(w.embed, first.embed) and torch.equal(w.final_norm, first.final_norm)
    assert "ignoring model.safetensors" in caplog.text


def test_no_weights(hf_checkpoints, tmp_path):
    os.makedirs(tmp_path / "c")
    shutil.copy(os.path.join(hf_checkpoints["dense_gqa"][0], "config.json"), tmp_path / "c")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        LLM(str(tmp_path / "c"), device="cpu")


def test_tied_checkpoint_that_still_ships_lm_head(hf_checkpoints, tmp_path, caplog):
    """Some exports of tied models keep lm_head.weight: equal to the embeddings, the model stays tied (one tensor);
    different, it is loaded untied, as transformers 5 does (with a warning), never dropped silently."""
    import transformers

    src, _ = hf_checkpoints["dense_gqa"]
    path = copy(src, tmp_path / "c")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["tie_word_embeddings"] = True
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    # a distinct lm_head: load_weights with the tied config refuses; LLM unties, and matches transformers
    with pytest.raises(CheckpointError, match="lm_head.weight differs from them"):
        load_weights(path, load_config(path), "cpu", torch.float32)
    llm = LLM(path, device="cpu", dtype="float32")
    assert not llm.config.tie_word_embeddings and llm.model.weights.lm_head is not llm.model.weights.embed
    assert "differs from them: loading it as an untied lm_head" in caplog.text
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert ((llm.logits(ids) - expected).abs().max() / expected.abs().max()).item() < 1e-4
    # the same values as the embeddings: tied, one tensor
    rewrite_single(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    w = load_weights(path, load_config(path), "cpu", torch.float32)
    assert w.lm_head is w.embed
    assert LLM(path, device="cpu", dtype="float32").config.tie_word_embeddings
