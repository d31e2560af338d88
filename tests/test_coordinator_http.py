"""The coordinator over real HTTP on loopback: access rules, bad input, idempotent uploads.

Every refused request must leave the round exactly as it was.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.methods.contract import SLM_PREFIX
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_METRICS, META_NUM_SAMPLES, DeviceProfile
from common.tensorfile import load_arrays, read_header, save_arrays
from edge_sdk.client import CoordinatorClient, CoordinatorError
from tests.support import CoordinatorProcess, run_spec

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def coord(world, tmp_path_factory):
    spec = run_spec(world, name="http-run", algorithm="fedavg", rounds=2, min_clients=2)
    proc = CoordinatorProcess(tmp_path_factory.mktemp("coord"), run=spec,
                              extra={"max_update_bytes": LIMIT}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def devices(coord):
    """Three enrolled devices (quorum is two, so round 1 stays open until all three are in)."""
    made = []
    for k in range(3):
        client = CoordinatorClient(coord.url)
        creds = client.register(coord.run["enroll_token"], f"dev{k}", DeviceProfile(cores=2))
        made.append((client, creds))
    yield made
    for client, _ in made:
        client.close()


def _adapter(client: CoordinatorClient, run_id: str, tmp_path: Path) -> dict[str, np.ndarray]:
    info = client.current_round(run_id)
    ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
    path = client.download(ref, tmp_path / ref.sha256)
    return {k: np.array(v) for k, v in load_arrays(path).items()}


def _body(arrays: dict[str, np.ndarray], samples: int = 10) -> bytes:
    return save_arrays(arrays, {META_NUM_SAMPLES: str(samples), META_METRICS: json.dumps({"loss": 1.0})})


def _put(coord, run_id: str, number: int, client_id: str, body: bytes, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.put(f"{coord.url}/v1/runs/{run_id}/rounds/{number}/updates/{client_id}",
                     content=body, headers=headers, timeout=30)


def _num_updates(coord, run_id: str, number: int) -> int:
    r = httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/{number}", headers=coord.admin, timeout=10)
    return r.json()["num_updates"]


def test_openapi_document_is_the_contract(coord) -> None:
    doc = httpx.get(f"{coord.url}/openapi.json", timeout=10).json()
    paths = doc["paths"]
    for path, method in [
        ("/v1/runs", "post"), ("/v1/clients", "post"), ("/v1/runs/{run_id}/rounds/current", "get"),
        ("/v1/artifacts/{sha256}", "get"), ("/v1/runs/{run_id}/rounds/{number}/updates/{client_id}", "put"),
        ("/v1/runs/{run_id}", "get"), ("/healthz", "get"), ("/metrics", "get"),
        ("/v1/runs/{run_id}/stop", "post"), ("/v1/runs/{run_id}/clients", "get"),
    ]:
        assert method in paths[path], f"{method.upper()} {path} missing from the OpenAPI document"
    schemas = doc["components"]["schemas"]
    assert "RunSpec" in schemas and "DeviceInfo" in schemas
    assert "stopped" in schemas["RunState"]["enum"]
    assert {"collecting_at", "deadline", "phase_times"} <= set(schemas["RoundSummary"]["properties"])


def test_admin_endpoints_need_the_admin_token(coord, devices) -> None:
    client, _creds = devices[0]
    assert httpx.get(f"{coord.url}/v1/runs", timeout=10).status_code == 401
    r = httpx.get(f"{coord.url}/v1/runs", headers={"Authorization": f"Bearer {client.token}"}, timeout=10)
    assert r.status_code == 401
    assert r.json()["detail"]["code"] == "unauthorized"
    assert httpx.get(f"{coord.url}/v1/runs", headers=coord.admin, timeout=10).status_code == 200


def test_enrollment_needs_the_run_token(coord) -> None:
    r = httpx.post(f"{coord.url}/v1/clients", json={"name": "x"}, timeout=10,
                   headers={"Authorization": "Bearer not-the-token-at-all"})
    assert r.status_code == 401
    assert "enroll" in r.json()["detail"]["message"]


def test_bad_uploads_are_refused_and_change_nothing(coord, devices, tmp_path) -> None:
    (a, ca), (b, cb), _ = devices
    run_id = ca.run_id
    good = _adapter(a, run_id, tmp_path)
    name0 = sorted(good)[0]

    wrong_shape = dict(good)
    wrong_shape[name0] = np.zeros((good[name0].shape[0] + 1, *good[name0].shape[1:]), np.float32)
    wrong_name = {("x." + k if k == name0 else k): v for k, v in good.items()}
    wrong_dtype = {k: v.astype(np.float16) if k == name0 else v for k, v in good.items()}
    with_nan = {k: v.copy() for k, v in good.items()}
    with_nan[name0].flat[0] = np.nan
    with_inf = {k: v.copy() for k, v in good.items()}
    with_inf[name0].flat[-1] = np.inf

    cases = [
        ("no token", _body(good), None, ca.client_id, 401, "unauthorized"),
        ("wrong token", _body(good), "x" * 40, ca.client_id, 401, "unauthorized"),
        ("another client's slot", _body(good), a.token, cb.client_id, 403, "forbidden"),
        ("not safetensors", b"hello, this is not a tensor file at all", a.token, ca.client_id, 422,
         "invalid_safetensors"),
        ("wrong shape", _body(wrong_shape), a.token, ca.client_id, 422, "wrong_tensors"),
        ("wrong name", _body(wrong_name), a.token, ca.client_id, 422, "wrong_tensors"),
        ("wrong dtype", _body(wrong_dtype), a.token, ca.client_id, 422, "wrong_tensors"),
        ("NaN", _body(with_nan), a.token, ca.client_id, 422, "non_finite"),
        ("Inf", _body(with_inf), a.token, ca.client_id, 422, "non_finite"),
        ("no sample count", save_arrays(good), a.token, ca.client_id, 422, "bad_metadata"),
        ("zero samples", _body(good, samples=0), a.token, ca.client_id, 422, "bad_metadata"),
        ("metrics the method does not take",
         save_arrays(good, {META_NUM_SAMPLES: "10", META_METRICS: json.dumps({"privacy": {"epsilon": "lots"}})}),
         a.token, ca.client_id, 422, "bad_metadata"),
        ("too large", b"\0" * (LIMIT + 1), a.token, ca.client_id, 413, "too_large"),
    ]
    before = _num_updates(coord, run_id, 1)
    submitted_before = a.current_round(run_id).submitted
    for label, body, token, slot, status, code in cases:
        r = _put(coord, run_id, 1, slot, body, token)
        assert r.status_code == status, f"{label}: {r.status_code} {r.text}"
        detail = r.json()["detail"]
        assert detail["code"] == code, f"{label}: {detail}"
        assert detail["message"], label
        assert _num_updates(coord, run_id, 1) == before, f"{label} changed the round"
    assert a.current_round(run_id).submitted == submitted_before


def test_upload_to_a_round_not_yet_open(coord, devices, tmp_path) -> None:
    a, ca = devices[0]
    r = _put(coord, ca.run_id, 7, ca.client_id, _body(_adapter(a, ca.run_id, tmp_path)), a.token)
    assert r.status_code == 409
    assert r.json()["detail"]["code"] == "round_not_open"


def test_duplicate_upload_is_accepted_once(coord, devices, tmp_path) -> None:
    (a, ca), (b, cb), (c, cc) = devices
    run_id = ca.run_id
    arrays = {k: v + 0.01 for k, v in _adapter(a, run_id, tmp_path).items()}
    body = _body(arrays, samples=12)

    first = _put(coord, run_id, 1, ca.client_id, body, a.token)
    assert first.status_code == 201, first.text
    assert first.json()["duplicate"] is False
    again = _put(coord, run_id, 1, ca.client_id, body, a.token)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["sha256"] == first.json()["sha256"]
    assert _num_updates(coord, run_id, 1) == 1

    other = _put(coord, run_id, 1, ca.client_id, _body(arrays, samples=13), a.token)
    assert other.status_code == 409
    assert other.json()["detail"]["code"] == "update_exists"
    assert _num_updates(coord, run_id, 1) == 1
    assert a.current_round(run_id).submitted


def test_client_sees_only_its_own(coord, devices, tmp_path) -> None:
    (a, ca), (b, cb), _ = devices
    run_id = ca.run_id
    status = b.run_status(run_id)
    seen = set(status.rounds[-1].metrics.get("clients", {})) if status.rounds else set()
    assert seen <= {cb.client_id}, "a client saw another client's figures"
    # The update a sent is a server-side blob: b cannot download it, nor can a.
    summary = httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/1", headers=coord.admin, timeout=10).json()
    assert summary["num_updates"] >= 1
    info = a.current_round(run_id)
    visible = {r.sha256 for r in info.artifacts}
    for token in (a.token, b.token):
        r = httpx.get(f"{coord.url}/v1/artifacts/{'0' * 64}", headers={"Authorization": f"Bearer {token}"},
                      timeout=10)
        assert r.status_code == 404
    assert visible, "the round publishes artifacts"


def test_download_supports_range_and_checks_digest(coord, devices, tmp_path) -> None:
    a, ca = devices[0]
    ref = next(r for r in a.current_round(ca.run_id).artifacts if r.name == f"{SLM_PREFIX}/model.safetensors")
    full = httpx.get(f"{coord.url}/v1/artifacts/{ref.sha256}", headers={"Authorization": f"Bearer {a.token}"},
                     timeout=30).content
    part = httpx.get(f"{coord.url}/v1/artifacts/{ref.sha256}", timeout=30,
                     headers={"Authorization": f"Bearer {a.token}", "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == full[100:200]
    # A partial file left by a dropped connection is resumed, and the result verified.
    dest = tmp_path / "model.safetensors"
    dest.with_name(dest.name + ".part").write_bytes(full[: len(full) // 2])
    a.download(ref, dest)
    assert dest.read_bytes() == full
    assert read_header(dest).tensors


def test_round_closes_and_late_update_is_refused(coord, devices, tmp_path) -> None:
    run_id = devices[0][1].run_id
    base = _adapter(devices[0][0], run_id, tmp_path)
    before = httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/1", headers=coord.admin, timeout=10).json()
    added = 0
    for k, (client, creds) in enumerate(devices):  # whoever has not sent its update yet does now
        if not client.current_round(run_id).submitted:
            body = _body({name: v - 0.01 * k for name, v in base.items()}, 4)
            assert _put(coord, run_id, 1, creds.client_id, body, client.token).is_success
            added += 4
    a, ca = devices[0]
    deadline = time.monotonic() + 60
    while a.current_round(run_id).round == 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.current_round(run_id).round == 2, coord.log_tail()

    late = CoordinatorClient(coord.url)
    creds = late.register(coord.run["enroll_token"], "late", DeviceProfile())
    r = _put(coord, run_id, 1, creds.client_id, _body(base), late.token)
    assert r.status_code == 409
    assert r.json()["detail"]["code"] == "round_closed"
    late.close()
    with pytest.raises(CoordinatorError) as info:
        a.upload_update(run_id, 1, ca.client_id, _body(base))
    assert info.value.code == "round_closed"
    summary = httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/1", headers=coord.admin, timeout=10).json()
    assert summary["state"] == "closed"
    assert summary["num_updates"] == 3
    assert summary["num_samples"] == before["num_samples"] + added
    # The round's timeline: every state it went through, in order, at times that never go back.
    phases = summary["phase_times"]
    assert list(phases) == ["open", "collecting", "aggregating", "server_step", "publishing", "closed"]
    assert list(phases.values()) == sorted(phases.values())
    assert summary["collecting_at"] == phases["collecting"] and summary["deadline"] > summary["collecting_at"]


def test_a_device_that_cannot_run_the_task_is_refused(coord) -> None:
    r = httpx.post(f"{coord.url}/v1/clients", timeout=10,
                   headers={"Authorization": f"Bearer {coord.run['enroll_token']}"},
                   json={"name": "old-device", "task_kinds": ["something_else"]})
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert detail["code"] == "cannot_join"
    assert "lora_sft" in detail["message"]


def test_generate_needs_a_run_with_an_llm(coord, devices) -> None:
    client, _ = devices[0]
    r = httpx.post(f"{coord.url}/v1/generate", json={"prompt": "hello"}, timeout=10,
                   headers={"Authorization": f"Bearer {client.token}"})
    assert r.status_code == 409
    assert r.json()["detail"]["code"] == "no_llm"
