"""Tokenizers of a serving checkpoint: raw bytes, or a Hugging Face ``tokenizer.json``.

Both turn text into token ids and ids back into text. Decoding is done over
the whole generated sequence (never per token), so multi-byte characters and
BPE merges come out right; :class:`TextStream` turns that into stream deltas
that always concatenate to the final text.
"""

from __future__ import annotations

import json
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable."""


class ByteTokenizer:
    """Token id = byte value (the byte-level models ``python -m train`` builds by default)."""

    kind = "bytes"
    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()

    chat_template = None     # a ChatTemplate (serve.chat) when one is given
    special_tokens: dict[str, str] = {}     # none: a chat template's bos_token etc. are empty

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        del special_tokens   # bytes have none
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json.

    Text prompts get the tokenizer's special tokens (its post-processor: the BOS of Llama,
    Mixtral, DeepSeek), as ``python -m train`` encoded each document and as transformers'
    ``tokenizer(text)`` and vLLM's completions do; token-id prompts are taken as they are.

    ``eos_token_id``: an id or a list of ids, as transformers writes it (chat models end a
    turn with one of several: Llama 3 <|eot_id|> beside <|end_of_text|>); any of them ends
    a request. ``special_tokens``: the special-token strings (``bos_token``, ...; see
    :func:`special_tokens_in`) a chat template renders, also one given later (--chat-template).
    """

    kind = "hf"

    def __init__(self, path: str | Path, eos_token_id: int | list[int] | None = None, chat_template=None,
                 special_tokens: dict[str, str] | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("a tokenizer.json needs the 'tokenizers' package") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises plain Exception
            raise TokenizerError(f"{path}: not a tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_ids = eos_ids(eos_token_id)
        self.chat_template = chat_template     # a serve.chat.ChatTemplate, or None
        self.special_tokens = dict(special_tokens or {})

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special_tokens).ids)

    def decode(self, tokens: list[int]) -> str:
        return self._tok.decode(list(tokens), skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        """The id of one token's text (a special token's), None if it is not in the vocabulary."""
        return self._tok.token_to_id(text)


def eos_ids(value) -> tuple[int, ...]:
    """An ``eos_token_id`` as transformers writes it (an id, a list of ids, or null) as a tuple."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TokenizerError(f"eos_token_id: must be a token id, a list of them or null, got {value!r}")
    return tuple(ids)


def special_token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                  "mask_token")


def read_json_object(path: Path) -> dict:
    """A JSON file's object; {} when the file is missing, unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def special_tokens_of(*configs: dict) -> dict[str, str]:
    """The special-token strings (``bos_token``, ...) the first of ``configs`` to write each has."""
    found = {}
    for config in configs:
        for name in SPECIAL_TOKENS:
            text = special_token_text(config.get(name))
            if text is not None:
                found.setdefault(name, text)
    return found


def special_tokens_in(directory: Path) -> dict[str, str]:
    """The special-token strings beside a tokenizer.json, as transformers loads them:
    tokenizer_config.json's, then the legacy special_tokens_map.json's for names it lacks."""
    return special_tokens_of(read_json_object(directory / "tokenizer_config.json"),
                             read_json_object(directory / "special_tokens_map.json"))


def eos_from_files(directory: Path, tokenizer: HFTokenizer | None = None) -> int | list[int] | None:
    """eos_token_id (an id or, kept whole, a list of them) from generation_config.json /
    config-style files beside a tokenizer; where none writes one, the ``eos_token`` text
    (:func:`special_tokens_in`) looked up in ``tokenizer``'s vocabulary (a chat model's end of turn)."""
    for name in ("generation_config.json", "tokenizer_config.json"):
        value = read_json_object(directory / name).get("eos_token_id")
        try:
            if value is not None and eos_ids(value):
                return value
        except TokenizerError:
            continue
    text = special_tokens_in(directory).get("eos_token")
    return None if text is None or tokenizer is None else tokenizer.token_id(text)


def load_tokenizer(spec: dict, directory: Path):
    """The tokenizer a manifest's ``tokenizer`` entry describes (files relative to ``directory``)."""
    if spec.get("kind") == "bytes":
        return ByteTokenizer()
    if spec.get("kind") == "hf":
        path = directory / spec["file"]
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file named by the manifest is missing")
        special = spec.get("special_tokens", {})
        if not (isinstance(special, dict) and all(isinstance(v, str) for v in special.values())):
            raise TokenizerError("manifest tokenizer.special_tokens: must be {name: str}")
        chat = spec.get("chat_template")
        if chat is not None:
            if not isinstance(chat, str):
                raise TokenizerError("manifest tokenizer.chat_template: must be the template's Jinja source")
            from serve.chat import ChatTemplate
            chat = ChatTemplate(chat, special)
        return HFTokenizer(path, spec.get("eos_token_id"), chat, special)
    raise TokenizerError(f"unknown tokenizer kind {spec.get('kind')!r} (bytes | hf)")


class TextStream:
    """Incremental text of a growing token sequence, safe to stream.

    ``push(tokens)`` returns the new text since the last call; it holds back a
    trailing incomplete character (shown as U+FFFD by the decoder) and, when
    stop strings are set, the ``max(len(stop)) - 1`` characters before it, which
    might still become the start of a stop string. ``finish(text)`` returns
    the rest of the final text. So the deltas always join to the final text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def push(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens)
        # the incomplete character first, then the hold: a stop string may end in the
        # character still being decoded ("a" of stop "a€" before the last byte of "€")
        end = len(text.rstrip("\ufffd")) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[self.sent:]
        self.sent = len(final_text)
        return delta
