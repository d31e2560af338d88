"""Chat messages -> one prompt string, through the template the model was tuned with.

Where the template comes from, first found wins:
1. the GGUF's `tokenizer.chat_template` metadata (llama.cpp builds);
2. `chat_template.jinja` in the build directory;
3. the `chat_template` of `tokenizer_config.json` in the build directory;
4. otherwise DEFAULT_CHAT_TEMPLATE, common.chat's default for models without one.

Builds exported by cotune carry the template their model was trained with (its own, or the
default), so 4 only serves builds made elsewhere. Rendering is common.chat's, the same function
training and evaluation use: a single user message under the default template renders exactly as
the training prompt (`"hi"` -> `"hi\\n"`), and a template's stop text (the default's newline) ends
chat answers as it ends evaluated ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.chat import DEFAULT_TEMPLATE, ChatTemplateError, template_from_source

if TYPE_CHECKING:
    from edge_sdk.runtime import EdgeModel

DEFAULT_CHAT_TEMPLATE = DEFAULT_TEMPLATE.source

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatFormatter", "ChatTemplateError", "find_chat_template"]


class ChatFormatter:
    """Renders OpenAI-style messages ([{"role", "content"}]) into the prompt the model was tuned on."""

    def __init__(self, template: str | None = None, source: str = "default",
                 bos_token: str = "", eos_token: str = "") -> None:
        self.chat = template_from_source(template, bos_token, eos_token)
        self.template = self.chat.source
        self.source = source if template else "default"

    @classmethod
    def for_model(cls, model: EdgeModel) -> ChatFormatter:
        template, source = find_chat_template(model)
        bos, eos = special_token_texts(model)
        return cls(template, source, bos or "", eos or "")

    @property
    def stop(self) -> tuple[str, ...]:
        """Text that ends an answer under this template, besides the end-of-turn tokens."""
        return self.chat.stop

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.chat.prompt(messages)


def _backend(model: EdgeModel) -> Any:
    return getattr(model, "_backend", None) if model.backend_name == "llama.cpp" else None


def find_chat_template(model: EdgeModel) -> tuple[str | None, str]:
    """(template, where it came from); (None, "default") when the build has none."""
    backend = _backend(model)
    if backend is not None and hasattr(backend, "chat_template"):
        found = backend.chat_template()
        if found:
            return found, "gguf"
    root = model.build_dir
    if root is not None:
        jinja = Path(root) / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), "chat_template.jinja"
        found = _tokenizer_config(Path(root)).get("chat_template")
        if isinstance(found, str) and found:
            return found, "tokenizer_config.json"
    return None, "default"


def special_token_texts(model: EdgeModel) -> tuple[str | None, str | None]:
    """(BOS text, EOS text) as the build's tokenizer writes them, for templates that use them."""
    backend = _backend(model)
    if backend is not None and hasattr(backend, "special_token_texts"):
        found = backend.special_token_texts()
        return found.get("bos"), found.get("eos")
    if model.build_dir is None:
        return None, None
    config = _tokenizer_config(Path(model.build_dir))

    def text(key: str) -> str | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    return text("bos_token"), text("eos_token")


def _tokenizer_config(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

