"""`cotune bench quant` on the tiny model: each variant is built, gated and timed, and the report
says which pass; the weight-only 8-bit build onnx:int8 now makes passes the exporter's gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_quantization_benchmark_measures_each_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.quantization import QuantConfig, run_quantization

    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))
    cfg = QuantConfig(models=("tiny",), variants=("dynamic-int8", "w8-b32", "w4-b32"), runs=1, threads=1,
                      prompt_tokens=32, decode_tokens=8, out_dir=tmp_path / "out", gguf_quants=("q8_0",))
    paths = run_quantization(cfg, log=lambda _msg: None)
    rows = {r["variant"]: r for r in json.loads(paths["json"].read_text())["rows"]}
    assert set(rows) == {"dynamic-int8", "w8-b32", "w4-b32", "gguf-q8_0"}
    for row in rows.values():
        assert 0.0 <= row["top1"] <= 1.0 and row["decode_tok_s"] > 0 and row["size_bytes"] > 0
    w8, w4 = rows["w8-b32"], rows["w4-b32"]
    assert w8["default_gate"] and w8["top1"] >= 0.95, w8
    assert w4["size_bytes"] < w8["size_bytes"]
    assert rows["gguf-q8_0"]["format"] == "gguf" and rows["gguf-q8_0"]["bits"] == 8
    assert "w8-b32" in paths["md"].read_text() and paths["png"].read_bytes()[:4] == b"\x89PNG"
    # A variant's build is cached: a second run quantizes nothing again.
    stamp = tmp_path / "cache" / "bench" / "tiny-v2" / "quant" / "w8-b32" / "variant.json"
    before = stamp.stat().st_mtime_ns
    run_quantization(QuantConfig(models=("tiny",), variants=("w8-b32",), runs=1, threads=1, prompt_tokens=32,
                                 decode_tokens=8, out_dir=tmp_path / "out2", gguf_quants=()), log=lambda _m: None)
    assert stamp.stat().st_mtime_ns == before
