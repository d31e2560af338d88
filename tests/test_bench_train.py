"""The training benchmark (benchmarks/training.py) end to end on the tiny model, and the opt-in
training optimizations it measures (length bucketing, fused AdamW, labelled logits, chunked loss,
gradient checkpointing)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest


def test_bench_train_writes_json_markdown_and_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.training import TrainBenchConfig, run_training_benchmark

    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))  # the worker processes inherit it
    out = tmp_path / "train"
    paths = run_training_benchmark(TrainBenchConfig(
        models=["tiny"], engines=["cotune", "hf-trainer"], steps=2, repeats=1, threads=1, out_dir=out,
        memory_search=True, search_model="tiny", search_ranks=[4], search_lens=[64], search_modes=["default"]),
        log=lambda line: None)
    assert {p.name for p in paths.values()} == {"training.json", "training.md", "training.png"}
    assert paths["png"].stat().st_size > 10_000
    report = json.loads(paths["json"].read_text())
    assert report["machine"]["cpu_count"] >= 1 and len(report["machine"]["load_average"]) == 3
    assert report["meta"]["threads"] == 1
    rows = {r["engine"]: r for r in report["rows"]}
    assert set(rows) == {"cotune", "hf-trainer"}
    for row in rows.values():
        assert row["model"] == "tiny" and row["steps"] == 2 and row["repeats"] == 1
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["torch_threads"] == 1
        assert 100 < row["peak_rss_mib"] < 4096 and 0 <= row["padding_fraction"] < 1
        assert len(row["loss_curve"]) == 2 and all(math.isfinite(x) for x in row["loss_curve"])
        assert math.isfinite(row["eval_loss"])
    # Same model, batches, init and optimizer: the two trainers' losses agree step by step.
    assert rows["cotune"]["max_step_delta"] < 1e-3
    assert rows["cotune"]["vs_hf_tokens"] > 0
    search = report["memory_search"]
    assert search["model"] == "tiny" and search["budget_mib"] == 2048
    [cell] = search["cells"]
    assert (cell["mode"], cell["r"], cell["seq"], cell["fits"]) == ("default", 4, 64, True)
    assert search["largest"]["default"]["largest_rank"] == {"r": 4, "seq": 64, "peak_rss_mib": cell["peak_rss_mib"]}
    md = paths["md"].read_text()
    assert "| tiny | cotune |" in md and "| tiny | hf-trainer |" in md and "peak RSS MiB" in md
    assert "Largest LoRA rank and sequence length within 2048 MiB" in md


def test_bench_train_refuses_unknown_models_and_engines() -> None:
    from benchmarks.training import TrainBenchConfig

    with pytest.raises(ValueError, match="unknown models.*choose from tiny, gemma"):
        TrainBenchConfig(models=["llama-70b"]).check()
    with pytest.raises(ValueError, match="unknown engines"):
        TrainBenchConfig(engines=["unsloth"]).check()
    with pytest.raises(ValueError, match="steps must be >= 2"):
        TrainBenchConfig(steps=1).check()
    with pytest.raises(ValueError, match="unknown memory modes"):
        TrainBenchConfig(memory_search=True, search_modes=["tiny-ram"]).check()


def test_cli_bench_train_names_the_bad_option() -> None:
    from typer.testing import CliRunner

    from cotune.cli.main import app

    result = CliRunner().invoke(app, ["bench", "train", "--models", "tiny,nano"])
    assert result.exit_code != 0
    assert "unknown models ['nano']" in result.output


# -- length bucketing -----------------------------------------------------------------------------


def _examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [{"input_ids": [i] * rng.randint(3, 40), "labels": [i]} for i in range(n)]


def _ids(batches: list[list[dict[str, Any]]]) -> list[int]:
    return [ex["input_ids"][0] for batch in batches for ex in batch]


def _padding(batches: list[list[dict[str, Any]]]) -> int:
    return sum(max(len(ex["input_ids"]) for ex in b) * len(b) - sum(len(ex["input_ids"]) for ex in b)
               for b in batches)


def test_bucketing_keeps_every_example_once_in_batches_of_the_same_sizes() -> None:
    from common.ml.batching import iterate_batches, training_batches

    examples = _examples(103)
    plain = list(iterate_batches(examples, 8, seed=3, epochs=2.0))
    bucketed = list(training_batches(examples, 8, seed=3, epochs=2.0, bucket_window=4))
    assert Counter(_ids(bucketed)) == Counter(_ids(plain)) == Counter({i: 2 for i in range(103)})
    assert sorted(len(b) for b in bucketed) == sorted(len(b) for b in plain)
    assert _padding(bucketed) < _padding(plain) / 2
    # Each example stays in the window of 4 batches (32 examples of the stream) it was drawn in.
    for w in range(0, len(plain), 4):
        assert Counter(_ids(bucketed[w:w + 4])) == Counter(_ids(plain[w:w + 4]))


def test_bucketing_is_deterministic_by_seed_and_off_by_default() -> None:
    from common.ml.batching import iterate_batches, training_batches

    examples = _examples(64)
    one = _ids(list(training_batches(examples, 4, seed=1, epochs=1.0, bucket_window=8)))
    assert one == _ids(list(training_batches(examples, 4, seed=1, epochs=1.0, bucket_window=8)))
    assert one != _ids(list(training_batches(examples, 4, seed=2, epochs=1.0, bucket_window=8)))
    assert _ids(list(training_batches(examples, 4, seed=1, epochs=1.0, max_steps=5))) == _ids(
        list(iterate_batches(examples, 4, seed=1, epochs=1.0, max_steps=5)))


def test_bucketing_refuses_an_empty_window() -> None:
    from common.ml.batching import bucket_batches

    with pytest.raises(ValueError, match="bucket window must be >= 1"):
        list(bucket_batches([[{"input_ids": [1]}]], 0, seed=0))


# -- the opt-in optimizations, on the tiny world ----------------------------------------------------


def _train(world: Any, options: Any, steps: int = 3) -> tuple[list[float], dict[str, Any]]:
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, attach_lora
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec
    from common.records import read_jsonl

    model, tokenizer = load_checkpoint(world.slm_dir)
    model = attach_lora(model, LoraSpec(r=4, alpha=8.0), seed=0)
    losses: list[float] = []
    train_lora(model, tokenizer, read_jsonl(world.data["client_0"]),
               TrainSpec(epochs=1.0, lr=3e-3, batch_size=8, max_len=40, max_steps=steps), seed=0,
               progress=lambda step, total, loss: losses.append(loss), options=options)
    return losses, adapter_state(model)


def test_default_options_train_bit_for_bit_as_no_options(world: Any) -> None:
    from common.ml.train_options import TrainOptions

    losses, state = _train(world, None)
    same_losses, same_state = _train(world, TrainOptions())
    assert losses == same_losses
    assert state.keys() == same_state.keys() and all(state[k].equal(same_state[k]) for k in state)


@pytest.mark.parametrize("kwargs", [
    {"labelled_logits": True}, {"loss_chunk": 3}, {"gradient_checkpointing": True},
    {"optimizer": "foreach"}, {"optimizer": "fused"},
    {"labelled_logits": True, "loss_chunk": 5, "gradient_checkpointing": True, "optimizer": "fused"},
])
def test_optimizations_keep_the_loss_on_the_same_batches(world: Any, kwargs: dict[str, Any]) -> None:
    from common.ml.train_options import TrainOptions

    reference, ref_state = _train(world, None)
    losses, state = _train(world, TrainOptions(**kwargs))
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-5)
    for name, tensor in ref_state.items():
        assert state[name].allclose(tensor, rtol=1e-4, atol=1e-6), name


def test_train_options_refuse_bad_values() -> None:
    from common.ml.train_options import TrainOptions

    with pytest.raises(ValueError, match="optimizer must be one of default, foreach, fused"):
        TrainOptions(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_window must be >= 1"):
        TrainOptions(bucket_window=0)
    with pytest.raises(ValueError, match="loss_chunk must be >= 1"):
        TrainOptions(loss_chunk=0)
    assert TrainOptions().describe() == "defaults"
    assert TrainOptions(bucket_window=8, optimizer="fused").describe() == "bucket 8, fused AdamW"


def test_memory_search_stops_at_the_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The grid's early stops and the largest fits, with peak memory given as a formula of (r, seq)."""
    import benchmarks.training as training
    from benchmarks.training import TrainBenchConfig
    from benchmarks.training_memory import run_memory_search

    tried: list[tuple[int, int]] = []

    def fake_worker(spec: dict[str, Any], out_dir: Path, timeout_s: float) -> dict[str, Any]:
        r, seq = spec["lora"]["r"], spec["max_len"]
        tried.append((r, seq))
        assert spec["long"] and spec["batch_size"] == 1 and spec["lora"]["alpha"] == 2 * r
        peak = 300 + r + seq if r < 64 else 5000
        return {"peak_rss_mib": peak, "train_peak_rss_mib": peak, "ready_rss_mib": 300, "step_s": 0.1,
                "tokens_per_s": 10.0, "options": "defaults"}

    monkeypatch.setattr(training, "run_worker", fake_worker)
    monkeypatch.setattr("benchmarks.training_memory.checkpoint", lambda key, log: tmp_path)
    cfg = TrainBenchConfig(memory_search=True, search_model="tiny", search_ranks=[8, 64, 128],
                           search_lens=[128, 256, 512, 1024], search_modes=["default"], budget_mib=700,
                           out_dir=tmp_path)
    found = run_memory_search(cfg, threads=1, log=lambda line: None)
    # r=8 stops after the first length past the budget; r=64 is past it at once, so r=128 is not tried.
    assert tried == [(8, 128), (8, 256), (8, 512), (64, 128)]
    status = {(c["r"], c["seq"]): c["status"] for c in found["cells"]}
    assert status[(8, 1024)].startswith("skipped: a shorter sequence")
    assert status[(128, 512)].startswith("skipped: a smaller rank")
    largest = found["largest"]["default"]
    assert largest["longest_seq_by_rank"] == {"8": 256}
    assert largest["largest_rank"] == {"r": 8, "seq": 256, "peak_rss_mib": 564}
    assert "largest rank r=8" in found["summary"][0]


def test_memory_modes_reach_the_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import benchmarks.training as training
    from benchmarks.training import TrainBenchConfig
    from benchmarks.training_memory import run_memory_search

    specs: list[dict[str, Any]] = []

    def fake_worker(spec: dict[str, Any], out_dir: Path, timeout_s: float) -> dict[str, Any]:
        specs.append(spec)
        return {"peak_rss_mib": 1000.0, "step_s": 0.1, "options": "x"}

    monkeypatch.setattr(training, "run_worker", fake_worker)
    monkeypatch.setattr("benchmarks.training_memory.checkpoint", lambda key, log: tmp_path)
    run_memory_search(TrainBenchConfig(memory_search=True, search_ranks=[8], search_lens=[128],
                                       search_modes=["default", "chunked-loss+checkpointing+mmap"], out_dir=tmp_path),
                      threads=1, log=lambda line: None)
    assert [(s["options"], s["env"]) for s in specs] == [
        ({}, {}),
        ({"labelled_logits": True, "loss_chunk": 32, "gradient_checkpointing": True},
         {"MALLOC_MMAP_THRESHOLD_": "65536"})]
