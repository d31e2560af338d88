"""HF checkpoints in and out of torch: the one loader and the one writer both sides use.

What makes a directory a checkpoint is checked first, without torch, by common.checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoint import TOKENIZER_FILE, TOKENIZER_FILES, inspect_checkpoint
from common.dirs import staged_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer_dir_or_obj: Any,
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write an HF checkpoint dir (config.json, model.safetensors, tokenizer files).

    Staged beside `out_dir` and renamed into place, so `out_dir` is either the old checkpoint
    or the complete new one. `tokenizer_dir_or_obj` is a directory holding tokenizer files,
    a `tokenizers.Tokenizer` or a transformers tokenizer.
    """
    from common.ml.tokenizer import save_tokenizer

    if hasattr(model, "peft_config"):
        raise ValueError(
            "save_checkpoint takes a base model; merge the adapter first "
            "(peft_model.merge_and_unload()) or save the adapter with common.ml.lora."
        )
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if isinstance(tokenizer_dir_or_obj, (str, os.PathLike)):
            src = Path(tokenizer_dir_or_obj)
            if not (src / TOKENIZER_FILE).is_file():
                raise ValueError(f"{src}: no {TOKENIZER_FILE} to copy into the checkpoint")
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        else:
            save_tokenizer(tokenizer_dir_or_obj, tmp)
    return out


def load_checkpoint(
    dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load (model in eval mode, tokenizer) from a checked HF checkpoint directory.

    The defaults give a float32 model on the CPU. `device` is auto (cuda when torch sees a GPU),
    cpu, cuda or cuda:N; `dtype` float32, bfloat16 or float16 (common.ml.device says which the
    CPU takes). `device_map="auto"` lets accelerate spread a model too large for one GPU over
    every visible GPU (then `device` must be auto or cuda); it needs accelerate and CUDA.
    An impossible choice is a DeviceError saying what to install or change.
    """
    from transformers import AutoModelForCausalLM

    from common.ml.device import resolve_placement
    from common.ml.tokenizer import load_hf_tokenizer

    target, torch_dtype, mapping = resolve_placement(device, dtype, device_map)
    ckpt = inspect_checkpoint(dir)
    if mapping == "auto":
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.dir), local_files_only=True, use_safetensors=True, dtype=torch_dtype, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.dir), local_files_only=True, use_safetensors=True, dtype=torch_dtype)
        if target.type != "cpu":
            model = model.to(target)
    return model.eval(), load_hf_tokenizer(ckpt.dir)
