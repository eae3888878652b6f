"""Tokenizers: a checkpoint's `tokenizer.json` through the `tokenizers` library, or the built-in byte-level
tokenizer of the random-weight shapes; Jinja chat templates; incremental detokenization for streaming."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen2rt.models.config import read_json


class Tokenizer:
    """encode / decode / chat template. `eos_token_ids` are the ids that end generation by default."""

    eos_token_ids: frozenset[int] = frozenset()
    chat_template: str | None = None
    special_tokens_map: dict[str, str | None] = {}

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_bytes(self) -> list[bytes | None]:
        """Per token id, the bytes it stands for in a text (None for a special token), for structured outputs."""
        raise ValueError(f"structured outputs need a byte-level tokenizer; {type(self).__name__} is not one")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs) -> str:
        """Render messages with the checkpoint's Jinja chat template (as Hugging Face renders it).
        continue_final_message (Hugging Face's and vLLM's option): the text ends right after the final message's
        content, with no end-of-turn after it, so that the model continues that message (an assistant reply
        begun by the caller); not with add_generation_prompt."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: the first "
                             "continues the final message, the second opens a new assistant turn after it")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                             "chat_template.jinja)")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with a 'role' string and a 'content'")
        template = _compile_template(self.chat_template)
        context = {k: v for k, v in self.special_tokens_map.items()}
        context.update(kwargs)
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        return _cut_after_final_content(text, messages[-1]["content"]) if continue_final_message else text


def _cut_after_final_content(text: str, content) -> str:
    """The rendered chat up to the end of the final message's content (its last occurrence; stripped of surrounding
    whitespace if the template strips it, as some templates do)."""
    if not isinstance(content, str) or not content.strip():
        raise ValueError("continue_final_message needs a final message whose content is a non-empty string")
    for piece in (content, content.strip()):
        end = text.rfind(piece)
        if end >= 0:
            return text[:end + len(piece)]
    raise ValueError("continue_final_message: the chat template did not render the final message's content")


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    if source not in _TEMPLATE_CACHE:
        # Same environment settings Hugging Face uses for chat templates.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


class HFTokenizer(Tokenizer):
    """A checkpoint folder's tokenizer.json (+ tokenizer_config.json for the chat template and eos token)."""

    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer as _Tok

        path = os.path.join(model_dir, "tokenizer.json")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path}: cannot read tokenizer.json ({e})") from None
        # a tokenizer.json saved after a truncating or padding call keeps those settings: transformers (and so
        # vLLM) turn them off for a plain encode, and a prompt must never be cut or padded silently
        self._tok.no_truncation()
        self._tok.no_padding()
        cfg = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            cfg = read_json(cfg_path)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja_path):  # the file takes priority over tokenizer_config.json's, as in transformers
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        self.chat_template = template
        self.special_tokens_map = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token")}
        eos = self.special_tokens_map.get("eos_token")
        eos_id = self._tok.token_to_id(eos) if eos else None
        self.eos_token_ids = frozenset([eos_id] if eos_id is not None else [])
        self._token_bytes: list[bytes | None] | None = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes | None]:
        """A byte-level BPE vocabulary's (Qwen's) token bytes: each token's characters map back to bytes (GPT-2's
        byte-to-character table); an added token that is not special stands for its text as UTF-8."""
        if self._token_bytes is None:
            if type(self._tok.decoder).__name__ != "ByteLevel":
                raise ValueError("structured outputs need a byte-level BPE tokenizer (a ByteLevel decoder in "
                                 f"tokenizer.json), not {type(self._tok.decoder).__name__}")
            to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            out: list[bytes | None] = [None] * self.vocab_size
            added = self._tok.get_added_tokens_decoder()
            for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
                if i in added:
                    out[i] = None if added[i].special else added[i].content.encode("utf-8")
                elif all(c in to_byte for c in piece):
                    out[i] = bytes(to_byte[c] for c in piece)
            self._token_bytes = out
        return self._token_bytes


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as a printable character (printable Latin-1 bytes as themselves,
    the rest as characters from U+0100 on, in byte order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_text(tok):
    if isinstance(tok, dict):  # AddedToken serialisation
        return tok.get("content")
    return tok


class ByteTokenizer(Tokenizer):
    """The built-in shapes' tokenizer: ids 0-255 are bytes, then ChatML's special tokens. Ids above those (the
    built-in shapes have larger vocabularies) are reserved special tokens that decode to nothing when special
    tokens are skipped, as unused ids of a real Qwen vocabulary do."""

    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{%- endif %}")

    def __init__(self, vocab_size: int):
        if vocab_size < 256 + len(self.SPECIALS):
            raise ValueError(f"the byte tokenizer needs a vocabulary of at least {256 + len(self.SPECIALS)}")
        self.vocab_size = vocab_size
        self._special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")
        self.chat_template = self.CHATML
        self.special_tokens_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                                   "unk_token": None}
        self.eos_token_ids = frozenset([self._special_ids["<|endoftext|>"], self._special_ids["<|im_end|>"]])

    def token_bytes(self) -> list[bytes | None]:
        return [bytes((i,)) if i < 256 else None for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens=True):
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            if not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self.SPECIALS[i - 256] if i - 256 < len(self.SPECIALS) else f"<|reserved_{i}|>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    """The folder's tokenizer, or None if it ships no tokenizer.json (token-id prompts still work)."""
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return None
    return HFTokenizer(model_dir)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character, and whose
    concatenation is exactly `decode(all ids)`. Decodes a small window of ids each step (prefix/read offsets)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._piece(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = dec(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            piece = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return piece
        return ""
