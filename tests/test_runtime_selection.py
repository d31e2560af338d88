"""Choosing a build for a device profile."""

from __future__ import annotations

import pytest

from common.manifest import BuildFile, BuildManifest
from common.protocol import DeviceProfile
from common.selection import NoSuitableBuildError, choose_build, estimated_memory, rank_builds

MiB = 1 << 20
GiB = 1 << 30


def build(fmt: str, quant: str, size: int, round_: int | None = None) -> BuildManifest:
    model_file = {"gguf": "model.gguf", "gguf-lora": "adapter.gguf", "onnx": "model.onnx"}[fmt]
    return BuildManifest(format=fmt, quantization=quant, architecture="gemma3", model_file=model_file,
                         tokenizer_file="tokenizer.json" if fmt == "onnx" else None, base_model="gemma",
                         round=round_, files=[BuildFile(name=model_file, sha256="0" * 64, size=size)])


BUILDS = [
    build("gguf", "f16", 540 * MiB),
    build("gguf", "q8_0", 290 * MiB),
    build("gguf", "q4_k_m", 240 * MiB),
    build("gguf-lora", "f16", 4 * MiB),
    build("onnx", "fp32", 1100 * MiB),
    build("onnx", "int8", 420 * MiB),
    build("onnx", "int4", 300 * MiB),
]

PI = DeviceProfile(arch="aarch64", os="linux", cores=4, ram_bytes=8 * GiB, backends=["llama.cpp", "onnxruntime"])
LAPTOP = DeviceProfile(arch="x86_64", os="linux", cores=16, ram_bytes=32 * GiB,
                       backends=["llama.cpp", "onnxruntime", "torch"])


def test_small_arm_device_gets_the_4bit_gguf() -> None:
    chosen = choose_build(BUILDS, PI)
    assert (chosen.format, chosen.quantization) == ("gguf", "q4_k_m")


def test_large_x86_machine_gets_8bit() -> None:
    chosen = choose_build(BUILDS, LAPTOP)
    assert (chosen.format, chosen.quantization) == ("gguf", "q8_0")
    assert choose_build(BUILDS, LAPTOP, prefer="quality").quantization == "f16"
    assert choose_build(BUILDS, LAPTOP, prefer="speed").quantization == "q4_k_m"


def test_only_installed_engines() -> None:
    onnx_only = PI.model_copy(update={"backends": ["onnxruntime"]})
    chosen = choose_build(BUILDS, onnx_only)
    assert chosen.format == "onnx" and chosen.quantization == "int4"


def test_memory_rules_out_big_builds() -> None:
    tiny_ram = DeviceProfile(arch="aarch64", cores=4, ram_bytes=1 * GiB, backends=["onnxruntime"])
    ranked = rank_builds(BUILDS, tiny_ram)
    fp32 = next(r for r in ranked if r.manifest.quantization == "fp32")
    assert not fp32.runnable and any("RAM" in reason for reason in fp32.reasons)
    assert estimated_memory(BUILDS[0]) > 540 * MiB


def test_adapter_builds_are_never_chosen_alone() -> None:
    with pytest.raises(NoSuitableBuildError, match="not a standalone model"):
        choose_build([build("gguf-lora", "f16", 4 * MiB)], LAPTOP)


def test_nothing_fits_says_why() -> None:
    phone = DeviceProfile(arch="aarch64", cores=8, ram_bytes=512 * MiB, backends=["llama.cpp"])
    with pytest.raises(NoSuitableBuildError) as err:
        choose_build(BUILDS, phone)
    message = str(err.value)
    assert "none of the 7 builds" in message and "RAM" in message
    ranked = {(r.manifest.format, r.manifest.quantization): r for r in rank_builds(BUILDS, phone)}
    assert any("needs onnxruntime" in reason for reason in ranked[("onnx", "int4")].reasons)
    with pytest.raises(NoSuitableBuildError, match="no builds"):
        choose_build([], phone)


def test_latest_round_wins_a_tie() -> None:
    older, newer = build("gguf", "q4_k_m", 240 * MiB, round_=2), build("gguf", "q4_k_m", 240 * MiB, round_=5)
    assert choose_build([older, newer], PI).round == 5


def test_unknown_profile_fields_do_not_exclude() -> None:
    unknown = DeviceProfile()  # what a device that reported nothing looks like
    assert choose_build(BUILDS, unknown).format == "gguf"


def test_defaults_to_this_machine() -> None:
    from edge_sdk.runtime import choose_build as choose_here

    chosen = choose_here(BUILDS)
    assert chosen.format in ("gguf", "onnx")
