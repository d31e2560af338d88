"""HF causal LM (llama, qwen2, gemma3) -> a float GGUF (f32 or f16) that llama.cpp loads.

Tensor names come from gguf's TensorNameMap; what differs per architecture (hyperparameter
keys, the rotary layout of llama's q/k rows, Gemma's 1 + w norm weights) is in ArchSpec.
Quantized GGUFs are made from these files by llama.cpp's own quantizer (export.quantize).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import UnsupportedModelError
from export.gguf_tokenizer import GGUFVocab, add_vocab

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    # llama.cpp's "llama" rotates interleaved pairs, HF rotates halves: q/k rows are reordered.
    permute_qk: bool
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by the stored weight.
    norm_shift: float
    activation: str


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True, norm_shift=0.0, activation="silu"),
    "qwen2": ArchSpec("qwen2", permute_qk=False, norm_shift=0.0, activation="silu"),
    "gemma3_text": ArchSpec("gemma3", permute_qk=False, norm_shift=1.0, activation="gelu_pytorch_tanh"),
}


def arch_spec(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", "")
    if model_type not in ARCH_SPECS:
        raise UnsupportedModelError(f"architecture {model_type!r} has no GGUF converter; supported: "
                                    f"{', '.join(ARCH_SPECS)}")
    return ARCH_SPECS[model_type]


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's [first halves | second halves] to interleaved pairs."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(rows, *rest)


def gguf_name_map(config: Any) -> Any:
    import gguf

    spec = arch_spec(config)
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == spec.gguf_arch)
    return gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))


def gguf_tensor_name(name_map: Any, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UnsupportedModelError(f"tensor {hf_name} has no GGUF name for this architecture; the checkpoint "
                                    "has layers the converter does not know")
    return found


def convert_tensor(config: Any, hf_name: str, value: np.ndarray) -> np.ndarray:
    """One HF tensor as llama.cpp expects it (float32): q/k rows reordered for llama, Gemma norms + 1."""
    spec = arch_spec(config)
    if spec.permute_qk and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
        value = rope_rows(value, int(heads))
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        value = value + spec.norm_shift
    return value


def _rope_scaling(config: Any) -> tuple[str, float] | None:
    scaling = getattr(config, "rope_scaling", None)
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported by the GGUF converter (linear only)")
    return "linear", float(scaling["factor"])


def _swa_pattern(layer_types: list[str]) -> int:
    """llama.cpp's gemma3 marks layer il sliding when il % n < n - 1: find that n, if the layers follow one."""
    sliding = [t == "sliding_attention" for t in layer_types]
    for n in range(1, len(sliding) + 2):
        if all(s == (il % n < n - 1) for il, s in enumerate(sliding)):
            return n
    raise UnsupportedModelError(f"layer_types {layer_types} follow no sliding-window pattern llama.cpp knows")


def check_config(config: Any) -> None:
    """Refuse settings the llama.cpp graph for this architecture would silently compute differently."""
    spec = arch_spec(config)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if act != spec.activation:
        raise UnsupportedModelError(f"activation {act!r}: llama.cpp's {spec.gguf_arch} uses {spec.activation}")
    _rope_scaling(config)
    if spec.gguf_arch == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError("qwen2 with use_sliding_window=True: llama.cpp's qwen2 attends to all tokens")
    if spec.gguf_arch == "gemma3":
        if getattr(config, "attn_logit_softcapping", None):
            raise UnsupportedModelError("gemma3 with attention logit soft-capping: llama.cpp does not apply it")
        if int(getattr(config, "query_pre_attn_scalar", head_dim(config))) != head_dim(config):
            raise UnsupportedModelError("gemma3 with query_pre_attn_scalar != head_dim has no llama.cpp form")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("gemma3 with bidirectional attention is an encoder, not a causal LM")
        if getattr(config, "sliding_window", None) and getattr(config, "layer_types", None):
            _swa_pattern(list(config.layer_types))


def add_hparams(writer: Any, config: Any, file_type: int) -> None:
    spec = arch_spec(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_file_type(file_type)
    scaling = _rope_scaling(config)
    if scaling:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling[1])
    if spec.gguf_arch == "gemma3":
        window = getattr(config, "sliding_window", None)
        if window:
            writer.add_sliding_window(int(window))
            types = getattr(config, "layer_types", None)
            writer.add_sliding_window_pattern(_swa_pattern(list(types)) if types else 6)
            writer.add_rope_freq_base_swa(float(getattr(config, "rope_local_base_freq", 10000.0)))
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            writer.add_final_logit_softcapping(float(cap))


def write_gguf(
    model: PreTrainedModel,
    vocab: GGUFVocab,
    path: str | os.PathLike[str],
    *,
    dtype: str = "f16",
    name: str = "cotune",
    tied_embeddings: bool | None = None,
) -> Path:
    """Write `model` (float32 torch, merged) as a GGUF with 2-D weights in `dtype` (f32 or f16)."""
    import gguf
    import numpy as np
    import torch

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be f32 or f16, got {dtype!r}; quantize with export.quantize")
    config = model.config
    spec = arch_spec(config)
    check_config(config)
    name_map = gguf_name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False)) if tied_embeddings is None else tied_embeddings
    out = Path(path)
    writer = gguf.GGUFWriter(str(out), spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    add_hparams(writer, config, int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, vocab)
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reuses token_embd when output.weight is absent
            value = convert_tensor(config, hf_name, tensor.detach().float().cpu().numpy())
            if dtype == "f16" and value.ndim == 2:
                value = value.astype(np.float16)
            else:
                value = np.ascontiguousarray(value, dtype=np.float32)
            writer.add_tensor(gguf_tensor_name(name_map, hf_name), np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
