"""Co-PLMs over the real REST path: a coordinator process and three `cotune edge join` device
processes with SLMs of different architectures (and one with its own tokenizer); joins a
run cannot take are refused with a reason."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from common.checkpoint import describe_local_slm
from common.methods.contract import LLM_PREFIX
from common.methods.coplms import DPM_ADAPTER, PROXY_PREFIX
from common.protocol import ClientRegistration
from edge_sdk.client import CoordinatorClient, CoordinatorError
from tests.hetero_support import HetSlms, build_het_slms, device_build, run_devices
from tests.support import CoordinatorProcess, TinyWorld, build_tiny_world, run_spec


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("world3"), num_clients=3)


@pytest.fixture(scope="module")
def slms(world3, tmp_path_factory) -> HetSlms:
    return build_het_slms(world3, tmp_path_factory.mktemp("slms"))


def _spec(world: TinyWorld, **params) -> dict:
    return run_spec(world, name="coplms", algorithm="co-plms", rounds=2, min_clients=3,
                    params={"saml_epochs": 1.0, "dst_epochs": 1.0, **params})


def test_heterogeneous_devices_complete_co_plms_rounds(world3, slms, tmp_path) -> None:
    coord = CoordinatorProcess(tmp_path / "coord", run=_spec(world3)).start()
    try:
        # device-0 brings no SLM (it uses a private copy of the proxy's llama base), device-1 a
        # gpt2 on the run's tokenizer, device-2 a qwen2 with a tokenizer of its own.
        status = run_devices(coord, world3, [None, slms.gpt2, slms.qwen2_own_tok], tmp_path)
    finally:
        coord.stop()

    assert status["state"] == "finished", status.get("error")
    rounds = [r for r in status["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["state"] == "closed" and r["num_updates"] == 3
        assert r["metrics"]["distill"]["steps"] > 0, "the server did not distil between the LLM and the proxy"
        assert 0.0 <= r["metrics"]["dpm"]["rougeL"] <= 1.0 and "llm" in r["metrics"]
        clients = r["metrics"]["clients"].values()
        archs = sorted(c["client_metrics"]["slm_arch"] for c in clients)
        assert archs == ["gpt2", "llama", "qwen2"]
        aligned = {c["client_metrics"]["slm_arch"]: c["client_metrics"]["saml"]["aligned_vocab"] for c in clients}
        assert aligned == {"llama": [False, False], "gpt2": [False, False], "qwen2": [True, True]}
        # Whatever a device's own SLM, what it uploads is the proxy's adapter (plus a little metadata).
        proxy_size = next(a["size"] for a in r["artifacts"] if a["name"] == DPM_ADAPTER)
        assert all(proxy_size <= c["bytes_up"] < proxy_size + 4096 for c in clients)

    final = {a["name"]: a["sha256"] for a in rounds[-1]["artifacts"]}
    first = {a["name"]: a["sha256"] for a in rounds[0]["artifacts"]}
    assert final[DPM_ADAPTER] != rounds[-1]["metrics"]["aggregate_sha256"], "proxy not distilled"
    assert set(final) >= {DPM_ADAPTER, f"{PROXY_PREFIX}/model.safetensors", f"{PROXY_PREFIX}/tokenizer.json"}
    assert first[DPM_ADAPTER] != final[DPM_ADAPTER]

    own_adapters = set()
    for k, arch in enumerate(("llama", "gpt2", "qwen2")):
        out = tmp_path / f"device-{k}" / "final"
        held = json.loads((out / "final.json").read_text())
        assert held["rounds_trained"] == [1, 2]
        seen = [a["name"] for a in held["artifacts"]]
        assert not any(name.startswith(LLM_PREFIX + "/") for name in seen), "a device saw the LLM's adapter"
        # The final device model is its own SLM with its private adapter, next to the proxy.
        own = out / "slm" / "adapter.safetensors"
        assert hashlib.sha256(own.read_bytes()).hexdigest() == held["adapter_sha256"]
        assert json.loads((out / "slm" / "config.json").read_text())["model_type"] == arch
        proxy = out / "dpm" / "adapter.safetensors"
        assert hashlib.sha256(proxy.read_bytes()).hexdigest() == final[DPM_ADAPTER]
        own_adapters.add(held["adapter_sha256"])
    assert len(own_adapters) == 3 and final[DPM_ADAPTER] not in own_adapters


def test_devices_build_their_own_slm_when_the_run_asks(world3, slms, tmp_path) -> None:
    pytest.importorskip("llama_cpp", reason="the export extra (llama-cpp-python) is not installed")
    spec = _spec(world3, init_distill_epochs=0.0)
    spec.update(name="coplms-builds", rounds=1, min_clients=2, builds=["gguf:f32"])
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        status = run_devices(coord, world3, [None, slms.gpt2], tmp_path)
    finally:
        coord.stop()
    assert status["state"] == "finished", status.get("error")
    # The proxy's llama base (device 0) exports; the exporter takes no gpt2, so device 1 says so
    # and keeps its final adapter: a build never fails the run.
    built = device_build(tmp_path, 0)
    assert built is not None and built.architecture == "llama" and built.format == "gguf"
    assert device_build(tmp_path, 1) is None


@pytest.fixture(scope="module")
def coord_policy(world3, tmp_path_factory):
    """One coordinator whose runs refuse SLMs on tokenizer, architecture or absence."""
    spec = _spec(world3, vocab_alignment=False, allowed_archs=["llama", "qwen2"])
    proc = CoordinatorProcess(tmp_path_factory.mktemp("coord-policy"), run=spec).start()
    yield proc
    proc.stop()


def _register(coord: CoordinatorProcess, token: str, body: dict) -> httpx.Response:
    return httpx.post(f"{coord.url}/v1/clients", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {token}"})


def _slm(path: Path) -> dict:
    return json.loads(describe_local_slm(path).model_dump_json())


def test_incompatible_joins_are_refused_with_a_reason(coord_policy, slms) -> None:
    token = coord_policy.run["enroll_token"]
    kinds = ["lora_sft", "coplms", "crosslm"]
    cases = [
        ({"task_kinds": ["lora_sft"]}, "coplms"),  # an old device that cannot run the task
        ({"task_kinds": kinds, "slm": _slm(slms.gpt2)}, "architecture llama, qwen2"),
        ({"task_kinds": kinds, "slm": _slm(slms.qwen2_own_tok)}, "tokenizer"),
        ({"task_kinds": kinds, "slm": _slm(slms.no_tokenizer)}, "no tokenizer.json"),
    ]
    for body, reason in cases:
        r = _register(coord_policy, token, {"name": "refused", **body})
        assert r.status_code == 409, r.text
        assert r.json()["detail"]["code"] == "cannot_join"
        assert reason in r.json()["detail"]["message"], r.json()["detail"]["message"]
    # Accepted: other architectures on the run's tokenizer, and a device with no SLM of its own.
    for slm in (_slm(slms.qwen2), _slm(slms.llama), None):
        r = _register(coord_policy, token, {"name": "ok", "task_kinds": kinds, "slm": slm})
        assert r.status_code == 201, r.text


def test_a_run_can_require_devices_to_bring_their_slm(coord_policy, world3, slms, tmp_path) -> None:
    spec = _spec(world3, require_own_slm=True)
    spec["name"] = "coplms-own-slm-only"
    created = httpx.post(f"{coord_policy.url}/v1/runs", json=spec, headers=coord_policy.admin, timeout=120)
    assert created.status_code in (200, 201), created.text
    token = created.json()["enroll_token"]
    r = _register(coord_policy, token, {"name": "bare", "task_kinds": ["coplms"]})
    assert r.status_code == 409 and "--slm" in r.json()["detail"]["message"]
    # The device side sees the same refusal as an error it can show the user.
    client = CoordinatorClient(coord_policy.url)
    with pytest.raises(CoordinatorError) as info:
        client.register(token, ClientRegistration(name="bare", task_kinds=["coplms"]))
    assert info.value.code == "cannot_join"
    client.close()


def test_bad_params_are_refused_when_the_run_is_created(coord_policy, world3) -> None:
    cases = [({"alpha": -1}, "params.alpha", []), ({"no_such_knob": 1}, "params.no_such_knob", []),
             ({"dst_epochs": 0, "saml_epochs": 0}, "would not train", []),
             ({}, "builds: co-plms makes its builds on each device", ["gguf-lora"]),
             ({}, "unknown export target", ["tflite:int8"])]
    for params, needle, builds in cases:
        spec = _spec(world3, **params)
        spec.update(name="coplms-bad", builds=builds)
        r = httpx.post(f"{coord_policy.url}/v1/runs", json=spec, headers=coord_policy.admin, timeout=60)
        assert r.status_code == 422, r.text
        assert needle in r.json()["detail"]["message"]


def test_vocab_alignment_carries_the_teachers_prediction_to_the_student(world3, slms) -> None:
    """A teacher sure of the right next token becomes a target on the student's right next token,
    at the positions where both tokenizations have a boundary."""
    import torch

    from common.ml.batching import collate, encode_sft
    from common.ml.tokenizer import load_hf_tokenizer
    from common.ml.vocab_align import VocabAlignment, same_vocabulary
    from common.records import read_jsonl

    teacher_tok = load_hf_tokenizer(world3.root / "tokenizer")  # 384 ids: coarser tokens
    student_tok = load_hf_tokenizer(slms.qwen2_own_tok)  # 320 ids: finer tokens
    assert same_vocabulary(teacher_tok, load_hf_tokenizer(world3.slm_dir))
    assert not same_vocabulary(teacher_tok, student_tok)
    records = read_jsonl(world3.data["client_0"])[:24]
    t_enc, s_enc = encode_sft(teacher_tok, records, 64), encode_sft(student_tok, records, 64)
    t_batch, s_batch = collate(t_enc, 0), collate(s_enc, 0)
    logits = torch.zeros(len(records), t_batch["input_ids"].shape[1], len(teacher_tok))
    for b, enc in enumerate(t_enc):
        for u in range(len(enc["input_ids"]) - 1):
            logits[b, u, enc["input_ids"][u + 1]] = 20.0
    alignment = VocabAlignment(teacher_tok, student_tok, top_k=4)
    top_p, top_i = alignment.teacher_top(logits, None, logits.shape[1])
    response = s_batch["labels"][:, 1:] != -100
    ids, probs, aligned = alignment.targets(top_p, top_i, records, response, t_batch["attention_mask"].sum(1).tolist())
    used = aligned & response
    assert not (aligned & ~response).any(), "a target where none was asked for"
    assert used.sum() >= 0.5 * response.sum(), "too few shared token boundaries"
    assert torch.allclose(probs[used].sum(-1), torch.ones(int(used.sum())))
    best = ids.gather(-1, probs.argmax(-1, keepdim=True)).squeeze(-1)
    hits = (best == s_batch["input_ids"][:, 1:])[used]
    # Not all: where the student's next token is longer than the teacher's, the map can only
    # name a prefix of it (the tokenizers here were trained on different text).
    assert hits.float().mean() >= 0.9


def test_aligned_mutual_learning_with_labelled_logits_learns_as_with_full_logits(world3, slms) -> None:
    """SAML across two vocabularies: the heads run only at reply positions, and each side's losses
    and adapter come out as with the heads at every position."""
    import torch

    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import attach_lora
    from common.ml.mutual import mutual_learning
    from common.protocol import DistillSpec, LoraSpec
    from common.records import read_jsonl

    records = read_jsonl(world3.data["client_0"])[:24]
    results = []
    for labelled in (False, True):
        proxy, proxy_tok = load_checkpoint(world3.slm_dir)
        own, own_tok = load_checkpoint(slms.qwen2_own_tok)
        proxy, own = attach_lora(proxy, LoraSpec(r=4), seed=0), attach_lora(own, LoraSpec(r=4), seed=0)
        spec = DistillSpec(batch_size=8, lr=1e-2, lambda_kd=1.0, temperature=2.0, max_steps=3,
                           labelled_logits=labelled)
        report = mutual_learning(own, own_tok, proxy, proxy_tok, records, spec, seed=0)
        assert report["aligned_vocab"] == [True, True]
        results.append((report, {n: p.detach().clone() for n, p in own.named_parameters() if "lora_" in n}))
    (full, full_own), (kept, kept_own) = results
    for key in ("first_loss_first", "first_kd_mean", "second_loss_first", "second_kd_mean"):
        assert kept[key] == pytest.approx(full[key], rel=1e-4), key
    assert kept["first_kd_mean"] > 0
    assert all(torch.allclose(full_own[n], kept_own[n], atol=1e-5) for n in full_own)
