"""CrossLM over the real REST path: the LLM's synthetic samples go down, only scores come up,
the selected samples come back down; devices of any architecture or tokenizer can join."""

from __future__ import annotations

import json

import httpx
import pytest

from common.checkpoint import describe_local_slm
from common.methods.contract import LLM_PREFIX
from common.methods.crosslm import SELECTED, SYNTHETIC, samples_from_bytes
from tests.hetero_support import HetSlms, build_het_slms, device_build, run_devices
from tests.support import CoordinatorProcess, TinyWorld, build_tiny_world, run_spec


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("world3"), num_clients=3)


@pytest.fixture(scope="module")
def slms(world3, tmp_path_factory) -> HetSlms:
    return build_het_slms(world3, tmp_path_factory.mktemp("slms"))


def _spec(world: TinyWorld, **params) -> dict:
    # Threshold 0: untrained models score everything near 0, and the test wants a selection.
    return run_spec(world, name="crosslm", algorithm="crosslm", rounds=2, min_clients=3,
                    params={"prompts_per_domain": 3, "samples_per_prompt": 2, "max_new_tokens": 8,
                            "threshold": 0.0, **params})


def test_heterogeneous_devices_complete_crosslm_rounds(world3, slms, tmp_path) -> None:
    coord = CoordinatorProcess(tmp_path / "coord", run=_spec(world3)).start()
    try:
        status = run_devices(coord, world3, [None, slms.gpt2, slms.qwen2_own_tok], tmp_path)
        blobs = {}
        for r in status["rounds"]:
            for a in r["artifacts"]:
                if a["name"] in (SYNTHETIC, SELECTED):
                    data = httpx.get(f"{coord.url}/v1/artifacts/{a['sha256']}", headers=coord.admin, timeout=30)
                    blobs[(r["round"], a["name"])] = samples_from_bytes(data.content)
    finally:
        coord.stop()

    assert status["state"] == "finished", status.get("error")
    rounds = [r for r in status["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["state"] == "closed" and r["num_updates"] == 3
        stats = r["metrics"]["crosslm"]
        assert stats["samples"] > 0 and stats["scored"] == stats["samples"]
        assert stats["selected"] > 0 and "llm_weighted" in stats and "llm_sft" in stats
        clients = list(r["metrics"]["clients"].values())
        assert sorted(c["client_metrics"]["slm_arch"] for c in clients) == ["gpt2", "llama", "qwen2"]
        for c in clients:
            # Two float32 scores per synthetic sample and a header: no weights leave a device.
            assert c["bytes_up"] < 8 * stats["samples"] + 1024
    # Round 2 trains on what round 1 selected (one best answer per prompt at most).
    r2_clients = rounds[1]["metrics"]["clients"].values()
    assert all(c["client_metrics"]["selected_used"] == rounds[0]["metrics"]["crosslm"]["selected"]
               for c in r2_clients)
    # A round's outputs hold what it selected and the synthetic set written for the next round.
    selected = blobs[(2, SELECTED)]
    assert len({s.group for s in selected}) == len(selected)
    assert all(s.score is not None and s.score >= 0.0 for s in selected)
    scored_in_round_2 = {(s.record.prompt, s.record.response) for s in blobs[(1, SYNTHETIC)]}
    assert {(s.record.prompt, s.record.response) for s in selected} <= scored_in_round_2

    first_llm = rounds[0]["metrics"]["llm"]
    assert 0.0 <= first_llm["rougeL"] <= 1.0
    for k, arch in enumerate(("llama", "gpt2", "qwen2")):
        out = tmp_path / f"device-{k}" / "final"
        held = json.loads((out / "final.json").read_text())
        assert held["rounds_trained"] == [1, 2]
        seen = [a["name"] for a in held["artifacts"]]
        assert not any(name.startswith(LLM_PREFIX + "/") for name in seen), "a device saw the LLM's adapter"
        assert json.loads((out / "slm" / "config.json").read_text())["model_type"] == arch
        assert (out / "slm" / "adapter.safetensors").is_file()


def test_devices_build_their_own_slm_when_the_run_asks(world3, slms, tmp_path) -> None:
    pytest.importorskip("llama_cpp", reason="the export extra (llama-cpp-python) is not installed")
    spec = _spec(world3)
    spec.update(name="crosslm-builds", rounds=1, min_clients=2, builds=["gguf:f32"])
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        status = run_devices(coord, world3, [None, slms.qwen2], tmp_path)
    finally:
        coord.stop()
    assert status["state"] == "finished", status.get("error")
    archs = [device_build(tmp_path, k) for k in range(2)]
    assert [m.architecture if m else None for m in archs] == ["llama", "qwen2"]


def test_crosslm_join_and_spec_checks(world3, slms, tmp_path) -> None:
    spec = _spec(world3, allowed_archs=["llama", "qwen2"])
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        token = coord.run["enroll_token"]
        headers = {"Authorization": f"Bearer {token}"}
        def register(slm) -> httpx.Response:
            body = {"name": "d", "task_kinds": ["crosslm"],
                    "slm": None if slm is None else json.loads(describe_local_slm(slm).model_dump_json())}
            return httpx.post(f"{coord.url}/v1/clients", json=body, headers=headers, timeout=30)

        refused = register(slms.gpt2)
        assert refused.status_code == 409 and "gpt2" in refused.json()["detail"]["message"]
        # Another tokenizer is fine for CrossLM: only text and scores cross the network.
        assert register(slms.qwen2_own_tok).status_code == 201
        assert register(None).status_code == 201
        bad = dict(spec, name="crosslm-dp", privacy={"clip_norm": 1.0, "noise_multiplier": 1.0})
        r = httpx.post(f"{coord.url}/v1/runs", json=bad, headers=coord.admin, timeout=60)
        assert r.status_code == 422 and "privacy" in r.json()["detail"]["message"]
        lora_build = dict(spec, name="crosslm-lora-build", builds=["gguf-lora"])
        r = httpx.post(f"{coord.url}/v1/runs", json=lora_build, headers=coord.admin, timeout=60)
        assert r.status_code == 422 and "not gguf-lora" in r.json()["detail"]["message"]
        no_llm = dict(spec, name="crosslm-no-llm", llm=None)
        r = httpx.post(f"{coord.url}/v1/runs", json=no_llm, headers=coord.admin, timeout=60)
        assert r.status_code == 422 and "LLM" in r.json()["detail"]["message"]
    finally:
        coord.stop()


def test_selection_and_likelihood_weights() -> None:
    from cloud.strategies.crosslm import likelihood_weights, selection

    groups = [0, 0, 0, 1, 1, 2]
    scores = [0.1, 0.7, 0.6, 0.3, float("nan"), 0.9]
    assert selection(groups, scores, 0.5, best_per_prompt=True) == [1, 5]
    assert selection(groups, scores, 0.5, best_per_prompt=False) == [1, 2, 5]
    assert selection(groups, scores, 0.95, best_per_prompt=True) == []
    weights = likelihood_weights(scores, power=2.0)
    assert weights[4] == 0.0 and abs(sum(weights) / len(weights) - 1.0) < 1e-9
    assert weights[5] > weights[1] > weights[3] > weights[0]


def test_device_scores_prefer_what_its_slm_learned(world3) -> None:
    """A device's score is higher for an answer its SLM learned than for a wrong one, and its
    weight is its share of data in the sample's domain."""
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import attach_lora
    from common.ml.scoring import plausibility
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec
    from common.records import TaskRecord, read_jsonl
    from edge_sdk.handlers.crosslm import domain_weights

    records = read_jsonl(world3.data["client_0"])[:8]
    model, tok = load_checkpoint(world3.slm_dir)
    model = attach_lora(model, LoraSpec(r=8, alpha=16), seed=0)
    train_lora(model, tok, records, TrainSpec(epochs=40, lr=1e-2, batch_size=8, max_len=40), seed=0)
    wrong = [TaskRecord(r.prompt, " ".join(reversed(r.response.split())) + " x", r.domain) for r in records]
    right_scores, wrong_scores = plausibility(model, tok, records, 40), plausibility(model, tok, wrong, 40)
    assert all(0.0 <= s <= 1.0 for s in right_scores + wrong_scores)
    assert sum(r > w for r, w in zip(right_scores, wrong_scores, strict=True)) >= 7

    mine = [TaskRecord("p", "r", "velish")] * 3 + [TaskRecord("p", "r", "orkan")]
    samples = [TaskRecord("q", "a", "velish"), TaskRecord("q", "a", "miri"), TaskRecord("q", "a", None)]
    assert domain_weights(mine, samples, enabled=True) == [0.75, 0.0, 1.0]
    assert domain_weights(mine, samples, enabled=False) == [1.0, 1.0, 1.0]
