"""Which accelerator an edge build runs on: llama.cpp's GPU layers, ONNX Runtime's execution providers.

`auto` (the default of both) uses a GPU when the install can and the CPU otherwise; an explicit
request for a GPU the install cannot use is a GpuUnavailableError naming what to install, never a
silent fall back. The choices are plain functions of what the engine reports
(`llama_supports_gpu_offload()`, `get_available_providers()`), so they are the same for the
loader and for `cotune edge doctor`, and neither engine is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from edge_sdk.runtime.base import GpuUnavailableError, UnsupportedBuildError

GpuLayers = int | Literal["auto", "all"]
Providers = str | Sequence[str]

# llama.cpp offloads every layer when asked for more than the model has (its -ngl 999 idiom).
ALL_LAYERS = 0x7FFFFFFF
# The version cotune pins (pyproject.toml, edge-llama), rebuilt with CUDA: an unpinned reinstall
# would pull a newer llama-cpp-python than the one the runtime is written and tested against.
LLAMA_GPU_INSTALL = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                     '"llama-cpp-python==0.3.36"')
# PyPI's onnxruntime-gpu has x86-64 and Windows wheels only; on a Jetson (aarch64) it comes from
# NVIDIA's Jetson Zoo / JetPack index instead (docs/deploy.md).
ORT_GPU_INSTALL = ("pip uninstall onnxruntime && pip install onnxruntime-gpu (x86-64; on a Jetson, the "
                   "onnxruntime-gpu wheel for its JetPack, see docs/deploy.md)")
CPU_EP, CUDA_EP, TENSORRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# What `auto` picks from, best first; other providers (Azure, DirectML, ...) only when named.
# TensorRT only when named: our decoder graphs take a KV cache whose length grows every step,
# and without explicit shape profiles ONNX Runtime's TensorRT provider rebuilds its engine each
# time an input shape leaves the range it has seen, i.e. on most steps of a generation.
AUTO_ORDER = (CUDA_EP,)
SHORT_NAMES = {"cpu": (CPU_EP,), "cuda": (CUDA_EP, CPU_EP), "tensorrt": (TENSORRT_EP, CUDA_EP, CPU_EP)}
GPU_EPS = (TENSORRT_EP, CUDA_EP, "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider",
           "CoreMLExecutionProvider")


def parse_gpu_layers(value: GpuLayers | str | None) -> GpuLayers:
    """auto, all (also -1, llama.cpp's word for it) or a count >= 0; a ValueError otherwise."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "all"):
            return text  # type: ignore[return-value]
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"n_gpu_layers {value!r} is not auto, all or a number of layers") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"n_gpu_layers {value!r} is not auto, all or a number of layers >= 0")
    return "all" if value == -1 else value


def resolve_gpu_layers(value: GpuLayers | str | None, gpu_offload: bool) -> int:
    """The n_gpu_layers to give llama.cpp: auto is every layer when this llama.cpp can offload, else 0."""
    wanted = parse_gpu_layers(value)
    if wanted == "auto":
        return ALL_LAYERS if gpu_offload else 0
    layers = ALL_LAYERS if wanted == "all" else int(wanted)
    if layers > 0 and not gpu_offload:
        raise GpuUnavailableError(
            f"n_gpu_layers={value!r} asks llama.cpp to offload layers to a GPU",
            "this llama-cpp-python was built without GPU support, or finds no GPU "
            "(llama_supports_gpu_offload() is false)",
            f"reinstall it with CUDA: {LLAMA_GPU_INSTALL}; or load with n_gpu_layers=0 (or auto)",
        )
    return layers


def parse_providers(value: Providers | None) -> Literal["auto"] | list[str]:
    """auto, a short name (cpu, cuda, tensorrt), a comma-separated string or a list of provider names."""
    if value is None:
        return "auto"
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p).strip() for p in value]
    items = [p for p in items if p]
    if not items:
        raise ValueError("providers is empty; give auto, cpu, cuda, tensorrt or ONNX Runtime provider names")
    if len(items) == 1 and items[0].lower() == "auto":
        return "auto"
    if len(items) == 1 and items[0].lower() in SHORT_NAMES:
        return list(SHORT_NAMES[items[0].lower()])
    return items


def resolve_providers(value: Providers | None, available: Sequence[str], known: Sequence[str] = ()) -> list[str]:
    """The execution providers to open a session with, best first.

    auto takes CUDA when `available` has it and always ends with the CPU. A named
    provider that this onnxruntime lacks is an error: a GPU one (GpuUnavailableError) says to
    install onnxruntime-gpu; a name no onnxruntime knows (`known`, from get_all_providers) is a typo.
    """
    wanted = parse_providers(value)
    if wanted == "auto":
        return [p for p in AUTO_ORDER if p in available] + [CPU_EP]
    for name in wanted:
        if name in available:
            continue
        if known and name not in known:
            raise UnsupportedBuildError(f"{name!r} is not an ONNX Runtime execution provider",
                                        f"this onnxruntime offers {', '.join(available)}",
                                        "use auto, cpu, cuda, tensorrt or one of those names")
        if name in (CUDA_EP, TENSORRT_EP):
            raise GpuUnavailableError(
                f"{name} was asked for, but this onnxruntime cannot use it",
                f"it offers only {', '.join(available)}",
                f"install the GPU build ({ORT_GPU_INSTALL}, with CUDA and cuDNN on the machine); "
                "or load with providers auto or cpu",
            )
        if name in GPU_EPS:
            raise GpuUnavailableError(f"{name} was asked for, but this onnxruntime cannot use it",
                                      f"it offers only {', '.join(available)}",
                                      "install the onnxruntime package built with it, or load with providers auto "
                                      "or cpu")
        raise UnsupportedBuildError(f"{name} was asked for, but this onnxruntime does not offer it",
                                    f"it offers {', '.join(available)}", "install an onnxruntime build that has it")
    return list(dict.fromkeys(wanted))
