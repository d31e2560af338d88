"""LoRA adapters: attach (peft), read and write their tensors, and move them as
safetensors bytes (never pickle).

Adapter tensor names are peft's `get_peft_model_state_dict` names, i.e. without the
adapter name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
Two models built from the same checkpoint with the same LoraSpec have the same names and
shapes, which is what FedAvg needs.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from common.protocol import LoraSpec

# GPT-2 fuses q/k/v into one `c_attn` (a Conv1D) and names its output projection
# `attn.c_proj` (the MLP has another `c_proj`, hence the `attn.` prefix).
GPT2_TARGETS: dict[str, str] = {
    "q_proj": "c_attn",
    "k_proj": "c_attn",
    "v_proj": "c_attn",
    "o_proj": "attn.c_proj",
    "gate_proj": "mlp.c_fc",
    "up_proj": "mlp.c_fc",
    "down_proj": "mlp.c_proj",
}


def _matches(module_name: str, target: str) -> bool:
    # The same rule peft applies to a list of target names: a whole-name suffix.
    return module_name == target or module_name.endswith("." + target)


def _resolve_targets(model: Any, requested: list[str]) -> tuple[list[str], bool]:
    """Requested names that exist in the model (mapped for GPT-2), and whether GPT-2."""
    import torch
    from transformers.pytorch_utils import Conv1D

    is_gpt2 = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    ]
    resolved: list[str] = []
    missing: list[str] = []
    for target in requested:
        candidate = target
        if is_gpt2 and not any(_matches(n, target) for n in names):
            candidate = GPT2_TARGETS.get(target, target)
        if any(_matches(n, candidate) for n in names):
            if candidate not in resolved:
                resolved.append(candidate)
        else:
            missing.append(target)
    if not resolved:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"none of the LoRA target modules {missing} exist in this model; "
            f"its linear layers are named {leaves}. Set lora.target_modules to some of those."
        )
    if missing:
        warnings.warn(
            f"LoRA target modules {missing} are not in this model; adapting {resolved} only",
            stacklevel=3,
        )
    return resolved, is_gpt2


def lora_config(spec: LoraSpec, targets: list[str], fan_in_fan_out: bool, **extra: Any) -> Any:
    """The peft LoraConfig for `spec` on these target modules: what a model is trained with and
    what a peft directory of its adapter declares. `fan_in_fan_out` for GPT-2's Conv1D layers,
    which store weights transposed."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none", **extra)


# Where attach_lora records which LoRA parameters stay frozen, so that every trainer (which
# re-marks the trainable parameters through `lora_trainable`) keeps them frozen too.
_FROZEN_ATTR = "cotune_frozen_factors"
_A_FACTOR = re.compile(r"(^|\.)lora_A(\.|$)")


def frozen_factor(name: str, aggregation: str) -> bool:
    """Whether the adapter tensor or parameter `name` stays at its seeded init under the run's
    `LoraSpec.aggregation`: with 'ffa' (FFA-LoRA) every lora_A does, and only lora_B trains."""
    return aggregation == "ffa" and _A_FACTOR.search(name) is not None


def lora_trainable(model: Any, name: str) -> bool:
    """Whether parameter `name` of a model made by `attach_lora` trains: a LoRA parameter that
    the run's LoRA aggregation does not freeze."""
    return "lora_" in name and not frozen_factor(name, getattr(model, _FROZEN_ATTR, "factors"))


def attach_lora(model: Any, spec: LoraSpec, seed: int) -> Any:
    """Wrap `model` in a peft LoRA model (causal LM); only LoRA parameters train, and with
    `spec.aggregation == "ffa"` only the lora_B ones (A stays at its seeded init).

    The init is deterministic for a given seed (A is random, B zero, so the adapted
    model starts equal to the base). For GPT-2, llama-style names are mapped through
    GPT2_TARGETS (q/k/v_proj -> c_attn, o_proj -> attn.c_proj).
    """
    import torch
    from peft import get_peft_model

    if hasattr(model, "peft_config"):
        raise ValueError("the model already has adapters; attach LoRA to a base model")
    targets, is_gpt2 = _resolve_targets(model, list(spec.target_modules))
    config = lora_config(spec, targets, fan_in_fan_out=is_gpt2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    # A plain attribute (not a parameter or buffer): trainers read it through lora_trainable.
    object.__setattr__(peft_model, _FROZEN_ATTR, spec.aggregation)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(lora_trainable(peft_model, name))
    return peft_model


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors: float32, contiguous, CPU copies (safe to keep while training)."""
    import torch
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for name, tensor in state.items()
    }


def load_adapter_state(peft_model: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors into `peft_model`, strictly.

    Raises ValueError when names are missing or unexpected, a shape differs, a tensor
    is not floating point, or a value is not finite: a bad update must not be half
    applied.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter does not fit this model: {len(missing)} missing tensor(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}. Was it trained "
            "with the same base model and LoRA settings (r, target_modules)?"
        )
    for name, ref in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(
                f"adapter tensor {name}: shape {tuple(tensor.shape)}, this model needs "
                f"{tuple(ref.shape)}; check LoRA r and the base model"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"adapter tensor {name}: dtype {tensor.dtype} is not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter tensor {name} holds NaN or infinite values")
    converted = {
        name: tensors[name].detach().to(device=ref.device, dtype=ref.dtype)
        for name, ref in expected.items()
    }
    with torch.no_grad():
        result = set_peft_model_state_dict(peft_model, converted)
    leftover = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if leftover:  # pragma: no cover - guards a peft naming change
        raise ValueError(f"peft did not place adapter tensors {leftover[:3]}")


def adapter_to_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """Serialize adapter tensors (and string metadata) as a safetensors body.

    The bytes are a pure function of the input (see `tensorfile.save_arrays`), so the
    sha256 that makes uploads idempotent is stable.
    """
    from common.tensorfile import save_arrays

    arrays = {}
    for name, tensor in tensors.items():
        if str(tensor.dtype) == "torch.bfloat16":
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no numpy form; cast to float32 first")
        arrays[name] = tensor.detach().to("cpu").contiguous().numpy()
    return save_arrays(arrays, metadata)


def adapter_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors body into (tensors, metadata); ValueError when malformed."""
    from safetensors.torch import load

    data = bytes(data)
    if len(data) < 8:
        raise ValueError("not a safetensors body: shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise ValueError(f"not a safetensors body: header of {header_len} bytes runs past the end")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except Exception as exc:
        raise ValueError(f"not a valid safetensors body: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("safetensors __metadata__ must be an object of strings")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
