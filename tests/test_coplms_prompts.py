"""Co-PLMs with `params.saml_data = "private+prompts"`: the server publishes unlabelled
in-domain prompts and devices add them to mutual learning (KL only, on the SLM's answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.inprocess import Device, run_inprocess
from cloud.store import BlobStore
from cloud.strategies import strategy_class
from cloud.strategies.base import SpecError
from common.methods.coplms import SAML_PROMPTS, prompts_from_bytes
from common.protocol import RunSpec
from common.records import read_jsonl, write_jsonl
from tests.support import TinyWorld, run_spec
from tests.test_crosslm_samples import device_reports


def _spec(world: TinyWorld, **params) -> RunSpec:
    return RunSpec.model_validate(run_spec(world, name="coplms-prompts", algorithm="co-plms", rounds=1,
                                           eval_data=None, params={"init_distill_epochs": 0.0, **params}))


def test_the_option_and_its_prompts_come_together(world: TinyWorld, tmp_path: Path) -> None:
    cls = strategy_class("co-plms")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, read_jsonl(world.data["test"])[:4])
    cases = [({"saml_data": "private+prompts"}, "needs params.saml_prompts"),
             ({"saml_prompts": str(prompts)}, "only used with params.saml_data = 'private+prompts'"),
             ({"saml_data": "private+prompts", "saml_prompts": str(tmp_path / "missing.jsonl")},
              "params.saml_prompts"),
             ({"saml_data": "private+prompts", "saml_prompts": str(prompts), "saml_epochs": 0.0},
              "saml_epochs > 0")]
    for params, needle in cases:
        with pytest.raises(SpecError, match="saml") as info:
            cls.check_spec(_spec(world, **params))
        assert needle in str(info.value), (params, str(info.value))
    cls.check_spec(_spec(world, saml_data="private+prompts", saml_prompts=str(prompts)))


def test_devices_learn_from_the_published_prompts(world: TinyWorld, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = read_jsonl(world.data["test"])[:6]
    write_jsonl(tmp_path / "prompts.jsonl", source)
    spec = _spec(world, saml_data="private+prompts", saml_prompts=str(tmp_path / "prompts.jsonl"))
    store = BlobStore(tmp_path / "store")
    devices = [Device(f"device-{k}", read_jsonl(world.data[f"client_{k}"]), tmp_path / f"device-{k}")
               for k in range(2)]
    reports = device_reports(monkeypatch)

    _final, history = run_inprocess(strategy_class("co-plms")(spec, store, None), devices, 1, tmp_path / "work")

    published = {a.name: a for a in history[0].info.artifacts}
    assert SAML_PROMPTS in published, "devices were not offered the prompt set"
    data = store.read_bytes(published[SAML_PROMPTS].sha256)
    assert prompts_from_bytes(data) == [r.prompt for r in source]
    assert b"response" not in data, "the prompt set must carry no labels"
    for dev, metrics in zip(devices, reports, strict=True):
        saml = metrics["saml"]
        assert 0 < saml["prompts"] <= len(source)  # an empty greedy answer is skipped
        assert saml["num_samples"] == len(dev.records) + saml["prompts"]
    assert history[0].metrics["num_samples"] == sum(len(d.records) for d in devices), "weights stay private-data"


def test_private_saml_publishes_and_reports_no_prompts(world: TinyWorld, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [Device(f"device-{k}", read_jsonl(world.data[f"client_{k}"]), tmp_path / f"device-{k}")
               for k in range(2)]
    reports = device_reports(monkeypatch)
    _final, history = run_inprocess(strategy_class("co-plms")(_spec(world), BlobStore(tmp_path / "store"), None),
                                    devices, 1, tmp_path / "work")
    assert SAML_PROMPTS not in {a.name for a in history[0].info.artifacts}
    for dev, metrics in zip(devices, reports, strict=True):
        assert "prompts" not in metrics["saml"] and metrics["saml"]["num_samples"] == len(dev.records)


def test_kl_only_records_add_no_cross_entropy(world: TinyWorld) -> None:
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import attach_lora
    from common.ml.mutual import mutual_learning
    from common.protocol import DistillSpec, LoraSpec

    records = read_jsonl(world.data["client_0"])[:8]
    first, tok = load_checkpoint(world.slm_dir)
    second, _ = load_checkpoint(world.slm_dir)
    first, second = attach_lora(first, LoraSpec(r=4, alpha=8), seed=0), attach_lora(second, LoraSpec(r=4, alpha=8),
                                                                                     seed=1)
    spec = DistillSpec(epochs=1.0, lr=1e-3, batch_size=4, lambda_kd=1.0)
    report = mutual_learning(first, tok, second, tok, records, spec, seed=0, max_len=40, kl_only=[True] * 8)
    assert report["kl_only"] == 8 and report["first_ce_mean"] == 0.0 and report["second_ce_mean"] == 0.0
    assert report["first_kd_mean"] > 0.0
    mixed = mutual_learning(first, tok, second, tok, records, spec, seed=0, max_len=40,
                            kl_only=[False] * 4 + [True] * 4)
    assert mixed["kl_only"] == 4 and mixed["first_ce_mean"] > 0.0
    with pytest.raises(ValueError, match="flags"):
        mutual_learning(first, tok, second, tok, records, spec, seed=0, kl_only=[True])
