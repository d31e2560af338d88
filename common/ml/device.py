"""Where torch models run and in which precision: the one place that turns the settings'
words (`auto`, `cuda:1`, `bfloat16`) into torch devices and dtypes, and moves batches to a model.

The words are checked without torch (`check_device`, `check_dtype`), so settings refuse a typo
at start-up; what the machine can actually do is asked of torch only when a model is loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_MAPS = ("none", "auto")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
TORCH_CUDA_INSTALL = "the pip command for your CUDA version is at https://pytorch.org/get-started/locally/"
log = logging.getLogger("cotune.device")


class DeviceError(ValueError):
    """A device, dtype or device map this machine (or install) cannot give; says what to do."""


def check_device(value: str) -> str:
    """`value` if it is auto, cpu, cuda or cuda:N (N a GPU index); a DeviceError otherwise."""
    text = str(value).strip().lower()
    if not _DEVICE.match(text):
        raise DeviceError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N (N the GPU's index)")
    return text


def check_dtype(value: str) -> str:
    text = str(value).strip().lower()
    if text not in DTYPES:
        raise DeviceError(f"dtype {value!r} is not one of {', '.join(DTYPES)}")
    return text


def check_device_map(value: str | None) -> str:
    text = "none" if value is None else str(value).strip().lower()
    if text not in DEVICE_MAPS:
        raise DeviceError(f"device_map {value!r} is not one of {', '.join(DEVICE_MAPS)}")
    return text


def resolve_device(value: str = "auto") -> torch.device:
    """The torch device for `value`: auto is cuda when torch sees a GPU, else cpu. Asking for a
    GPU that is not there is a DeviceError naming the reason, never a silent fall back to the CPU."""
    import torch

    text = check_device(value)
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver")
        raise DeviceError(f"device {text!r} asked for, but CUDA is not available: {why}. Install a CUDA build of "
                          f"torch ({TORCH_CUDA_INSTALL}) on a machine with an NVIDIA GPU and driver, or use "
                          "device cpu (or auto)")
    device = torch.device("cuda" if text == "auto" else text)
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {text!r} asked for, but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1}); "
                          "pick one of those, or check CUDA_VISIBLE_DEVICES")
    return device


def resolve_dtype(value: str, device: torch.device) -> torch.dtype:
    """The torch dtype for `value` on `device`.

    float16 on the CPU is refused: torch 2.13 runs it, but without float16 kernels most CPUs
    upcast op by op (about 10x slower than float32 in our measurements) and it lacks float32's
    range for training. bfloat16 on the CPU is allowed (torch trains and generates in it; it
    halves memory) with a warning, since it too is slower than float32 unless the CPU has
    native bfloat16 (AVX512-BF16, AMX). bfloat16 on a GPU that lacks it is refused.
    """
    import torch

    text = check_dtype(value)
    dtype = getattr(torch, text)
    if device.type == "cpu" and text == "float16":
        raise DeviceError("dtype float16 on the CPU is refused: CPU kernels mostly upcast it (slower than "
                          "float32) and its range is too narrow to train safely; use bfloat16 to halve memory, "
                          "float32, or a CUDA device")
    if device.type == "cpu" and text == "bfloat16":
        log.warning("bfloat16 on the CPU halves memory but runs slower than float32 unless the CPU has native "
                    "bfloat16 (AVX512-BF16, AMX)")
    if device.type == "cuda" and text == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"dtype bfloat16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use float16 or float32")
    return dtype


def check_accelerate() -> None:
    """device_map auto is accelerate's; say how to get it rather than fail inside transformers."""
    try:
        found = importlib.util.find_spec("accelerate") is not None
    except (ImportError, ValueError):  # a broken install finder counts as absent
        found = False
    if not found:
        raise DeviceError("device_map auto needs the accelerate package, which is not installed: "
                          "pip install accelerate, or use device_map none")


def resolve_placement(device: str, dtype: str, device_map: str | None = None) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, device map) for loading a model, or a DeviceError saying what cannot hold.

    device_map auto leaves the placement to accelerate over every visible GPU, so it takes device
    auto or cuda only (choose GPUs with CUDA_VISIBLE_DEVICES), needs CUDA and needs accelerate.
    """
    mapping = check_device_map(device_map)
    if mapping == "auto" and check_device(device) not in ("auto", "cuda"):
        raise DeviceError(f"device_map auto places the model over every visible GPU itself, so device {device!r} "
                          "cannot hold with it; use device auto (choose GPUs with CUDA_VISIBLE_DEVICES), "
                          "or device_map none")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if mapping == "auto":
        if target.type != "cuda":
            raise DeviceError("device_map auto spreads a model over GPUs, but torch sees none; use device_map none "
                              "(the model then loads on the CPU)")
        check_accelerate()
    return target, torch_dtype, mapping


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (its embeddings, also when
    accelerate spreads the layers over several GPUs)."""
    import torch

    try:
        return next(iter(model.parameters())).device
    except StopIteration:
        return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (other values as they are); a no-op on the CPU."""
    return {key: value.to(device) if hasattr(value, "to") and hasattr(value, "device") else value
            for key, value in batch.items()}


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state `torch.random.fork_rng` should save for a model on `device`."""
    if device.type != "cuda":
        return []
    return [0 if device.index is None else device.index]
