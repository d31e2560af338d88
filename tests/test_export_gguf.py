"""GGUF builds of tiny llama and qwen2 models with a LoRA adapter: f32/f16/q8_0/k-quants and the adapter alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.manifest import BuildManifest
from export import ParityBounds, export_builds_isolated
from tests.test_export_support import LOOSE_4BIT, tiny_adapter, tiny_checkpoint

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_and_lora_builds_pass_parity(arch: str, tmp_path: Path) -> None:
    base = tiny_checkpoint(tmp_path, arch)
    adapter, spec = tiny_adapter(base, tmp_path / "adapter.safetensors")
    out = tmp_path / "builds"
    results = export_builds_isolated(base, (adapter, spec), "gguf:f32,gguf:f16,gguf:q8_0,gguf:q4_k_m,gguf-lora", out,
                            run_id="run-1", round=3, bounds=ParityBounds(**LOOSE_4BIT), progress=False)
    assert [r.target.name for r in results] == ["gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-lora-f16"]
    assert sorted(p.name for p in out.iterdir()) == sorted(r.target.name for r in results)
    for r in results:
        manifest = BuildManifest.read(r.path)
        manifest.verify(r.path)
        assert manifest == r.manifest
        assert (manifest.format, manifest.architecture, manifest.run_id, manifest.round) == (
            r.target.format, arch, "run-1", 3)
        assert manifest.adapter_sha256 is not None and len(manifest.base_model) == 64
        assert manifest.parity["tokenizer_match"] is True
        assert manifest.parity["tensor_types"]

    f32, f16, q8, q4, lora = (r.manifest.parity for r in results)
    assert f32["greedy_identical"] and f32["top1_agreement"] == 1.0
    # f16 rounding may flip a position whose top-2 logits are closer than that rounding: agreement
    # just below 1, and any greedy divergence only at such a near-tie (within the measured error).
    assert f16["top1_agreement"] >= 0.99
    assert all(m <= f16["rel_logit_diff"] for m in f16["greedy_divergence_margins"])
    assert f32["rel_logit_diff"] < 2e-3 and f16["rel_logit_diff"] < 1e-2
    # q8_0 within the default 8-bit bounds; q4_k_m at least loads and reports its figures.
    assert q8["top1_agreement"] >= ParityBounds().min_top1_8bit
    assert q8["ppl_change"] <= ParityBounds().max_ppl_change_8bit
    assert 0.0 < q4["top1_agreement"] <= 1.0 and q4["ppl"] > 0
    # hidden 64 is not a multiple of 256: llama.cpp stores those rows in fallback types, and we say so.
    assert q4["kquant_fallback_tensors"] > 0 and "Q4_K" not in q4["tensor_types"]
    assert any("multiple of 256" in w for w in results[3].warnings)
    # The adapter alone on the unmerged base reproduces the merged build.
    lora_manifest = results[4].manifest
    assert lora_manifest.model_file == "adapter.gguf"
    assert {f.name for f in lora_manifest.files} == {"adapter.gguf", "base.gguf", "Modelfile"}
    base_file = next(f for f in lora_manifest.files if f.name == "base.gguf")
    assert lora_manifest.base_gguf == base_file.sha256
    assert lora["lora_vs_merged"]["greedy_identical"] and lora["greedy_identical"]
    assert lora["lora_vs_merged"]["rel_logit_diff"] < 1e-2


def test_true_k_quant_on_rows_of_256(tmp_path: Path) -> None:
    """hidden 256 / ffn 512 / grouped-query attention: q4_k_m really is Q4_K, no fallbacks."""
    base = tiny_checkpoint(tmp_path, "llama", config={
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False})
    adapter, spec = tiny_adapter(base, tmp_path / "adapter.safetensors", targets=("q_proj", "k_proj", "down_proj"))
    results = export_builds_isolated(base, (adapter, spec), "gguf:q4_k_m,gguf-lora:q8_0", tmp_path / "out",
                            bounds=ParityBounds(**LOOSE_4BIT), progress=False)
    q4 = results[0].manifest.parity
    assert q4["kquant_fallback_tensors"] == 0 and q4["tensor_types"].get("Q4_K", 0) > 0
    assert results[0].warnings == []
    lora = results[1].manifest.parity
    assert lora["tensor_types"].get("Q8_0", 0) > 0
    assert lora["lora_vs_merged"]["top1_agreement"] >= ParityBounds().min_top1_8bit
