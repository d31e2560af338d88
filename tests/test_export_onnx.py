"""ONNX builds (optimum, past key values): fp32 parity, int8 dynamic, int4 MatMulNBits with an untied head."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.manifest import BuildManifest
from export import ParityBounds, export_builds_isolated
from tests.test_export_support import LOOSE_4BIT, tiny_adapter, tiny_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")


def test_onnx_builds_of_a_tied_qwen2(tmp_path: Path) -> None:
    base = tiny_checkpoint(tmp_path, "qwen2", config={
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True})
    adapter, spec = tiny_adapter(base, tmp_path / "adapter.safetensors", targets=("q_proj", "v_proj"))
    results = export_builds_isolated(base, (adapter, spec), "onnx:fp32,onnx:int8,onnx:int4", tmp_path / "out",
                            bounds=ParityBounds(**LOOSE_4BIT), progress=False)
    fp32, int8, int4 = results
    for r in results:
        manifest = BuildManifest.read(r.path)
        manifest.verify(r.path)
        assert manifest.model_file == "model.onnx" and manifest.tokenizer_file == "tokenizer.json"
        assert (r.path / "tokenizer.json").is_file() and (r.path / "config.json").is_file()
    p = fp32.manifest.parity
    assert p["greedy_identical"] and p["rel_logit_diff"] < 1e-4
    assert int8.manifest.parity["top1_agreement"] >= ParityBounds().min_top1_8bit
    assert int4.manifest.parity["int4"] == {"bits": 4, "block_size": 32, "accuracy_level": 4, "head_bits": 8,
                                            "symmetric": False, "algorithm": "rtn"}
    assert int8.manifest.parity["int8"]["bits"] == 8
    assert int4.manifest.size_bytes < int8.manifest.size_bytes < fp32.manifest.size_bytes

    import onnx

    graph = onnx.load(str(int4.path / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops
    # Untied first: no float32 vocab x hidden matrix is left in the int4 graph (neither embedding nor head).
    big = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) in (
        [512, 64], [64, 512])]
    assert big == []
    # int8 is weight-only too: 8-bit MatMulNBits, activations left in float.
    int8_graph = onnx.load(str(int8.path / "model.onnx")).graph
    nbits = [n for n in int8_graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")
    assert not any(n.op_type == "DynamicQuantizeLinear" for n in int8_graph.node)
