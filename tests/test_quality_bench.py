"""The quality benchmark on a tiny world: every method runs for two seeds, and the report
(JSON, table, plot) says what a reader needs: scores per round, spread, bytes, time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from benchmarks.cotuning import METHODS, QualityConfig, run_quality_benchmark
from benchmarks.cotuning_world import NUM_CLIENTS, BenchWorld
from tests.support import build_tiny_world


def _tiny_bench_world(root: Path) -> BenchWorld:
    from common.ml.checkpoint import save_checkpoint
    from common.records import TaskRecord, read_jsonl, write_jsonl
    from cotune.demo.tiny import build_tiny_model

    world = build_tiny_world(root, num_clients=NUM_CLIENTS)
    tok = root / "tokenizer"
    het = [world.slm_dir,
           save_checkpoint(build_tiny_model("gpt2", "tiny", 384, seed=21), tok, root / "gpt2"),
           save_checkpoint(build_tiny_model("qwen2", "tiny", 384, seed=22), tok, root / "qwen2")]
    aux = read_jsonl(world.data["aux"])
    write_jsonl(root / "pool.jsonl", [TaskRecord(r.prompt, "", r.domain) for r in aux])
    return BenchWorld(root=root, tokenizer_dir=tok, llm_dir=world.llm_dir, slm_dir=world.slm_dir, het_slms=het,
                      aux=world.data["aux"], test=world.data["test"],
                      clients=[world.data[f"client_{k}"] for k in range(NUM_CLIENTS)],
                      client_tests=[world.data[f"client_{k}_test"] for k in range(NUM_CLIENTS)],
                      prompt_pool=root / "pool.jsonl", truth={r.prompt: r.response for r in aux})


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("bench")
    cfg = QualityConfig(out_dir=root / "out", seeds=(0, 1), rounds=2, threads=1, progress=False,
                        extra_params={"crosslm": {"prompts_per_domain": 2, "samples_per_prompt": 1,
                                                  "max_new_tokens": 6}})
    return run_quality_benchmark(cfg, world=_tiny_bench_world(root / "world")), root / "out"


def test_every_method_reports_every_round_for_every_seed(results) -> None:
    res, _ = results
    assert list(res["runs"]) == list(METHODS)
    for method, by_seed in res["runs"].items():
        assert sorted(by_seed) == ["0", "1"]
        for run in by_seed.values():
            assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
            for r in run["rounds"]:
                assert 0.0 <= r["slm"]["rougeL"] <= 1.0 and 0.0 <= r["slm"]["em"] <= 1.0
                assert set(r["slm"]["per_domain"]) == {"miri", "orkan", "tesh", "velish"}
                assert len(r["slm"]["devices"]) in (1, NUM_CLIENTS)
        summary = res["summary"][method]
        assert len(summary["slm_rougeL"]["values"]) == 2 and summary["slm_rougeL"]["std"] >= 0.0
        # Only the methods that touch the LLM report it.
        touches_llm = method in ("zero-shot", "fedcollm", "co-plms", "crosslm", "centralized")
        assert ("llm_rougeL" in summary) == touches_llm, method
    zero = [r["slm"]["rougeL"] for run in res["runs"]["zero-shot"].values() for r in run["rounds"]]
    assert len(set(zero)) == 1, "zero-shot must not change over rounds"


def test_bytes_and_time_tell_the_methods_apart(results) -> None:
    s = results[0]["summary"]
    for method in ("zero-shot", "standalone", "standalone-het", "centralized"):
        assert s[method]["bytes_up_per_round"]["mean"] == 0 and s[method]["bytes_down_first_round"]["mean"] == 0
    # FedAvg: the base SLM is downloaded once, then only adapters move.
    assert s["fedavg"]["bytes_down_first_round"]["mean"] > 2 * s["fedavg"]["bytes_down_later_rounds"]["mean"] > 0
    # Co-PLMs moves the proxy's adapter, CrossLM only scores (up) and text (down).
    assert s["co-plms"]["bytes_up_per_round"]["mean"] > 0
    assert 0 < s["crosslm"]["bytes_up_per_round"]["mean"] < s["fedavg"]["bytes_up_per_round"]["mean"] / 10
    for method in METHODS:
        if method != "zero-shot":
            assert s[method]["wall_s"]["mean"] > 0


def test_report_files(results) -> None:
    res, out = results
    saved = json.loads((out / "cotuning.json").read_text())
    assert saved["meta"]["summary"].keys() == res["summary"].keys()
    table = (out / "cotuning.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    assert "SLM Rouge-L per domain" in table and "CrossLM per round" in table
    assert (out / "cotuning.png").stat().st_size > 10_000


def test_unknown_methods_are_refused_before_any_work(tmp_path) -> None:
    from cotune.cli.bench_quality import bench_quality

    with pytest.raises(ValueError, match="fedprox"):
        run_quality_benchmark(QualityConfig(out_dir=tmp_path, methods=("fedavg", "fedprox")))
    with pytest.raises(typer.BadParameter):
        bench_quality(out=tmp_path, methods="fedavg,nope")
    assert not any(tmp_path.iterdir())
