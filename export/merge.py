"""Load the base model, attach the adapter (peft or cotune), read the LoRA pairs, merge, untie.

torch, transformers and peft are imported inside the functions: `import export` stays light.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoint import TOKENIZER_FILES
from export.errors import ExportError
from export.inputs import AdapterInfo, BaseInfo

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedModel

@dataclass
class LoraPair:
    """One adapted linear layer: HF module name, A (r x in), B (out x r), and peft's scaling (alpha / r)."""

    module: str
    a: np.ndarray
    b: np.ndarray
    scaling: float


@dataclass
class PreparedModels:
    merged: PreTrainedModel  # base with the adapter merged in (or the base itself): the parity reference
    tokenizer: Any
    base: PreTrainedModel | None = None  # the unmerged base, kept only when a gguf-lora build needs it
    lora: list[LoraPair] = field(default_factory=list)
    lora_problem: str | None = None  # why this adapter cannot be a GGUF LoRA adapter, if it cannot
    tied_embeddings: bool = False


def load_base_model(info: BaseInfo) -> PreTrainedModel:
    """float32, eval mode; every weight present (no silent random init) and finite."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(info.dir), local_files_only=True, use_safetensors=True, dtype=torch.float32,
            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{info.dir}: the model does not load ({exc}); truncated or corrupt weights?") from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in loading.get("missing_keys", []) if not (tied and k == "lm_head.weight")]
    if missing:
        raise ExportError(f"{info.dir}: the weights lack {len(missing)} tensor(s) the config needs, e.g. "
                          f"{missing[:3]}; the checkpoint is incomplete or belongs to another config")
    for name, param in model.state_dict().items():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise ExportError(f"{info.dir}: weight {name} holds NaN or infinite values; corrupt checkpoint?")
    return model.eval()


def load_tokenizer(info: BaseInfo) -> Any:
    from common.ml.tokenizer import load_hf_tokenizer

    try:
        return load_hf_tokenizer(info.dir)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{info.tokenizer_file}: the tokenizer does not load ({exc})") from None


def _attach(model: PreTrainedModel, adapter: AdapterInfo) -> Any:
    if adapter.kind == "peft":
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ExportError(f"{adapter.path}: the adapter does not fit this base model ({exc})") from None
    from common.ml.lora import adapter_from_bytes, attach_lora, load_adapter_state

    data = adapter.data if adapter.data is not None else Path(adapter.path or "").read_bytes()
    tensors, _ = adapter_from_bytes(data)
    assert adapter.spec is not None
    peft_model = attach_lora(model, adapter.spec, seed=0)
    try:
        load_adapter_state(peft_model, tensors)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return peft_model.eval()


def lora_pairs(peft_model: Any) -> tuple[list[LoraPair], str | None]:
    """The adapter's LoRA pairs as float32 arrays, or why they cannot stand alone as a GGUF LoRA."""
    from peft.tuners.lora import LoraLayer

    config = next(iter(peft_model.peft_config.values()))
    if getattr(config, "modules_to_save", None):
        return [], f"the adapter also trains whole modules {config.modules_to_save} (modules_to_save)"
    pairs: list[LoraPair] = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for key in module.active_adapters:
            if key in getattr(module, "lora_embedding_A", {}):
                return [], f"{name} is an embedding LoRA, which GGUF adapters do not carry"
            if key not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(key):
                return [], "DoRA adapters have no GGUF LoRA form"
            if getattr(module, "fan_in_fan_out", False):
                return [], f"{name} stores its weight transposed (fan_in_fan_out)"
            a = module.lora_A[key].weight.detach().float().cpu().numpy().copy()
            b = module.lora_B[key].weight.detach().float().cpu().numpy().copy()
            if a.ndim != 2 or b.ndim != 2:
                return [], f"{name} is not a linear LoRA layer"
            pairs.append(LoraPair(module=name.removeprefix("base_model.model."), a=a, b=b,
                                  scaling=float(module.scaling[key])))
    if not pairs:
        return [], "the adapter adapts no linear layer"
    return pairs, None


def prepare_models(base: BaseInfo, adapter: AdapterInfo | None, keep_base: bool) -> PreparedModels:
    """Load, attach, read the LoRA pairs, merge. `keep_base` keeps an unmerged copy for gguf-lora builds."""
    model = load_base_model(base)
    tokenizer = load_tokenizer(base)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if adapter is None:
        return PreparedModels(merged=model, tokenizer=tokenizer, base=model if keep_base else None,
                              tied_embeddings=tied)
    base_copy = copy.deepcopy(model) if keep_base else None
    peft_model = _attach(model, adapter)
    pairs, problem = lora_pairs(peft_model)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return PreparedModels(merged=merged, tokenizer=tokenizer, base=base_copy, lora=pairs, lora_problem=problem,
                          tied_embeddings=tied)


def save_untied_checkpoint(model: PreTrainedModel, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write an HF checkpoint whose output head is its own tensor (tie_word_embeddings=False).

    optimum keeps a tied embedding in fp32 and the int4 quantizer cannot reach the head;
    untied, both quantize (ARCHITECTURE.md, "Edge runtime and export"). The model itself is left as it was.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    embed = model.get_input_embeddings().weight.detach()
    if getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state:
        state["lm_head.weight"] = embed.clone()
        config.tie_word_embeddings = False
    # safetensors refuses tensors that share storage; every tensor gets its own.
    seen: set[int] = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            state[name] = tensor.clone()
        seen.add(state[name].untyped_storage().data_ptr())
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    data = json.loads((out_dir / "config.json").read_text())
    data["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(data, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    return out_dir
