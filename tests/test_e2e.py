"""End to end: a live coordinator and two device processes complete two FedCoLLM rounds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx

from common.manifest import BuildManifest
from common.methods import fedcollm
from common.ml.batching import format_prompt
from edge_sdk.runtime import EdgeModel
from tests.support import CoordinatorProcess, join_all, run_spec


def test_two_devices_complete_two_fedcollm_rounds(world, tmp_path) -> None:
    coord = CoordinatorProcess(tmp_path / "coord", run=run_spec(world, name="e2e", rounds=2,
                                                                builds=["gguf:f32"])).start()
    try:
        status = join_all(coord, world, tmp_path, 2)
        # A device escalates a prompt to the co-tuned LLM.
        creds = json.loads((tmp_path / "device-0" / "credentials.json").read_text())["credentials"]
        answer = httpx.post(f"{coord.url}/v1/generate", timeout=60,
                            headers={"Authorization": f"Bearer {creds['token']}"},
                            json={"prompt": "Translate to Velish: red fox", "max_tokens": 6})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"].endswith("llm@round2")
        assert answer.json()["tokens"] <= 6  # an untrained tiny LLM may stop at once
        again = httpx.post(f"{coord.url}/v1/generate", timeout=60,
                           headers={"Authorization": f"Bearer {creds['token']}"},
                           json={"prompt": "Translate to Velish: red fox", "max_tokens": 6})
        assert again.json()["text"] == answer.json()["text"], "greedy answers are deterministic"
        too_long = httpx.post(f"{coord.url}/v1/generate", timeout=60,
                              headers={"Authorization": f"Bearer {creds['token']}"},
                              json={"prompt": "fox " * 400, "max_tokens": 6})
        assert too_long.status_code == 422 and too_long.json()["detail"]["code"] == "prompt_too_long"
        assert httpx.post(f"{coord.url}/v1/generate", json={"prompt": "x"}, timeout=10).status_code == 401
    finally:
        coord.stop()

    assert status["state"] == "finished", status.get("error")
    rounds = [r for r in status["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["state"] == "closed"
        assert r["num_updates"] == 2
        assert r["metrics"]["distill"]["steps"] > 0, "the server step did not distill"
        assert 0.0 <= r["metrics"]["slm"]["rougeL"] <= 1.0
        assert "llm" in r["metrics"]
        for figures in r["metrics"]["clients"].values():
            assert figures["bytes_up"] > 0 and figures["bytes_down"] > 0
    # Round 2 downloads only the new adapter: the base model was cached on the device.
    down1 = sum(c["bytes_down"] for c in rounds[0]["metrics"]["clients"].values())
    down2 = sum(c["bytes_down"] for c in rounds[1]["metrics"]["clients"].values())
    assert down2 < down1

    final = {a["name"]: a["sha256"] for a in rounds[-1]["artifacts"]}
    first = {a["name"]: a["sha256"] for a in rounds[0]["artifacts"]}
    server_slm = final[fedcollm.SLM_ADAPTER]
    # The SLM adapter the devices get is the distilled one, not the plain FedAvg aggregate,
    # and the LLM's own adapter moved too.
    assert server_slm != rounds[-1]["metrics"]["aggregate_sha256"]
    assert final[fedcollm.LLM_ADAPTER] != first[fedcollm.LLM_ADAPTER]
    for k in range(2):
        held = json.loads((tmp_path / f"device-{k}" / "final" / "final.json").read_text())
        assert held["adapter_sha256"] == server_slm
        assert held["rounds_trained"] == [1, 2]
        adapter = tmp_path / f"device-{k}" / "final" / "slm" / "adapter.safetensors"
        assert hashlib.sha256(adapter.read_bytes()).hexdigest() == server_slm
        # The device also pulled the edge build of the final model, and answers with it locally.
        assert held["build_dir"], "the device did not pull the run's edge build"
        manifest = BuildManifest.read(Path(held["build_dir"]))
        assert manifest.adapter_sha256 == server_slm and manifest.format == "gguf"
    model = EdgeModel.load(held["build_dir"])
    answer = model.generate(format_prompt("Translate to Velish: red fox"), max_tokens=5)
    assert answer.backend == "llama.cpp" and len(answer.token_ids) <= 5
