"""What this device's install can do: engines, training, building, GPU, memory, which builds fit.

`cotune edge doctor` prints it; `cotune edge join` uses `check_install` to stop before
enrolling when the install cannot do what a run asks (ARCHITECTURE.md, "Edge runtime and
export"). Probes look for packages without importing them where they can, so the report is
cheap on a Pi; only the GPU questions import the engine that answers them. The GPU report says
what `EdgeModel.load`'s `auto` picks for each engine (edge_sdk.runtime.accel) and, when a GPU is
here but an engine cannot use it, what to install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from common.protocol import BuildInfo, DeviceProfile

# The packages each extra brings that the code paths below import (pyproject.toml).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft"),
    "export": ("torch", "transformers", "peft", "optimum", "onnx", "gguf"),
    "edge-onnx": ("tokenizers", "onnxruntime"),
    "edge-llama": ("llama_cpp",),
}


class InstallError(RuntimeError):
    """This install lacks an extra the run needs; the message names the pip command."""


def importable(module: str) -> bool:
    """Whether `module` can be found, without importing it (a broken finder counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(extra: str) -> list[str]:
    return [m for m in EXTRA_MODULES[extra] if not importable(m)]


def install_hint(extra: str) -> str:
    return f'pip install "cotune[{extra}]"'


def check_install(*, train: bool = False, builds: bool = False) -> None:
    """Raise InstallError (one line naming the extra to install) when a needed extra is missing."""
    for needed, extra, why in ((train, "train", "train LoRA adapters, which every run asks of its devices"),
                               (builds, "export", "make edge builds of this device's model, which this run asks")):
        missing = missing_modules(extra) if needed else []
        if missing:
            raise InstallError(f"this install cannot {why} ({', '.join(missing)} not installed): "
                               f"run {install_hint(extra)}, then join again")


def _llama_cpp() -> dict[str, Any]:
    info: dict[str, Any] = {"available": importable("llama_cpp"), "version": None, "gpu_offload": None}
    if info["available"]:
        try:
            import llama_cpp

            info["version"] = getattr(llama_cpp, "__version__", None)
            info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        except Exception as exc:  # a broken build: say so rather than crash the report
            info.update(available=False, error=str(exc)[:200])
    return info


def _onnxruntime() -> dict[str, Any]:
    info: dict[str, Any] = {"available": importable("onnxruntime"), "version": None, "providers": []}
    if info["available"]:
        try:
            import onnxruntime

            info["version"] = onnxruntime.__version__
            info["providers"] = list(onnxruntime.get_available_providers())
        except Exception as exc:
            info.update(available=False, error=str(exc)[:200])
    return info


def _torch_cuda(can_train: bool) -> dict[str, Any]:
    if not can_train:
        return {"available": None, "devices": []}
    try:
        import torch

        if not torch.cuda.is_available():
            return {"available": False, "devices": []}
        return {"available": True,
                "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    except Exception as exc:
        return {"available": None, "devices": [], "error": str(exc)[:200]}


def _gpu(accelerator: str | None, torch_cuda: dict[str, Any], llama: dict[str, Any],
         ort: dict[str, Any]) -> dict[str, Any]:
    """What the GPU can do for each engine, what `auto` picks, and what to install when a GPU is
    here but an engine cannot use it."""
    from edge_sdk.runtime.accel import GPU_EPS, LLAMA_GPU_INSTALL, ORT_GPU_INSTALL, resolve_providers

    gpu_here = accelerator in ("cuda", "jetson") or bool(torch_cuda.get("available"))
    auto: dict[str, Any] = {
        "llama.cpp": ("all layers on the GPU" if llama["gpu_offload"] else "CPU") if llama["available"] else None,
        "onnxruntime": resolve_providers("auto", ort["providers"]) if ort["available"] else None,
    }
    hints = []
    if gpu_here and llama["available"] and not llama["gpu_offload"]:
        hints.append(f"llama.cpp runs GGUF builds on the CPU here; for the GPU: {LLAMA_GPU_INSTALL}")
    if gpu_here and ort["available"] and "CUDAExecutionProvider" not in ort["providers"]:
        hints.append(f"ONNX Runtime runs ONNX builds on the CPU here; for the GPU: {ORT_GPU_INSTALL}")
    return {
        "accelerator": accelerator,
        "torch_cuda": torch_cuda,
        "onnxruntime_gpu_providers": [p for p in ort["providers"] if p in GPU_EPS],
        "llama_cpp_gpu_offload": llama["gpu_offload"],
        "auto": auto,
        "hints": hints,
    }


def _builds_fit(builds: Sequence[BuildInfo], profile: DeviceProfile) -> list[dict[str, Any]]:
    from common.manifest import BuildManifest
    from common.selection import rank_builds

    manifests, names, unreadable = [], {}, []
    for build in builds:
        try:
            manifest = BuildManifest.model_validate(build.manifest)
        except ValueError:
            unreadable.append({"name": build.name, "fits": False, "best": False,
                               "reasons": ["its manifest does not validate"]})
            continue
        manifests.append(manifest)
        names[id(manifest)] = build.name
    ranked = rank_builds(manifests, profile)
    fits = [{"name": names[id(r.manifest)], "fits": r.runnable, "best": k == 0 and r.runnable, "reasons": r.reasons}
            for k, r in enumerate(ranked)]
    return fits + unreadable


def diagnose(builds: Sequence[BuildInfo] | None = None) -> dict[str, Any]:
    """The report `cotune edge doctor --json` prints."""
    from edge_sdk.profile import detect_profile

    profile = detect_profile()
    llama, ort = _llama_cpp(), _onnxruntime()
    extras = {extra: {"installed": not missing, "missing": missing, "install": install_hint(extra)}
              for extra in EXTRA_MODULES for missing in [missing_modules(extra)]}
    can_train = extras["train"]["installed"]
    profile = profile.model_copy(update={"backends": [label for label, ok in (
        ("llama.cpp", llama["available"]), ("onnxruntime", ort["available"]), ("torch", can_train)) if ok]})
    return {
        "backends": {"llama.cpp": llama, "onnxruntime": ort},
        "can_train": can_train,
        "can_build": extras["export"]["installed"],
        "extras": extras,
        "gpu": _gpu(profile.accelerator, _torch_cuda(can_train), llama, ort),
        "profile": {"arch": profile.arch, "os": profile.os, "cores": profile.cores, "ram_bytes": profile.ram_bytes},
        "builds": _builds_fit(builds, profile) if builds is not None else None,
    }
