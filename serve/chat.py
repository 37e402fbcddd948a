"""Chat prompts for ``/v1/chat/completions``: the model's chat template renders the messages.

A chat template is the Jinja program a Hugging Face tokenizer ships (``chat_template`` in
tokenizer_config.json, or chat_template.jinja beside tokenizer.json). ``serve export``
carries it into the manifest; ``python -m serve http --chat-template FILE`` gives one to a
model without (the byte-level models ``python -m train`` makes).

Rendering follows transformers' ``apply_chat_template``: a sandboxed Jinja environment
(trim_blocks, lstrip_blocks, loop controls, the ``{% generation %}`` block) with the
``tojson`` filter and the ``raise_exception`` and ``strftime_now`` functions, given
``messages``, ``tools=None``, ``documents=None``, ``add_generation_prompt=True`` and the
tokenizer's special-token strings (``bos_token``, ``eos_token``, ...). The rendered text
already holds its special tokens, so it is encoded without adding them again.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from serve.sampling import RequestError, checked_text
from serve.tokenizer import TokenizerError, read_json_object, special_tokens_in, special_tokens_of

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_EXTRAS = ("name", "tool_call_id")     # passed to the template as the client sent them


class ChatTemplateError(TokenizerError):
    """A chat template that does not compile, or a file that holds none."""


def _generation_tag():
    """The ``{% generation %}...{% endgeneration %}`` block transformers' templates may mark the
    assistant's text with (for its assistant-token masks): here it renders its body, as
    transformers renders it when no mask is asked for."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


@cache
def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's Jinja source and the special-token strings it may use."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        import jinja2
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ChatTemplateError(f"chat template: not valid Jinja (line {err.lineno}: {err.message})") from None
        object.__setattr__(self, "_compiled", compiled)

    def render(self, messages: list[dict]) -> str:
        """The prompt text of ``messages`` (checked by :func:`parse_messages`), ending where the
        assistant's reply begins. A template that refuses them (``raise_exception``, e.g. roles
        that do not alternate) raises RequestError."""
        import jinja2
        try:
            # tools and documents are None, not undefined, as transformers passes them: a
            # template's `tools is not none` must be false when the request has none
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as err:
            raise RequestError(f"messages: the model's chat template refuses them ({err})") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as err:
            # a template that fails on these messages' data ('+' of text and a number, a
            # missing key): the client's to see, not an opaque internal error
            raise RequestError(f"messages: the model's chat template fails on them "
                               f"({type(err).__name__}: {err})") from None

    @classmethod
    def from_tokenizer_dir(cls, directory: Path) -> ChatTemplate | None:
        """The template shipped beside a tokenizer.json (chat_template.jinja, else
        tokenizer_config.json's), with its special tokens (serve.tokenizer.special_tokens_in);
        None without one."""
        jinja_file = directory / "chat_template.jinja"
        source = (jinja_file.read_text() if jinja_file.is_file()
                  else _config_template(read_json_object(directory / "tokenizer_config.json")))
        if source is None or not source.strip():
            return None
        return cls(source, special_tokens_in(directory))

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        """``--chat-template``: a Jinja file (no special tokens of its own: the server gives it
        the tokenizer's), or a tokenizer_config.json holding a ``chat_template`` (with its own)."""
        path = Path(path)
        if not path.is_file():
            raise ChatTemplateError(f"--chat-template {path}: no such file")
        if path.suffix != ".json":
            return cls(path.read_text())
        config = read_json_object(path)
        source = _config_template(config)
        if source is None:
            raise ChatTemplateError(f"--chat-template {path}: holds no chat_template")
        return cls(source, special_tokens_of(config))


def _config_template(config: dict) -> str | None:
    """A tokenizer_config.json's ``chat_template``: a string, or a list of named templates of
    which 'default' is the chat one; None when it has none."""
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source
                       if isinstance(t, dict) and t.get("name") == "default"), None)
    return source if isinstance(source, str) and source.strip() else None


def parse_messages(value) -> list[dict]:
    """A request's ``messages`` checked: a non-empty list of {role, content}; content is text
    or a list of text parts (joined). Errors name the message and the field."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages: must be a non-empty list of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role: must be one of {', '.join(ROLES)}; got {json.dumps(role)[:40]}")
        extras = {k: message[k] for k in MESSAGE_EXTRAS if isinstance(message.get(k), str)}
        messages.append({"role": role, "content": _content(message.get("content"), f"{where}.content"),
                         **extras})
    return messages


def _content(value, where: str) -> str:
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise RequestError(f"{where}: must be a string or a list of text parts ({{type: 'text', text}}); "
                           "this server takes text only")
    return checked_text(value, where)
