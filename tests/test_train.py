"""LoRA training learns, is reproducible, leaves the base alone; pretraining and greedy
evaluation behave as the demo and the coordinator rely on."""

from __future__ import annotations

import pytest
import torch

from common.ml.batching import _special_ids, collate, encode_sft
from common.ml.evaluate import evaluate, generate_greedy
from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
from common.ml.tokenizer import load_hf_tokenizer, save_tokenizer, train_tokenizer
from common.ml.train import _response_ce, train_lora
from common.protocol import LoraSpec, TrainSpec
from cotune.demo.synthetic import all_text, make_suite
from cotune.demo.tiny import build_tiny_model, pretrain

VOCAB = 512
SPEC = TrainSpec(epochs=20.0, lr=1e-2, batch_size=8, max_len=48, max_steps=25)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    suite = make_suite(num_clients=1, seed=0, per_client=24, public_size=32, aux_size=8)
    tok_dir = save_tokenizer(train_tokenizer(all_text(suite), VOCAB), tmp_path_factory.mktemp("t"))
    return suite, load_hf_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def base_state(world) -> dict[str, torch.Tensor]:
    # LoRA adapts a model that already knows the format, as on a real device: on a
    # random init, adapting attention alone barely moves the (random) output head.
    suite, tokenizer = world
    model = build_tiny_model("llama", "tiny", VOCAB, seed=0)
    pretrain(model, tokenizer, suite.public, steps=30, lr=1e-2, batch_size=8)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _mean_loss(model, tokenizer, records) -> float:
    batch = collate(encode_sft(tokenizer, records, 48), _special_ids(tokenizer)[2])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(_response_ce(logits, batch["labels"]))


def _fresh(state: dict[str, torch.Tensor] | None = None, seed: int = 0):
    model = build_tiny_model("llama", "tiny", VOCAB, seed=0)
    if state is not None:
        model.load_state_dict(state)
    return attach_lora(model, LoraSpec(r=4), seed=seed)


def test_train_lora_lowers_the_loss_and_only_touches_lora(world, base_state) -> None:
    suite, tokenizer = world
    records = suite.clients[0]
    model = _fresh(base_state)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    loss_before = _mean_loss(model, tokenizer, records)
    report = train_lora(model, tokenizer, records, SPEC, seed=0)
    loss_after = _mean_loss(model, tokenizer, records)
    assert loss_after < 0.85 * loss_before, (loss_before, loss_after)
    assert report["steps"] == 25 and report["num_samples"] == len(records)
    assert report["loss_last"] < report["loss_first"]
    assert set(report) == {"steps", "loss_first", "loss_last", "loss_mean", "num_samples", "seconds",
                           "truncated_records", "dropped_records"}
    assert (report["truncated_records"], report["dropped_records"]) == (0, 0)
    assert not model.training
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(base_before[name], param), name


def test_train_lora_is_deterministic_given_the_seed(world, base_state) -> None:
    suite, tokenizer = world
    spec = TrainSpec(epochs=1.0, lr=1e-2, batch_size=8, max_len=48)

    def run(seed: int) -> bytes:
        model = _fresh(base_state)
        train_lora(model, tokenizer, suite.clients[0], spec, seed=seed)
        return adapter_to_bytes(adapter_state(model))

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_train_lora_reports_progress_and_refuses_a_base_model(world) -> None:
    suite, tokenizer = world
    seen: list[tuple[int, int]] = []
    train_lora(
        _fresh(), tokenizer, suite.clients[0], TrainSpec(batch_size=8, max_steps=2), seed=0,
        progress=lambda step, total, loss: seen.append((step, total)),
    )
    assert seen == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="attach_lora"):
        train_lora(build_tiny_model("llama", "tiny", VOCAB), tokenizer, suite.clients[0], SPEC, 0)
    with pytest.raises(ValueError, match="no trainable records"):
        train_lora(_fresh(), tokenizer, [], SPEC, seed=0)


def test_pretrain_then_greedy_generation(world) -> None:
    suite, tokenizer = world
    model = build_tiny_model("llama", "tiny", VOCAB, seed=0)
    records = suite.public[:8]
    report = pretrain(model, tokenizer, records, steps=60, lr=1e-2, batch_size=8)
    assert report["steps"] == 60 and report["loss_last"] < 0.5 * report["loss_first"]
    prompts = [r.prompt for r in records]
    one_by_one = generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=8)
    # Left padding must not change the answers; answers are single lines.
    assert batched == one_by_one
    assert all("\n" not in a for a in batched)
    result = evaluate(model, tokenizer, records, max_new_tokens=12)
    assert result["n"] == len(records) and 0.0 <= result["em"] <= 1.0
    assert result["rougeL"] > 0.3, "a model trained on these very records recalls them"
    assert set(result["per_domain"]) == {r.domain for r in records}
