"""Tokenizer, SFT batching, tiny checkpoints and LoRA adapters (the bytes devices upload)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from common.ml.batching import collate, encode_sft, format_prompt, iterate_batches
from common.ml.checkpoint import load_checkpoint, save_checkpoint
from common.ml.lora import (
    adapter_from_bytes,
    adapter_state,
    adapter_to_bytes,
    attach_lora,
    load_adapter_state,
)
from common.ml.tokenizer import load_hf_tokenizer, save_tokenizer, train_tokenizer
from common.protocol import LoraSpec
from common.records import TaskRecord
from cotune.demo.synthetic import all_text, make_suite
from cotune.demo.tiny import build_tiny_model

VOCAB = 512


@pytest.fixture(scope="module")
def suite():
    return make_suite(num_clients=2, seed=0, per_client=40, public_size=40, aux_size=20)


@pytest.fixture(scope="module")
def tok_dir(suite, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tokenizer(
        train_tokenizer(all_text(suite), VOCAB), tmp_path_factory.mktemp("tok")
    )


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path):
    return load_hf_tokenizer(tok_dir)


def test_tokenizer_round_trips_and_loads_in_transformers(suite, tok_dir: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    raw = train_tokenizer(all_text(suite), VOCAB)
    assert [raw.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    for text in [suite.test[0].prompt, suite.test[0].response, "naïve ✓ 123\n  x", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert raw.decode(raw.encode(text).ids) == text
    assert raw.encode("fox").ids[0] == 1, "tokenizers-only devices get <bos> first too"
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["a", "a b c d"], padding=True)
    assert batch["input_ids"][0][0] == 0 and batch["attention_mask"][0][0] == 0
    assert "token_type_ids" not in batch


def test_encode_sft_masks_prompt_and_padding(tokenizer) -> None:
    records = [TaskRecord("Translate to Velish: red fox", "fele rireine"), TaskRecord("p", "r")]
    examples = encode_sft(tokenizer, records, max_len=64)
    for record, ex in zip(records, examples, strict=True):
        prompt_ids = tokenizer.encode(format_prompt(record.prompt), add_special_tokens=False)
        response_ids = tokenizer.encode(record.response, add_special_tokens=False)
        assert ex["input_ids"] == [1, *prompt_ids, *response_ids, 2]
        n_prompt = 1 + len(prompt_ids)
        assert ex["labels"] == [-100] * n_prompt + [*response_ids, 2]
    batch = collate(examples, pad_id=0)
    short = len(examples[1]["input_ids"])
    n_prompt_short = examples[1]["labels"].count(-100)
    row = batch["labels"][1]
    masked = (row == -100).nonzero().flatten().tolist()
    # -100 exactly on <bos> + prompt and on the right padding, nowhere else.
    expected = list(range(n_prompt_short)) + list(range(short, batch["input_ids"].shape[1]))
    assert masked == expected
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (len(row) - short)
    assert (batch["input_ids"][1, short:] == 0).all()


def test_encode_sft_truncates_and_drops_with_warning(tokenizer) -> None:
    long_prompt = "word " * 40
    records = [TaskRecord("short", "fele rireine"), TaskRecord(long_prompt, "x")]
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        examples = encode_sft(tokenizer, records, max_len=8)
    assert len(examples) == 1
    ex = examples[0]
    assert len(ex["input_ids"]) <= 8 and ex["input_ids"][0] == 1
    assert any(label != -100 for label in ex["labels"])


def test_iterate_batches_is_seeded_and_honours_fractional_epochs() -> None:
    items = list(range(10))
    a = list(iterate_batches(items, 4, seed=1, epochs=1.5))
    assert a == list(iterate_batches(items, 4, seed=1, epochs=1.5))
    assert a != list(iterate_batches(items, 4, seed=2, epochs=1.5))
    assert sum(len(b) for b in a) == 15 and len(a) == 4
    assert sorted(x for b in a for x in b)[:10] == items[:10] or set(a[0] + a[1]) <= set(items)
    first_epoch = [x for b in a for x in b][:10]
    assert sorted(first_epoch) == items, "each epoch is a permutation"
    assert len(list(iterate_batches(items, 4, seed=1, epochs=3.0, max_steps=2))) == 2
    assert len(list(iterate_batches(items, 4, seed=1, epochs=None, max_steps=7))) == 7


def test_checkpoint_round_trip_and_clear_errors(tok_dir: Path, tmp_path: Path) -> None:
    model = build_tiny_model("llama", "tiny", VOCAB, seed=0)
    assert not model.config.tie_word_embeddings
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        0,
        1,
        2,
    )
    out = save_checkpoint(model, tok_dir, tmp_path / "ckpt")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    save_checkpoint(model, tok_dir, out)  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temp dirs left"
    loaded, tok = load_checkpoint(out)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok.pad_token_id == 0
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_checkpoint(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_arch_builds_and_takes_lora(arch: str) -> None:
    model = build_tiny_model(arch, "tiny", VOCAB, seed=0)
    peft_model = attach_lora(model, LoraSpec(r=2), seed=0)
    state = adapter_state(peft_model)
    assert state and all("lora_" in name for name in state)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if arch == "gpt2":
        assert any("attn.c_attn.lora_A" in n for n in state)
        assert any("attn.c_proj.lora_A" in n for n in state)
        assert not any("mlp" in n for n in state)


def test_attach_lora_names_missing_targets() -> None:
    model = build_tiny_model("llama", "tiny", VOCAB)
    with pytest.raises(ValueError, match="query_key_value"):
        attach_lora(model, LoraSpec(target_modules=["query_key_value"]), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = attach_lora(model, LoraSpec(target_modules=["q_proj", "nope"]), seed=0)
    assert any("nope" in str(w.message) for w in caught)
    assert all(".q_proj." in n for n in adapter_state(peft_model))


def test_attach_lora_is_deterministic_given_seed() -> None:
    a = adapter_state(attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(), seed=3))
    b = adapter_state(attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(), seed=3))
    c = adapter_state(attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(), seed=4))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adapter_bytes_round_trip_exactly() -> None:
    peft_model = attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(r=4), seed=0)
    state = adapter_state(peft_model)
    for name in state:  # non-trivial values everywhere (B starts at zero)
        state[name] = torch.randn_like(state[name])
    meta = {"cotune.num_samples": "12", "note": "ü"}
    data = adapter_to_bytes(state, meta)
    assert data == adapter_to_bytes(state, meta), "same tensors give the same bytes (digest)"
    tensors, metadata = adapter_from_bytes(data)
    assert metadata == meta
    assert tensors.keys() == state.keys()
    for name, tensor in state.items():
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name], tensor)
    with pytest.raises(ValueError, match="safetensors"):
        adapter_from_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="safetensors"):
        adapter_from_bytes(b"\xff" * 8 + b"{}")


def test_load_adapter_state_is_strict() -> None:
    model = attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(r=4), seed=0)
    state = adapter_state(model)
    ids = torch.tensor([[1, 9, 10, 11]])
    with torch.no_grad():
        before = model(ids).logits
    new = {k: torch.randn_like(v) * 0.1 for k, v in state.items()}
    load_adapter_state(model, new)
    assert all(torch.equal(adapter_state(model)[k], new[k]) for k in new)
    with torch.no_grad():
        assert not torch.allclose(before, model(ids).logits)

    first = next(iter(state))
    missing = dict(state)
    del missing[first]
    with pytest.raises(ValueError, match="1 missing"):
        load_adapter_state(model, missing)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter_state(model, {**state, "base_model.model.extra.lora_A.weight": state[first]})
    other_r = adapter_state(
        attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(r=2), seed=0)
    )
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, other_r)
    with pytest.raises(ValueError, match="NaN"):
        load_adapter_state(model, {**state, first: torch.full_like(state[first], float("nan"))})
    # A rejected update left the model as it was.
    assert all(torch.equal(adapter_state(model)[k], new[k]) for k in new)
