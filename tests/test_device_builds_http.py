"""Builds devices make of their own SLMs, over real HTTP: a device reports its build's manifest
into its own run only, sees its own device builds and never another device's, and the admin
sees them all; a method whose SLMs stay on the devices has no server builds to ask for."""

from __future__ import annotations

import httpx
import pytest

from common.manifest import BuildFile, BuildManifest
from tests.support import CoordinatorProcess, run_spec


def _spec(world, **overrides) -> dict:
    return run_spec(world, name="on-devices", algorithm="co-plms", rounds=1, min_clients=2, builds=["gguf:q8_0"],
                    params={"init_distill_epochs": 0.0, "dst_epochs": 1.0, "saml_epochs": 1.0}, **overrides)


@pytest.fixture(scope="module")
def coord(world, tmp_path_factory):
    proc = CoordinatorProcess(tmp_path_factory.mktemp("device-builds"), run=_spec(world)).start()
    yield proc
    proc.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _enroll(coord: CoordinatorProcess, enroll_token: str, name: str, kind: str = "coplms") -> dict:
    r = httpx.post(f"{coord.url}/v1/clients", json={"name": name, "task_kinds": [kind]}, timeout=30,
                   headers=_bearer(enroll_token))
    assert r.status_code == 201, r.text
    return r.json()


def _manifest(base: str, digest: str, run_id: str | None = None) -> dict:
    return BuildManifest(format="gguf", quantization="q8_0", architecture="llama", model_file="model.gguf",
                         base_model=base, run_id=run_id, round=1, context_length=64,
                         files=[BuildFile(name="model.gguf", sha256=digest, size=1234)]).model_dump(mode="json")


def _report(coord: CoordinatorProcess, run_id: str, token: str | None, body: dict) -> httpx.Response:
    return httpx.post(f"{coord.url}/v1/runs/{run_id}/device-builds", json=body, timeout=30,
                      headers=_bearer(token) if token else {})


def _builds(coord: CoordinatorProcess, run_id: str, token: str, **profile) -> httpx.Response:
    return httpx.get(f"{coord.url}/v1/runs/{run_id}/builds", params=profile, headers=_bearer(token), timeout=30)


def test_device_builds_are_seen_by_their_device_and_the_admin_only(coord, world) -> None:
    a, b = (_enroll(coord, coord.run["enroll_token"], name) for name in ("a", "b"))
    run_id = a["run_id"]
    mine = {"name": "gguf-q8_0", "manifest": _manifest("a's own SLM", "a" * 64, run_id)}
    theirs = {"name": "gguf-q8_0", "manifest": _manifest("b's own SLM", "b" * 64)}

    first = _report(coord, run_id, a["token"], mine)
    assert first.status_code == 201, first.text
    assert first.json()["round"] == 1 and first.json()["files"][0]["sha256"] == "a" * 64
    again = _report(coord, run_id, a["token"], mine)
    assert again.status_code == 201 and again.json() == first.json(), "resending is idempotent"
    assert _report(coord, run_id, b["token"], theirs).status_code == 201

    for creds, base in ((a, "a's own SLM"), (b, "b's own SLM")):
        listing = _builds(coord, run_id, creds["token"]).json()["builds"]
        assert [x["manifest"]["base_model"] for x in listing] == [base], "a device sees its own build only"
    everything = _builds(coord, run_id, coord.admin_token).json()["builds"]
    assert sorted(x["manifest"]["base_model"] for x in everything) == ["a's own SLM", "b's own SLM"]
    # With a profile, a device is offered its own build, not another device's.
    best = _builds(coord, run_id, b["token"], arch="x86_64", ram_bytes=8 << 30, backends="llama.cpp").json()["best"]
    assert best is not None and best["manifest"]["base_model"] == "b's own SLM"
    # Only the manifest travels: the files stay on the device, so nobody can download them.
    r = httpx.get(f"{coord.url}/v1/artifacts/{'a' * 64}", headers=_bearer(a["token"]), timeout=30)
    assert r.status_code == 404


def test_a_device_reports_into_its_own_run_only(coord, world) -> None:
    a = _enroll(coord, coord.run["enroll_token"], "c")
    other = run_spec(world, name="elsewhere", algorithm="fedavg", rounds=1)
    created = httpx.post(f"{coord.url}/v1/runs", json=other, headers=coord.admin, timeout=120)
    assert created.status_code == 201, created.text
    outsider = _enroll(coord, other["enroll_token"], "outsider", kind="lora_sft")
    run_id = a["run_id"]
    report = {"name": "gguf-q8_0", "manifest": _manifest("outsider's SLM", "c" * 64)}

    r = _report(coord, run_id, outsider["token"], report)
    assert r.status_code == 403 and r.json()["detail"]["code"] == "forbidden"
    assert _builds(coord, run_id, outsider["token"]).status_code == 403
    assert _report(coord, run_id, None, report).status_code == 401
    assert _report(coord, run_id, coord.admin_token, report).status_code == 401, "reports come from devices"
    everything = _builds(coord, run_id, coord.admin_token).json()["builds"]
    assert "outsider's SLM" not in [x["manifest"]["base_model"] for x in everything]

    bad = _report(coord, run_id, a["token"], {"name": "gguf-q8_0", "manifest": {"format": "tflite"}})
    assert bad.status_code == 422 and bad.json()["detail"]["code"] == "bad_manifest"
    foreign = {"name": "gguf-q8_0", "manifest": _manifest("c's SLM", "c" * 64, run_id=created.json()["run_id"])}
    r = _report(coord, run_id, a["token"], foreign)
    assert r.status_code == 422 and "made for run" in r.json()["detail"]["message"]


def test_no_server_builds_for_a_method_whose_slms_stay_on_devices(coord) -> None:
    run_id = next(r["run_id"] for r in httpx.get(f"{coord.url}/v1/runs", headers=coord.admin, timeout=30).json()
                  if r["name"] == "on-devices")
    r = httpx.post(f"{coord.url}/v1/runs/{run_id}/builds", json={"targets": ["gguf:q8_0"]}, headers=coord.admin,
                   timeout=60)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert detail["code"] == "builds_on_devices" and "device" in detail["message"]
