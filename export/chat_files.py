"""The chat format travels with every build: the files that tell other runtimes how to prompt it.

- GGUF builds: an Ollama `Modelfile` beside the GGUF (FROM the model, ADAPTER for a LoRA build,
  TEMPLATE and PARAMETER stop); the template itself is in the GGUF's `tokenizer.chat_template`
  (export.gguf_tokenizer).
- ONNX builds: `chat_template.jinja`, and `tokenizer_config.json` with the same `chat_template`
  (what transformers and onnxruntime-genai read).

The template is the one training used (common.chat.chat_template_for): the model's own or the
declared default. Ollama's TEMPLATE is Go-template syntax: cotune writes it for the templates it
declares (their Go form is part of their data); for a model's own Jinja template it writes none, and
Ollama falls back on the template it recognises from the GGUF's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.chat import ChatTemplate

MODELFILE = "Modelfile"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _quoted(value: str) -> str | None:
    """A Modelfile argument: bare, "..." or \"\"\"...\"\"\" as Ollama's parser reads it; None if it cannot be."""
    if '"""' in value or value.endswith('"'):
        return None
    if value and not any(c in value for c in ' \t\n\r"') and value.strip() == value:
        return value
    return f'"""{value}"""'


def modelfile_text(template: ChatTemplate, model_file: str, adapter_file: str | None = None,
                   end_texts: tuple[str, ...] = ()) -> str:
    """The Modelfile for a GGUF build: paths relative to the build directory.

    `end_texts` are the end-of-turn tokens' texts (besides EOS), added as stops for runtimes that
    do not treat them as the end of generation.
    """
    lines = ["# Ollama: ollama create <name> -f Modelfile (run in this directory)",
             f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    go = template.ollama_template()
    quoted = _quoted(go) if go is not None else None
    if quoted is not None:
        lines.append(f"# the {template.name} chat format cotune trained this model with")
        lines.append(f"TEMPLATE {quoted}")
    else:
        lines.append("# no TEMPLATE: the model's own chat template is in the GGUF (tokenizer.chat_template), "
                     "which Ollama reads")
    for stop in dict.fromkeys((*template.stop, *end_texts)):
        value = _quoted(stop)
        if value is not None:
            lines.append(f"PARAMETER stop {value}")
    return "\n".join(lines) + "\n"


def write_modelfile(build: Path, template: ChatTemplate, model_file: str, adapter_file: str | None = None,
                    end_texts: tuple[str, ...] = ()) -> Path:
    path = Path(build) / MODELFILE
    path.write_text(modelfile_text(template, model_file, adapter_file, end_texts), encoding="utf-8")
    return path


def write_template_files(build: Path, template: ChatTemplate) -> None:
    """chat_template.jinja, and the template in tokenizer_config.json (created if the build has none)."""
    build = Path(build)
    (build / CHAT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
    config_path = build / TOKENIZER_CONFIG
    config: dict[str, Any] = {}
    if config_path.is_file():
        loaded = json.loads(config_path.read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    if config.get("chat_template") != template.source:
        config["chat_template"] = template.source
        if template.bos_token and "bos_token" not in config:
            config["bos_token"] = template.bos_token
        if template.eos_token and "eos_token" not in config:
            config["eos_token"] = template.eos_token
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
