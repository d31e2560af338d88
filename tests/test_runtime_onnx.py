"""The ONNX Runtime backend and the shared generation loop, on a tiny llama exported by optimum."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.manifest import BuildManifest

TEXTS = [f"the river lock {i} was opened at dawn and closed at dusk by keeper {i % 7}" for i in range(120)]


def make_tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import train_tokenizer
    from cotune.demo.tiny import build_tiny_model

    tokenizer = train_tokenizer(TEXTS, vocab_size=384)
    model = build_tiny_model("llama", "tiny", vocab_size=tokenizer.get_vocab_size(), seed=seed, max_positions=256)
    return save_checkpoint(model, tokenizer, root / "hf")


def make_onnx_build(hf: Path, root: Path) -> Path:
    """The checkpoint as an onnx:fp32 build, made by the exporter (parity gate included)."""
    from export.isolated import export_builds_isolated

    (result,) = export_builds_isolated(hf, None, "onnx:fp32", root / "builds", progress=False)
    return result.path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-onnx")
    hf = make_tiny_checkpoint(root)
    return {"hf": hf, "onnx": make_onnx_build(hf, root), "root": root}


@pytest.fixture(scope="module")
def model(tiny: dict[str, Path]):
    from edge_sdk import EdgeModel

    with EdgeModel.load(tiny["onnx"], threads=1) as m:
        yield m


def test_greedy_tokens_match_transformers(tiny: dict[str, Path], model) -> None:
    """Our KV-cache loop must produce exactly the tokens the torch model would."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny["hf"]).eval()
    for prompt in ["the river lock 3 was", "keeper 5 closed"]:
        ids = model.tokenize(prompt)
        ours = model.generate(prompt, max_tokens=24, ignore_eos=True)
        with torch.inference_mode():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               pad_token_id=0)
        assert ours.token_ids == out[0, len(ids):].tolist()
        assert ours.prompt_tokens == len(ids)


def test_chunked_prefill_gives_the_same_tokens(tiny: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    prompt = " ".join(TEXTS[:3])
    with EdgeModel.load(tiny["onnx"], threads=1, engine_options={"prefill_chunk": 5}) as chunked, \
            EdgeModel.load(tiny["onnx"], threads=1, engine_options={"prefill_chunk": 4096}) as whole:
        assert chunked.generate(prompt, 16).token_ids == whole.generate(prompt, 16).token_ids


def test_prefill_keeps_only_the_last_logits_and_they_match_the_full_graph(tiny: dict[str, Path]) -> None:
    """The exported graph's logits_to_keep input: the runtime asks for the last position only and
    gets the row the full head (its default, what optimum and the parity check see) gives there."""
    import numpy as np
    import onnx

    from edge_sdk.runtime.onnx_backend import OnnxBackend
    from export.parity import OnnxRunner

    path = tiny["onnx"] / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    assert "logits_to_keep" in {i.name for i in graph.input}
    backend = OnnxBackend(path, tiny["onnx"] / "tokenizer.json", threads=1)
    ids = backend.tokenize(" ".join(TEXTS[:2]))
    last = backend.prefill(ids)
    full = OnnxRunner(path, threads=1).logits(ids)  # feeds no logits_to_keep: every position
    assert full.shape[0] == len(ids)
    np.testing.assert_allclose(last, full[-1], rtol=1e-4, atol=1e-4)
    assert backend.info.extra["logits_kept"] == 1
    backend.close()


def test_generate_reports_counts_and_timings(model) -> None:
    r = model.generate("the river lock", max_tokens=12, ignore_eos=True)
    assert r.backend == "onnxruntime"
    assert r.completion_tokens == 12 and len(r.token_ids) == 12
    assert r.finish_reason == "length"
    t = r.timings
    assert 0 < t.prefill_s <= t.ttft_s <= t.total_s
    assert t.decoded_tokens == 11 and t.decode_s > 0 and t.decode_tok_s > 0
    assert r.to_dict()["completion_tokens"] == 12


def test_stream_yields_the_same_text_as_generate(model) -> None:
    full = model.generate("keeper 3 opened", max_tokens=30, ignore_eos=True)
    stream = model.stream("keeper 3 opened", max_tokens=30, ignore_eos=True)
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == full.text
    assert [c.token_id for c in chunks] == full.token_ids
    assert stream.result is not None and stream.result.token_ids == full.token_ids
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_stop_string_cuts_the_text_and_is_never_streamed(model) -> None:
    full = model.generate("the river lock", max_tokens=40, ignore_eos=True).text
    visible = [i for i, ch in enumerate(full) if ch.isprintable() and ch != "\ufffd"]
    assert len(visible) > 8, "the tiny model's text is too short to pick a stop string from"
    start = visible[len(visible) // 2]
    stop = full[start: start + 2]
    cut = full[: full.index(stop)]
    result = model.generate("the river lock", max_tokens=40, stop=[stop], ignore_eos=True)
    assert result.finish_reason == "stop" and result.stop_string == stop
    assert result.text == cut
    streamed = "".join(c.text for c in model.stream("the river lock", max_tokens=40, stop=stop, ignore_eos=True))
    assert streamed == cut and stop not in streamed


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model) -> None:
    greedy = model.generate("keeper", max_tokens=16, ignore_eos=True).token_ids
    a = model.generate("keeper", max_tokens=16, temperature=1.5, seed=7, ignore_eos=True).token_ids
    b = model.generate("keeper", max_tokens=16, temperature=1.5, seed=7, ignore_eos=True).token_ids
    c = model.generate("keeper", max_tokens=16, temperature=1.5, seed=8, ignore_eos=True).token_ids
    assert a == b
    assert a != c or a != greedy  # an untrained model is near uniform: samples differ
    nucleus = model.generate("keeper", max_tokens=16, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)
    assert nucleus.token_ids == greedy


def test_end_of_sequence_ends_generation(model, monkeypatch: pytest.MonkeyPatch) -> None:
    first = model.generate("keeper", max_tokens=3, ignore_eos=True).token_ids
    monkeypatch.setattr(model._backend, "_eos", frozenset({first[1]}))
    r = model.generate("keeper", max_tokens=10)
    assert r.finish_reason == "eos"
    assert r.token_ids == first[:1]  # the end token itself is not part of the answer
    assert r.timings.decoded_tokens == 1  # but it was computed


def test_confidence_tracking(model) -> None:
    r = model.generate("keeper", max_tokens=6, track_confidence=True, ignore_eos=True)
    assert r.entropies is not None and len(r.entropies) == 6
    assert all(e >= 0 for e in r.entropies)
    assert r.mean_entropy is not None and r.mean_neg_logprob is not None and r.mean_neg_logprob > 0


def test_prompt_longer_than_the_context_is_a_clear_error(tiny: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ContextOverflowError

    with EdgeModel.load(tiny["onnx"], n_ctx=32, threads=1) as small:
        long_prompt = " ".join(TEXTS[:6])
        with pytest.raises(ContextOverflowError, match=r"prompt is \d+ tokens long but the context holds 32"):
            small.generate(long_prompt)
        # A prompt that fits but leaves little room stops at the context's end, not with an error.
        ids = small.tokenize(TEXTS[0])[:28]
        r = small.generate(ids, max_tokens=50, ignore_eos=True)
        assert r.finish_reason == "context" and r.prompt_tokens + r.completion_tokens == 32
    with pytest.raises(ContextOverflowError, match="256 positions"):
        EdgeModel.load(tiny["onnx"], n_ctx=100000)


def test_no_torch_or_transformers_on_the_onnx_path(tiny: dict[str, Path]) -> None:
    script = textwrap.dedent(f"""
        import json, sys
        from edge_sdk import EdgeModel
        model = EdgeModel.load({str(tiny["onnx"])!r}, threads=1)
        result = model.generate("the river lock", max_tokens=8, stop=["zz"])
        chunks = list(model.stream("keeper", max_tokens=4))
        heavy = [m for m in ("torch", "transformers", "optimum") if m in sys.modules]
        print(json.dumps({{"heavy": heavy, "tokens": result.completion_tokens, "chunks": len(chunks)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["tokens"] >= 1 and report["chunks"] >= 1


# -- bad builds --------------------------------------------------------------------------------


def _copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_model_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ModelFileError

    build = _copy_build(tiny["onnx"], tmp_path / "b")
    (build / "model.onnx").unlink()
    with pytest.raises(ModelFileError, match="model.onnx is missing.*Fetch the build again"):
        EdgeModel.load(build)


def test_truncated_model_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ModelFileError

    build = _copy_build(tiny["onnx"], tmp_path / "b")
    data = (build / "model.onnx").read_bytes()
    (build / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="bytes but the manifest says"):
        EdgeModel.load(build)


def test_corrupt_model_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Same size, garbage bytes: sha256 verification catches it, and so does the engine."""
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ModelFileError

    build = _copy_build(tiny["onnx"], tmp_path / "b")
    size = (build / "model.onnx").stat().st_size
    (build / "model.onnx").write_bytes(b"\x07garbage" * (size // 8) + b"\0" * (size % 8))
    with pytest.raises(ModelFileError, match="does not match the sha256"):
        EdgeModel.load(build, verify="sha256")
    with pytest.raises(ModelFileError, match="ONNX Runtime could not load"):
        EdgeModel.load(build, verify="size")


def test_missing_manifest_and_adapter_build(tiny: dict[str, Path], tmp_path: Path) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import ModelFileError, UnsupportedBuildError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="has no manifest.json"):
        EdgeModel.load(empty)
    build = _copy_build(tiny["onnx"], tmp_path / "lora")
    manifest = BuildManifest.read(build)
    manifest.format = "gguf-lora"
    manifest.base_gguf = "a" * 64
    manifest.write(build)
    with pytest.raises(UnsupportedBuildError, match="LoRA adapter build without its base model"):
        EdgeModel.load(build)
    with pytest.raises(UnsupportedBuildError, match="cannot run a onnx build"):
        EdgeModel.load(tiny["onnx"], backend="llama.cpp")


def test_graph_without_kv_cache_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A graph exported without past key values would recompute everything per token."""
    import onnx
    from onnx import TensorProto, helper

    from edge_sdk import EdgeModel
    from edge_sdk.runtime import UnsupportedBuildError

    build = _copy_build(tiny["onnx"], tmp_path / "nokv")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 8])
    table = helper.make_tensor("table", TensorProto.FLOAT, [16, 8], [0.0] * 128)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["logits"])], "g", [ids], [logits],
                              [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), build / "model.onnx")
    with pytest.raises(UnsupportedBuildError, match="no past_key_values inputs.*text-generation-with-past"):
        EdgeModel.load(build, verify="none")


def test_bad_prompt_ids_and_settings(model) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([1, 99999], max_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("x", top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate("x", max_tokens=0)
