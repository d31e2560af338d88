"""An HF checkpoint directory -> ONNX with past key values (optimum), fp32, one model.onnx; and the
genai_config.json that lets onnxruntime-genai run such a build."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from export.errors import ExportError


def export_onnx(checkpoint_dir: Path, out_dir: Path) -> Path:
    """optimum's text-generation-with-past export; returns the model.onnx path.

    No validation run here: export.parity measures the build against the torch model itself.
    """
    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = ("optimum", "transformers", "torch.onnx")
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(str(checkpoint_dir), output=str(out_dir), task="text-generation-with-past",
                        do_validation=False, local_files_only=True, device="cpu")
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ExportError(f"optimum could not export {checkpoint_dir.name} to ONNX: {exc}") from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    model = out_dir / "model.onnx"
    if not model.is_file():
        found = sorted(p.name for p in out_dir.iterdir())
        raise ExportError(f"optimum wrote no model.onnx into {out_dir} (found {found})")
    return model


GENAI_CONFIG = "genai_config.json"
# HF model_type -> onnxruntime-genai's model "type" (src/models/model_type.h), for the architectures exported here.
GENAI_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3_text"}
# The names optimum's text-generation-with-past graphs use, in genai_config's decoder schema.
GENAI_INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
GENAI_OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


def genai_config(config: Any, graph_inputs: set[str], end_ids: list[int], pad_id: int | None,
                 bos_id: int | None, model_file: str = "model.onnx") -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for one of our graphs (its documented schema).

    The KV cache grows each step in these graphs, so past and present buffers are not shared
    (`past_present_share_buffer` false); search defaults to greedy.
    """
    model_type = getattr(config, "model_type", "")
    if model_type not in GENAI_MODEL_TYPES:
        raise ExportError(f"architecture {model_type!r} has no onnxruntime-genai model type here; "
                          f"known: {', '.join(GENAI_MODEL_TYPES)}")
    heads = int(config.num_attention_heads)
    head_size = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    inputs = {k: v for k, v in GENAI_INPUTS.items() if "%d" in v or v in graph_inputs}
    model: dict[str, Any] = {
        "bos_token_id": bos_id if bos_id is not None else end_ids[0],
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": model_file,
            "head_size": head_size,
            "hidden_size": int(config.hidden_size),
            "inputs": inputs,
            "outputs": dict(GENAI_OUTPUTS),
            "num_attention_heads": heads,
            "num_hidden_layers": int(config.num_hidden_layers),
            "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        },
        "eos_token_id": end_ids[0] if len(end_ids) == 1 else list(end_ids),
        "pad_token_id": pad_id if pad_id is not None else end_ids[0],
        "type": GENAI_MODEL_TYPES[model_type],
        "vocab_size": int(config.vocab_size),
    }
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"model": model, "search": search}


def write_genai_config(build: Path, config: Any, tokenizer: Any, model_file: str = "model.onnx") -> Path:
    """genai_config.json beside `build/model_file`, from the model config, the graph and the tokenizer."""
    import onnx

    from common.ml.batching import _special_ids, end_token_ids

    graph = onnx.load(str(build / model_file), load_external_data=False).graph
    bos, _, pad = _special_ids(tokenizer)
    data = genai_config(config, {i.name for i in graph.input}, end_token_ids(tokenizer), pad, bos, model_file)
    path = build / GENAI_CONFIG
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
