"""Edge builds of a run's SLM: published after the last round and on an admin request,
and offered to each device as the build that fits its profile."""

from __future__ import annotations

import time

import httpx
import pytest

from common.manifest import BuildManifest
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import DeviceProfile
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, run_spec
from tests.test_faults import _updates

pytest.importorskip("llama_cpp", reason="the export extra (llama-cpp-python) is not installed")


def test_builds_are_published_and_fitted_to_the_device(world, tmp_path) -> None:
    spec = run_spec(world, name="built", algorithm="fedavg", rounds=1, min_clients=2,
                    builds=["gguf:f32", "onnx:fp32"])
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        a, b = CoordinatorClient(coord.url), CoordinatorClient(coord.url)
        ca, cb = a.register(spec["enroll_token"], "a"), b.register(spec["enroll_token"], "b")
        run_id = ca.run_id
        assert a.current_round(run_id).builds == "pending"
        body_a, body_b = _updates(a, run_id, tmp_path, [1, 2])
        a.upload_update(run_id, 1, ca.client_id, body_a)
        b.upload_update(run_id, 1, cb.client_id, body_b)
        deadline = time.monotonic() + 300
        while a.current_round(run_id).builds == "pending" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert a.current_round(run_id).builds == "ready", coord.status(run_id)["rounds"][-1]["metrics"]

        listing = a.builds(run_id)
        assert sorted(x.name for x in listing.builds) == ["gguf-f32", "onnx-fp32"]
        final = next(x["sha256"] for x in coord.status(run_id)["rounds"][-1]["artifacts"]
                     if x["name"] == SLM_ADAPTER)
        for build in listing.builds:
            manifest = BuildManifest.model_validate(build.manifest)
            assert manifest.adapter_sha256 == final, "the build is of the final co-tuned adapter"
            assert manifest.run_id == run_id and manifest.round == 1
            assert manifest.parity, "every build carries its parity figures"
        # A device with only llama.cpp gets the GGUF; one with only ONNX Runtime, the ONNX build.
        gguf = a.builds(run_id, DeviceProfile(arch="aarch64", ram_bytes=4 << 30, cores=4, backends=["llama.cpp"]))
        onnx = a.builds(run_id, DeviceProfile(arch="x86_64", ram_bytes=8 << 30, cores=4, backends=["onnxruntime"]))
        assert gguf.best is not None and gguf.best.name == "gguf-f32"
        assert onnx.best is not None and onnx.best.name == "onnx-fp32"
        none = a.builds(run_id, DeviceProfile(arch="x86_64", ram_bytes=8 << 30, backends=["tflite"]))
        assert none.best is None and none.reason
        # Its files download by digest like any artifact.
        for ref in gguf.best.files:
            assert a.download(ref, tmp_path / "dl" / ref.name).stat().st_size == ref.size

        # Builds on request are the admin's alone.
        r = httpx.post(f"{coord.url}/v1/runs/{run_id}/builds", json={"targets": ["gguf:q8_0"]}, timeout=10,
                       headers={"Authorization": f"Bearer {a.token}"})
        assert r.status_code == 401
        r = httpx.post(f"{coord.url}/v1/runs/{run_id}/builds", json={"targets": ["gguf:q8_0"]}, timeout=300,
                       headers=coord.admin)
        assert r.status_code == 201, r.text
        assert [x["name"] for x in r.json()] == ["gguf-q8_0"]
        bad = httpx.post(f"{coord.url}/v1/runs/{run_id}/builds", json={"targets": ["tflite:int8"]}, timeout=60,
                         headers=coord.admin)
        assert bad.status_code == 422 and bad.json()["detail"]["code"] == "export_failed"
        a.close()
        b.close()
    finally:
        coord.stop()
