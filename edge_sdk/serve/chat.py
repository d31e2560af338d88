"""Chat messages -> one prompt string, through the model's own chat template when it has one.

Where the template comes from, first found wins:
1. the GGUF's `tokenizer.chat_template` metadata (llama.cpp builds);
2. `chat_template.jinja` in the build directory;
3. the `chat_template` of `tokenizer_config.json` in the build directory;
4. otherwise DEFAULT_CHAT_TEMPLATE, declared below.

The default matches how cotune tunes a base SLM: each record is trained as `prompt + "\\n"`
followed by the response. So every message is its content on its own line, and a single user
message renders exactly as the training prompt (`"hi"` -> `"hi\\n"`). Templates are Jinja, rendered
in jinja2's immutable sandbox (as transformers does), since a build's template is data, not code.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_sdk.runtime import EdgeModel

DEFAULT_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


class ChatTemplateError(ValueError):
    """The chat template failed to render these messages (it may refuse a role order)."""


class ChatFormatter:
    """Renders OpenAI-style messages ([{"role", "content"}]) into the prompt the model was tuned on."""

    def __init__(self, template: str | None = None, source: str = "default",
                 bos_token: str = "", eos_token: str = "") -> None:
        self.template = template or DEFAULT_CHAT_TEMPLATE
        self.source = source if template else "default"
        # BOS is left empty: the runtime's tokenizer already puts it in front of every prompt.
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, model: EdgeModel) -> ChatFormatter:
        template, source = find_chat_template(model)
        return cls(template, source)

    @cached_property
    def _compiled(self) -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template)

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return str(self._compiled.render(messages=messages, add_generation_prompt=True,
                                             bos_token=self.bos_token, eos_token=self.eos_token))
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None


def find_chat_template(model: EdgeModel) -> tuple[str | None, str]:
    """(template, where it came from); (None, "default") when the build has none."""
    # The GGUF metadata is read through the loaded llama.cpp model (no second parse of the file).
    backend = getattr(model, "_backend", None)
    handle = getattr(backend, "_model", None)
    if model.backend_name == "llama.cpp" and handle:
        import llama_cpp

        found = llama_cpp.llama_model_chat_template(handle, None)
        if found:
            return found.decode("utf-8", "replace"), "gguf"
    root = model.build_dir
    if root is not None:
        jinja = Path(root) / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), "chat_template.jinja"
        config = Path(root) / "tokenizer_config.json"
        if config.is_file():
            try:
                found = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            except (ValueError, AttributeError):
                found = None
            if isinstance(found, str) and found:
                return found, "tokenizer_config.json"
    return None, "default"
