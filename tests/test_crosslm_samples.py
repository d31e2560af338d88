"""CrossLM with `params.synthesis = "samples"`: the LLM writes task inputs and answers from
per-domain instructions, devices score each sample with their own SLM, the best are selected."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.inprocess import Device, run_inprocess
from cloud.store import BlobStore
from cloud.strategies import strategy_class
from cloud.strategies.base import SpecError
from cloud.training.synthesis import build_samples, split_sample
from common.methods.crosslm import SELECTED, SYNTHESIS_REPORT, SYNTHETIC, samples_from_bytes
from common.protocol import RunSpec
from common.records import TaskRecord, read_jsonl, write_jsonl
from tests.support import TinyWorld, run_spec

VELISH = TaskRecord("Translate to Velish:", "", "velish")
ORKAN = TaskRecord("Translate to Orkan:", "", "orkan")


def test_continuations_become_samples_or_are_dropped() -> None:
    assert split_sample("Translate to Velish:", " red fox\nrei fal") == ("Translate to Velish: red fox", "rei fal")
    # The answer runs to the end of the continuation (it was cut at <eos> or max tokens).
    assert split_sample("Q:", " a \n b\nc ") == ("Q: a", "b\nc")
    for malformed in (" red fox rei fal", "\nrei fal", "  \nrei fal", " red fox\n", " red fox\n  ", ""):
        assert split_sample("Translate to Velish:", malformed) is None, malformed

    continuations = [
        [" red fox\nrei fal", " red fox\nrei fal", " red fox\nrei fol", "no separator", " blue sky\nbu"],
        [" red fox\nkoru", "\nempty input"],
    ]
    samples, stats = build_samples([VELISH, ORKAN], continuations)
    assert stats == {"instructions": 2, "generated": 7, "well_formed": 5, "unique": 4}
    assert [(s.record.prompt, s.record.response, s.record.domain, s.group) for s in samples] == [
        ("Translate to Velish: red fox", "rei fal", "velish", 0),
        ("Translate to Velish: red fox", "rei fol", "velish", 0),  # same x: competes for "best per prompt"
        ("Translate to Velish: blue sky", "bu", "velish", 1),
        ("Translate to Orkan: red fox", "koru", "orkan", 2),
    ]


def test_samples_needs_instructions_and_continuations(world: TinyWorld, tmp_path: Path) -> None:
    cls = strategy_class("crosslm")

    def check(**params) -> None:
        cls.check_spec(RunSpec.model_validate(run_spec(world, algorithm="crosslm", params=params)))

    with pytest.raises(SpecError, match="params.prompt_data"):
        check(synthesis="samples")
    instructions = tmp_path / "instructions.jsonl"
    write_jsonl(instructions, [VELISH, ORKAN])
    with pytest.raises(SpecError, match="samples_per_prompt >= 1"):
        check(synthesis="samples", prompt_data=str(instructions), samples_per_prompt=0)
    with pytest.raises(SpecError, match="params.prompt_data"):
        check(synthesis="samples", prompt_data=str(tmp_path / "missing.jsonl"))
    check(synthesis="samples", prompt_data=str(instructions))


@pytest.fixture(scope="module")
def format_llm(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLM after a little full-sequence training on "prompt\\nresponse" texts, so that
    its continuations of an instruction hold an input, the separator and an answer."""
    import torch

    from common.ml.batching import _encode_text, _special_ids
    from common.ml.checkpoint import load_checkpoint, save_checkpoint

    model, tok = load_checkpoint(world.llm_dir)
    bos, eos, _ = _special_ids(tok)
    texts = [r.prompt + "\n" + r.response for k in range(2) for r in read_jsonl(world.data[f"client_{k}"])
             if r.prompt.startswith("Translate to")]
    encoded = [[bos, *_encode_text(tok, t), eos] for t in texts]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(90):
        batch = [encoded[(step * 8 + k) % len(encoded)] for k in range(8)]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return save_checkpoint(model, world.root / "tokenizer", tmp_path_factory.mktemp("format-llm") / "llm")


def device_reports(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Collects each update's device metrics as run_inprocess encodes it, in upload order."""
    import benchmarks.inprocess as inprocess

    reports: list[dict] = []
    encode = inprocess.encode_update

    def recording(payload, kind):
        reports.append(payload.metrics)
        return encode(payload, kind)

    monkeypatch.setattr(inprocess, "encode_update", recording)
    return reports


def test_a_samples_run_scores_and_selects_generated_samples(world: TinyWorld, format_llm: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    domains = sorted({r.domain for k in range(2) for r in read_jsonl(world.data[f"client_{k}"]) if r.domain})
    instructions = [TaskRecord(f"Translate to {d.capitalize()}:", "ignored", d) for d in domains]
    write_jsonl(tmp_path / "instructions.jsonl", instructions + instructions[:1])  # a repeat is drawn once
    params = {"synthesis": "samples", "prompt_data": str(tmp_path / "instructions.jsonl"), "prompts_per_domain": 2,
              "samples_per_prompt": 4, "temperature": 0.8, "max_new_tokens": 24, "threshold": 0.0}
    spec = RunSpec.model_validate(run_spec(world, name="samples", algorithm="crosslm", rounds=2,
                                           llm=str(format_llm), eval_data=None, params=params))
    store = BlobStore(tmp_path / "store")
    strategy = strategy_class("crosslm")(spec, store, None)
    devices = [Device(f"device-{k}", read_jsonl(world.data[f"client_{k}"]), tmp_path / f"device-{k}")
               for k in range(2)]

    reports = device_reports(monkeypatch)
    _final, history = run_inprocess(strategy, devices, 2, tmp_path / "work")

    for record, clients in zip(history, (reports[:2], reports[2:]), strict=True):
        stats = record.metrics["crosslm"]
        assert stats["instructions"] == len(domains)  # one of each, the repeat dropped
        assert stats["generated"] == 4 * len(domains)
        assert 0 < stats["unique"] <= stats["well_formed"] <= stats["generated"]
        # Every unique sample got the devices' scores, and the threshold of 0 selects.
        assert stats["samples"] == stats["scored"] == stats["unique"]
        assert 0 < stats["selected"] <= stats["unique"]
        names = {a.name for a in record.info.artifacts}
        assert SYNTHETIC in names and SYNTHESIS_REPORT not in names, "the counts are server-only"
        assert all(c["synthetic"] == stats["samples"] and c["score_mean"] is not None for c in clients)
    # The set scored in round 2 was written at the end of round 1, and counted there too.
    assert history[0].metrics["crosslm"]["next"]["unique"] == history[1].metrics["crosslm"]["unique"]
    # Round 2's devices train on round 1's selection: generated inputs with the LLM's answers.
    assert [c["selected_used"] for c in reports] == [0, 0] + [history[0].metrics["crosslm"]["selected"]] * 2
    selected = samples_from_bytes(store.read_bytes(history[0].outputs[SELECTED]))
    by_domain = {r.domain: r.prompt for r in instructions}
    for s in selected:
        x = s.record.prompt
        assert x.startswith(by_domain[s.record.domain]) and len(x) > len(by_domain[s.record.domain])
        assert "\n" not in x and s.record.response and s.score is not None
    assert len({s.group for s in selected}) == len(selected)  # best per generated input
