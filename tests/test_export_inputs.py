"""Bad input fails with a clear error before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export import ExportError, UnsupportedModelError, export_builds_isolated, parse_targets
from export.targets import Target
from tests.test_export_support import tiny_adapter, tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("inputs"), "llama")


def copy_of(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "base-copy"
    shutil.copytree(base, dst)
    return dst


def fails(base: Path, out: Path, match: str, adapter: object = None, targets: str = "gguf:f16",
          error: type[Exception] = ExportError) -> None:
    with pytest.raises(error, match=match):
        export_builds_isolated(base, adapter, targets, out, progress=False)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_targets_parse_with_defaults_and_aliases() -> None:
    assert parse_targets("gguf:q4_k_m, gguf:Q8_0,gguf-lora,onnx:int4,onnx, gguf") == [
        Target("gguf", "q4_k_m"), Target("gguf", "q8_0"), Target("gguf-lora", "f16"), Target("onnx", "int4"),
        Target("onnx", "fp32"), Target("gguf", "f16")]
    assert parse_targets(["onnx:f32", "onnx:fp32"]) == [Target("onnx", "fp32")]
    assert Target("gguf-lora", "q8_0").name == "gguf-lora-q8_0"
    with pytest.raises(ExportError, match="format"):
        parse_targets("tflite:int8")
    with pytest.raises(ExportError, match="q4_k_m"):
        parse_targets("gguf:q3_x")
    with pytest.raises(ExportError, match="no export targets"):
        parse_targets(" , ")


def test_missing_or_broken_checkpoint_files(base: Path, tmp_path: Path) -> None:
    fails(tmp_path / "nowhere", tmp_path / "out", "no such checkpoint")
    ckpt = copy_of(base, tmp_path)
    (ckpt / "tokenizer.json").unlink()
    fails(ckpt, tmp_path / "out", "no tokenizer.json")
    shutil.rmtree(ckpt)

    ckpt = copy_of(base, tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    fails(ckpt, tmp_path / "out", "truncated")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    fails(ckpt, tmp_path / "out", "corrupt")
    shutil.rmtree(ckpt)

    ckpt = copy_of(base, tmp_path)
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    fails(ckpt, tmp_path / "out", "not valid JSON")


def test_unsupported_architecture(base: Path, tmp_path: Path) -> None:
    ckpt = copy_of(base, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(config))
    fails(ckpt, tmp_path / "out", "not supported", error=UnsupportedModelError)


def test_adapter_of_another_base_is_refused(base: Path, tmp_path: Path) -> None:
    other = tiny_checkpoint(tmp_path, "llama", config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 128}, name="other")
    adapter, spec = tiny_adapter(other, tmp_path / "other-adapter.safetensors")
    fails(base, tmp_path / "out", "does not match this base model", adapter=(adapter, spec))

    good, spec = tiny_adapter(base, tmp_path / "adapter.safetensors", r=4)
    wrong_r = spec.model_copy(update={"r": 8})
    fails(base, tmp_path / "out", "rank 4", adapter=(good, wrong_r))
    fails(base, tmp_path / "out", "LoRA settings", adapter=good)  # no spec, no adapter_info.json
    good.write_bytes(good.read_bytes()[:-10])
    fails(base, tmp_path / "out", "truncated", adapter=(good, spec))


def test_gguf_lora_needs_an_adapter(base: Path, tmp_path: Path) -> None:
    fails(base, tmp_path / "out", "adapter alone", targets="gguf-lora")
