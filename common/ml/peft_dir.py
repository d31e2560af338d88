"""Write a cotune LoRA adapter as a stock peft directory.

A peft directory is `adapter_config.json` + `adapter_model.safetensors`, what
`peft.PeftModel.from_pretrained(base, dir)` opens. Our adapter files already use peft's
tensor names (`get_peft_model_state_dict`, see common/ml/lora.py), so the tensors are written
as they are; the config is peft's own `LoraConfig`, saved with its `save_pretrained`.

The cotune files (`adapter.safetensors`, `adapter_info.json`) stay as they are beside it: the
protocol and the final adapter digest are theirs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.protocol import LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_A = ".lora_A.weight"
# GPT-2's Conv1D layers (common/ml/lora.py GPT2_TARGETS) store weights transposed.
_CONV1D_LEAVES = ("c_attn", "c_fc", "c_proj")


def _module_names(names: list[str]) -> list[str]:
    """The adapted modules' names inside the base model, from peft's tensor names."""
    modules = sorted({n[len(_PREFIX):-len(_LORA_A)] for n in names if n.startswith(_PREFIX) and n.endswith(_LORA_A)})
    if not modules:
        raise ValueError("the adapter holds no LoRA tensors named like peft's "
                         f"'{_PREFIX}<module>{_LORA_A}'; is it a cotune LoRA adapter?")
    return modules


def _model_type(base: str) -> str | None:
    config = Path(base) / "config.json"
    if not config.is_file():
        return None
    try:
        return str(json.loads(config.read_text()).get("model_type") or "") or None
    except (OSError, ValueError):
        return None


def write_peft_dir(
    adapter: bytes | str | os.PathLike[str],
    lora: LoraSpec,
    base_model_name_or_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write `adapter` (a cotune adapter's safetensors bytes or file) as a peft directory.

    `base_model_name_or_path` is recorded in the config (peft and transformers load the base
    from it). The exact adapted module names are the target modules, so peft adapts exactly
    the layers our loader did (including GPT-2's mapped names). Returns `out_dir`.
    """
    from safetensors.torch import save_file

    from common.ml.lora import adapter_from_bytes, lora_config

    data = adapter if isinstance(adapter, bytes) else Path(adapter).read_bytes()
    tensors, _ = adapter_from_bytes(data)
    modules = _module_names(list(tensors))
    base = str(base_model_name_or_path)
    model_type = _model_type(base)
    if model_type is not None:
        fan_in_fan_out = model_type == "gpt2"
    else:  # no local config to read: GPT-2 is the only family here with Conv1D layer names
        fan_in_fan_out = any(m.rsplit(".", 1)[-1] in _CONV1D_LEAVES for m in modules)
    config = lora_config(lora, modules, fan_in_fan_out, base_model_name_or_path=base)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    return out
