"""Choosing which of a run's edge builds a device should run.

The rules, in order:
1. Only builds a device can run on its own: GGUF or ONNX models (a gguf-lora adapter needs
   its base), on an engine the device has installed (when the profile says which).
2. Only builds that fit in memory: the estimated resident size (file size times an
   engine factor, plus a margin for the KV cache and the runtime) within a share of RAM.
3. Among those, llama.cpp before ONNX Runtime: on the CPUs measured here (ARCHITECTURE.md,
   "Edge runtime and export") it decodes 1.5-2x faster at the same bit width. Then the quantization: on small or ARM
   devices, whose decode speed is bounded by memory bandwidth, 4-bit k-quants first; on
   larger x86 machines 8-bit first (almost lossless, only a little slower there).
   `prefer="speed"` or `"quality"` overrides that middle ground.
4. Ties go to the latest round, then to the smaller file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from common.errors import EdgeRuntimeError
from common.manifest import BuildManifest
from common.protocol import DeviceProfile

Preference = Literal["balanced", "speed", "quality"]

ENGINE_FOR_FORMAT = {"gguf": "llama.cpp", "onnx": "onnxruntime"}
# Resident memory per byte of model file: llama.cpp maps the file; ONNX Runtime reads the
# weights into its own buffers and may keep pre-packed copies of some.
_MEMORY_FACTOR = {"gguf": 1.05, "onnx": 1.6}
_MEMORY_MARGIN = 256 << 20
# Share of RAM a model may take; the OS and the application need the rest.
RAM_SHARE = 0.6
_SMALL_DEVICE_RAM = 8 << 30

# Higher is better quality (roughly: how close to the float model).
_QUALITY = {
    "f32": 100, "fp32": 100, "bf16": 96, "f16": 96, "fp16": 96,
    "q8_0": 90, "int8": 88, "q6_k": 85, "q5_k_m": 80, "q5_0": 78, "q4_k_m": 75, "q4_0": 70, "int4": 70,
    "q3_k_m": 60, "q2_k": 45,
}


class NoSuitableBuildError(EdgeRuntimeError):
    """None of the builds can run on this device."""


@dataclass
class RankedBuild:
    manifest: BuildManifest
    runnable: bool
    score: float
    reasons: list[str] = field(default_factory=list)


def estimated_memory(manifest: BuildManifest) -> int:
    """Bytes of RAM the build needs once loaded (a deliberate over-estimate)."""
    return int(manifest.size_bytes * _MEMORY_FACTOR.get(manifest.format, 1.6)) + _MEMORY_MARGIN


def _small_device(profile: DeviceProfile) -> bool:
    arch = profile.arch.lower()
    return arch.startswith(("arm", "aarch64")) or (0 < profile.ram_bytes < _SMALL_DEVICE_RAM) or profile.cores <= 4


def _quant_score(quant: str, profile: DeviceProfile, prefer: Preference) -> float:
    q = quant.lower()
    quality = _QUALITY.get(q, 50)
    if prefer == "quality":
        return quality
    # Fewer bits per weight: fewer bytes read per generated token.
    speed = 100 - quality
    if prefer == "speed":
        return speed
    target = 75 if _small_device(profile) else 90
    return 100 - abs(quality - target)


def rank_builds(
    manifests: Sequence[BuildManifest], profile: DeviceProfile, prefer: Preference = "balanced"
) -> list[RankedBuild]:
    """Every build with whether it can run here, a score (higher first) and the reasons."""
    ranked: list[RankedBuild] = []
    installed = set(profile.backends)
    budget = int(profile.ram_bytes * RAM_SHARE) if profile.ram_bytes else 0
    for m in manifests:
        reasons: list[str] = []
        runnable = True
        engine = ENGINE_FOR_FORMAT.get(m.format)
        if engine is None:
            runnable = False
            reasons.append(f"format {m.format} is not a standalone model (an adapter needs its base)"
                           if m.format == "gguf-lora" else f"format {m.format} has no backend")
        elif installed and engine not in installed:
            runnable = False
            reasons.append(f"needs {engine}, which this device does not have")
        need = estimated_memory(m)
        if budget and need > budget:
            runnable = False
            reasons.append(f"needs about {need / 2**20:.0f} MiB, over {RAM_SHARE:.0%} of this device's RAM "
                           f"({budget / 2**20:.0f} MiB)")
        score = 0.0
        if runnable:
            score += 1000.0 if engine == "llama.cpp" else 0.0
            score += _quant_score(m.quantization, profile, prefer) * 2
            score += (m.round or 0) * 1e-3
            score -= m.size_bytes / 1e15  # smaller wins an otherwise exact tie
            reasons.append(f"{engine}, {m.quantization}, about {need / 2**20:.0f} MiB")
        ranked.append(RankedBuild(m, runnable, score, reasons))
    ranked.sort(key=lambda r: (r.runnable, r.score), reverse=True)
    return ranked


def choose_build(
    manifests: Sequence[BuildManifest],
    profile: DeviceProfile,
    prefer: Preference = "balanced",
) -> BuildManifest:
    """The build a device of this profile should run; raises NoSuitableBuildError saying why none fits.

    On the device itself, edge_sdk.runtime.choose_build fills in this machine's profile.
    """
    if not manifests:
        raise NoSuitableBuildError("there are no builds to choose from", "the run has published none yet",
                                   "wait for the run to publish its edge builds")
    ranked = rank_builds(manifests, profile, prefer)
    if ranked[0].runnable:
        return ranked[0].manifest
    why = "; ".join(f"{r.manifest.format}/{r.manifest.quantization}: {', '.join(r.reasons)}" for r in ranked[:4])
    raise NoSuitableBuildError(
        f"none of the {len(manifests)} builds can run on this device "
        f"({profile.arch}, {profile.ram_bytes / 2**30:.1f} GiB RAM, engines {sorted(profile.backends) or 'unknown'})",
        why,
        "install llama-cpp-python or onnxruntime, or ask for a smaller quantization of the model",
    )
