"""`cotune edge generate`, `cotune edge bench` and the latency benchmark's parts, on a tiny ONNX build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.test_runtime_onnx import make_onnx_build, make_tiny_checkpoint


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    return make_onnx_build(make_tiny_checkpoint(root), root)


def _app() -> typer.Typer:
    from cotune.cli.edge_runtime import bench_latency, edge_bench, edge_generate

    app = typer.Typer()
    app.command("generate")(edge_generate)
    app.command("bench")(edge_bench)
    app.command("latency")(bench_latency)
    return app


def test_edge_generate_streams_text_and_reports(build: Path) -> None:
    result = CliRunner().invoke(_app(), ["generate", str(build), "the river lock", "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "[onnxruntime fp32]" in result.stderr and "generated tokens" in result.stderr
    assert "decode" in result.stderr and "finish: " in result.stderr


def test_edge_generate_json(build: Path) -> None:
    result = CliRunner().invoke(_app(), ["generate", str(build), "keeper", "--max-tokens", "5", "--json",
                                         "--temperature", "0.7", "--seed", "3", "--stop", "zz"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["backend"] == "onnxruntime" and payload["model"]["quantization"] == "fp32"
    assert 1 <= payload["completion_tokens"] <= 5 and payload["timings"]["ttft_s"] > 0


def test_edge_generate_bad_build_is_one_clear_error(tmp_path: Path) -> None:
    from edge_sdk.runtime import ModelFileError

    result = CliRunner().invoke(_app(), ["generate", str(tmp_path / "nowhere"), "hi"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ModelFileError)
    assert "does not exist" in str(result.exception) and "\n" not in str(result.exception)


def test_edge_bench_json(build: Path) -> None:
    result = CliRunner().invoke(_app(), ["bench", str(build), "--prompt-tokens", "32", "--decode-tokens", "8",
                                         "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["runs"] == 2 and figures["prompt_tokens"] == 32 and figures["generated"] == 8
    assert figures["decode_tok_s"] > 0 and figures["prefill_tok_s"] > 0 and figures["peak_rss_bytes"] > 0


def test_latency_worker_times_our_engine(build: Path) -> None:
    from benchmarks.latency import weight_bytes_per_token, worker
    from edge_sdk.runtime import EdgeModel
    from edge_sdk.runtime.bench import prompt_ids

    with EdgeModel.load(build) as model:
        ids = prompt_ids(model.tokenize, 40)
    assert len(ids) == 40
    figures = worker({"engine": "cotune", "format": "onnx", "build_dir": str(build), "threads": 1, "ids": ids,
                      "decode": 6, "runs": 2, "warmup": 1})
    assert figures["runs"] == 2 and figures["generated"] == 6 and figures["decode_tok_s"] > 0
    assert figures["load_s"] > 0 and figures["peak_rss_bytes"] > 0
    from benchmarks.latency import Build
    from common.manifest import BuildManifest

    per_token = weight_bytes_per_token(Build(BuildManifest.read(build), build))
    # The tiny model's untied input embedding is read one row per token, so it is left out.
    assert per_token is not None and 0 < per_token < (build / "model.onnx").stat().st_size


def test_bandwidth_probe() -> None:
    from benchmarks.latency import bandwidth_worker

    figures = bandwidth_worker(threads=1, megabytes=32, repeats=2)
    assert figures["read_bytes_per_s"] > 1e8


def test_report_writes_json_markdown_and_png(tmp_path: Path) -> None:
    from benchmarks.latency import _add_ratios, _target_notes
    from benchmarks.report import Column, Panel, write_report

    rows = [
        {"model": "m", "build": "gguf-q4_k_m", "format": "gguf", "engine": "cotune", "decode_tok_s": 49.0,
         "label": "m gguf cotune"},
        {"model": "m", "build": "gguf-q4_k_m", "format": "gguf", "engine": "llama-cpp-python", "decode_tok_s": 50.0,
         "label": "m gguf raw"},
        {"model": "m", "build": "onnx-fp32", "format": "onnx", "engine": "cotune", "decode_tok_s": 20.0,
         "label": "m onnx cotune"},
        {"model": "m", "build": "onnx-fp32", "format": "onnx", "engine": "optimum", "decode_tok_s": 16.0,
         "label": "m onnx optimum"},
        {"model": "m", "build": "torch-fp32", "format": "torch", "engine": "transformers", "label": "m torch",
         "error": "failed"},
    ]
    _add_ratios(rows)
    assert rows[0]["vs_raw"] == pytest.approx(0.98) and rows[2]["vs_raw"] == pytest.approx(1.25)
    notes = _target_notes(rows)
    assert any("within 3%" in n and "met" in n for n in notes)
    assert any("1.3x" in n and "missed" in n for n in notes)
    paths = write_report(tmp_path, "latency", "Test", rows,
                         [Column("label", "row"), Column("decode_tok_s", "decode", "{:.1f}"),
                          Column("vs_raw", "vs raw", "{:.2f}x")],
                         panels=[Panel("decode_tok_s", "decode tok/s")], color_key="engine", notes=notes)
    assert json.loads(paths["json"].read_text())["rows"][0]["vs_raw"] == pytest.approx(0.98)
    md = paths["md"].read_text()
    assert "| row | decode | vs raw |" in md and "| m gguf cotune | 49.0 | 0.98x |" in md and "| m torch | – |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_latency_benchmark_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole benchmark on the tiny model (fresh cache), reduced: every engine, one run."""
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    result = CliRunner().invoke(_app(), ["latency", "--model", "tiny", "--runs", "1", "--warmup", "0",
                                         "--prompt-tokens", "64", "--decode-tokens", "16", "--gguf-quant", "q8_0",
                                         "--onnx-quant", "fp32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "latency.json").read_text())["rows"]
    engines = {r["engine"] for r in rows if "decode_tok_s" in r}
    assert {"cotune", "optimum", "transformers"} <= engines
    assert (out / "latency.png").is_file() and (out / "latency.md").is_file()
