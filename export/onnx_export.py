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
    add_logits_to_keep(model)
    return model


# The optional graph input that limits the output head to the last positions (transformers' name).
LOGITS_TO_KEEP = "logits_to_keep"


def add_logits_to_keep(model_path: Path) -> bool:
    """Give the graph an optional int64 input `logits_to_keep`: the head runs on the last k positions
    only, all of them when k is 0 (its default, so optimum and the parity check, which feed no such
    input, get every position as before). Returns False, changing nothing, when the logits are not
    the output of one MatMul (e.g. a soft-capped head).

    Why: the edge runtime needs only the last position's logits; at a 262k-word vocabulary (Gemma)
    the head over a 512-token prompt is most of the prefill's work (onnxruntime-genai's builder
    makes the same cut; optimum's graphs do not).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(model_path), load_external_data=False)  # weights stay where they are
    graph = proto.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return True
    outputs = {o.name for o in graph.output if o.name == "logits"}
    heads = [n for n in graph.node if n.op_type == "MatMul" and set(n.output) & outputs]
    if len(heads) != 1:
        return False
    head = heads[0]
    hidden = head.input[0]
    names = {k: f"/cotune/logits_to_keep/{k}" for k in ("neg", "starts", "shape", "ends", "axes", "kept")}
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0, dtype=np.int64), LOGITS_TO_KEEP),  # the default: every position
        numpy_helper.from_array(np.array([1], dtype=np.int64), names["shape"]),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), names["ends"]),
        numpy_helper.from_array(np.array([1], dtype=np.int64), names["axes"]),
    ])
    at = list(graph.node).index(head)
    cut = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [names["neg"]], name=names["neg"]),
        helper.make_node("Reshape", [names["neg"], names["shape"]], [names["starts"]], name=names["starts"]),
        # Positions [-k, end) of (batch, sequence, hidden); -0 is 0, the whole sequence.
        helper.make_node("Slice", [hidden, names["starts"], names["ends"], names["axes"]], [names["kept"]],
                         name=names["kept"]),
    ]
    for offset, node in enumerate(cut):
        graph.node.insert(at + offset, node)
    head.input[0] = names["kept"]
    onnx.save(proto, str(model_path))
    return True


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
