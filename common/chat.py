"""Conversations -> model text: the one renderer that training, evaluation, serving and export share,
so a model is always prompted in the format it was tuned on.

A model's template is its tokenizer's own `chat_template` (Jinja, as transformers keeps it) when
it has one. A base model without one gets PLAIN, declared below as data: every system or user
turn is its text and a newline, an assistant turn is its text and the end-of-sequence token. One
user message thus renders as `prompt + "\\n"`, the prompt cotune has always tuned base models on,
so records written as prompt/response train exactly as they did before templates existed.

Rules every consumer relies on:
- Rendered text never starts with the BOS token's text: every tokenizer that reads it (training's,
  llama.cpp's, ONNX's tokenizer.json) puts BOS in front by itself, so a template's leading
  `{{ bos_token }}` is dropped rather than doubled.
- Special tokens in rendered text (EOS, turn markers) are meant as tokens: tokenize it with
  special-token parsing on, so each marker is one token.
- A record's loss is on the text the conversation gains when its final assistant turn is rendered
  after the prompt (`ChatTemplate.split`): the reply and the template's end-of-turn marker.

Templates are rendered in jinja2's immutable sandbox, as transformers does: a template travels
with a model or a build and is data, not trusted code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.records import ChatMessage


class ChatTemplateError(ValueError):
    """A chat template failed to render a conversation (it may refuse a role order)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and what renders it: the special tokens' text, stop strings, and
    (for templates cotune declares) the same format as an Ollama Go template."""

    source: str
    name: str = "model"  # a declared template's name, or "model" for a model's own
    bos_token: str = ""
    eos_token: str = ""
    # Text that ends an answer besides the end-of-turn tokens (PLAIN's answers end at a newline:
    # the next line would be the next turn).
    stop: tuple[str, ...] = ()
    ollama: str | None = None  # Go template for an Ollama Modelfile; "[EOS]" stands for eos_token

    @property
    def declared(self) -> bool:
        return self.name != "model"

    def render(self, messages: Sequence[ChatMessage | Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as model text, without the leading BOS (see the module's rules)."""
        from jinja2 import TemplateError

        turns = [_as_dict(m) for m in messages]
        try:
            text = str(_compiled(self.source).render(messages=turns, add_generation_prompt=add_generation_prompt,
                                                     bos_token=self.bos_token, eos_token=self.eos_token))
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from None
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text

    def prompt(self, messages: Sequence[ChatMessage | Mapping[str, str]]) -> str:
        """What the model sees before it answers: the conversation and the generation prompt."""
        return self.render(messages, add_generation_prompt=True)

    def split(self, messages: Sequence[ChatMessage | Mapping[str, str]]) -> tuple[str, str]:
        """(prompt text, reply text) of a conversation that ends with the assistant's reply.

        The reply text is what rendering the last turn adds after the prompt: the trained part.
        """
        turns = [_as_dict(m) for m in messages]
        if not turns or turns[-1]["role"] != "assistant":
            raise ChatTemplateError("the conversation must end with the assistant's reply to split it")
        prompt = self.prompt(turns[:-1])
        full = self.render(turns)
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"the {self.name} chat template renders the prompt differently once the reply follows it, so "
                "the reply's tokens cannot be told apart; use a template whose generation prompt is a prefix of "
                "the rendered reply (as transformers' templates are)")
        return prompt, full[len(prompt):]

    def with_tokens(self, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        return replace(self, bos_token=bos_token or "", eos_token=eos_token or "")

    def ollama_template(self) -> str | None:
        """This format as an Ollama TEMPLATE (Go template syntax), when cotune declares one."""
        return None if self.ollama is None else self.ollama.replace("[EOS]", self.eos_token)


def _as_dict(message: ChatMessage | Mapping[str, str]) -> dict[str, str]:
    if isinstance(message, Mapping):
        return {"role": str(message["role"]), "content": str(message["content"])}
    return message.to_dict()


# -- declared templates (data) -------------------------------------------------------------------

PLAIN = ChatTemplate(
    name="cotune-plain",
    source=(
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
        "{%- else -%}{{ message['content'] + '\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    stop=("\n",),
    # The same format for Ollama: its .Messages carry .Role and .Content; the newline is literal.
    ollama=(
        '{{- range .Messages }}{{ if eq .Role "assistant" }}{{ .Content }}[EOS]'
        "{{ else }}{{ .Content }}\n{{ end }}{{ end }}"
    ),
)
DECLARED: dict[str, ChatTemplate] = {PLAIN.name: PLAIN}
DEFAULT_TEMPLATE = PLAIN  # for models whose tokenizer has no chat template


def template_from_source(source: str | None, bos_token: str | None = None,
                         eos_token: str | None = None) -> ChatTemplate:
    """The template for a Jinja source found with a model or build (None: the default).

    A source that is a declared template's, byte for byte, is that template (with its stops and
    Ollama form): a build exported from a base model carries PLAIN's source.
    """
    if not source:
        return DEFAULT_TEMPLATE.with_tokens(bos_token, eos_token)
    for template in DECLARED.values():
        if template.source == source:
            return template.with_tokens(bos_token, eos_token)
    return ChatTemplate(source=source).with_tokens(bos_token, eos_token)


def _token_text(tokenizer: Any, name: str) -> str | None:
    value = getattr(tokenizer, f"{name}_token", None)  # transformers tokenizers
    if isinstance(value, str):
        return value
    if hasattr(tokenizer, "token_to_id") and hasattr(tokenizer, "id_to_token"):  # raw tokenizers.Tokenizer
        return f"<{name}>" if tokenizer.token_to_id(f"<{name}>") is not None else None
    return None


def chat_template_for(tokenizer: Any) -> ChatTemplate:
    """The template of the model this tokenizer belongs to: its own `chat_template`, else the default."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one
        source = source.get("default")
    return template_from_source(source if isinstance(source, str) else None,
                                _token_text(tokenizer, "bos"), _token_text(tokenizer, "eos"))


def format_prompt(prompt: str, template: ChatTemplate | None = None) -> str:
    """One user message as the model sees it before answering (with the default template: `prompt + "\\n"`)."""
    return (template or DEFAULT_TEMPLATE).prompt([{"role": "user", "content": prompt}])


# -- Jinja ---------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _compiled(source: str) -> Any:
    """The template compiled in the sandbox, with the functions transformers' templates call."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # transformers' {% generation %} marks assistant text for its own masks; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except Exception as exc:  # noqa: BLE001 - jinja raises TemplateSyntaxError and friends
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from None
