"""The admin's verbs, driven as an operator would: the real `cotune` command in a subprocess
against a real coordinator on loopback, with the admin token in COTUNE_ADMIN_TOKEN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cotune.demo.quickstart import free_port
from tests.support import CoordinatorProcess, join_cmd, run_spec


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path_factory.mktemp("admin-cli")).start()
    try:
        yield process
    finally:
        process.stop()


def cotune(coord: CoordinatorProcess | None, *args: str, token: str | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COTUNE_ADMIN_TOKEN"}
    if coord is not None:
        env["COTUNE_ADMIN_TOKEN"] = token if token is not None else coord.admin_token
        args = (*args, "--coordinator", coord.url)
    return subprocess.run([sys.executable, "-m", "cotune.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def as_json(result: subprocess.CompletedProcess) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_run_toml(path: Path, spec: dict[str, Any]) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for table, values in spec.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def enroll(coord: CoordinatorProcess, enroll_token: str, name: str) -> dict[str, Any]:
    response = httpx.post(f"{coord.url}/v1/clients", json={"name": name},
                          headers={"Authorization": f"Bearer {enroll_token}"}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def test_version_and_completion() -> None:
    result = cotune(None, "--version")
    assert result.returncode == 0 and result.stdout.startswith("cotune "), result.stderr
    usage = cotune(None, "--help").stdout
    assert "--install-completion" in usage
    for verb in ("runs", "devices", "builds", "watch", "status"):
        assert verb in usage


def test_runs_devices_and_builds_from_the_command_line(coord, world, tmp_path) -> None:
    # Two devices make a quorum, so with one enrolled the round stays open: nothing trains.
    spec = run_spec(world, name="cli-made", algorithm="fedavg", min_clients=2)
    spec.pop("enroll_token")
    created = as_json(cotune(coord, "runs", "create", str(write_run_toml(tmp_path / "run.toml", spec)), "--json"))
    assert created["created"] and created["name"] == "cli-made" and created["enroll_token"]
    run_id = created["run_id"]

    listed = as_json(cotune(coord, "runs", "list", "--json"))
    assert [(r["run_id"], r["state"]) for r in listed] == [(run_id, "running")]
    shown = as_json(cotune(coord, "runs", "show", "cli-made", "--json"))
    assert shown["run_id"] == run_id and shown["devices"] == []

    device = enroll(coord, created["enroll_token"], "phone-1")
    devices = as_json(cotune(coord, "devices", "list", "cli-made", "--json"))
    assert [(d["client_id"], d["name"], d["updates_sent"], d["revoked"]) for d in devices] == [
        (device["client_id"], "phone-1", 0, False)]
    assert devices[0]["last_seen"] is not None and devices[0]["enrolled_at"] is not None

    # The device list is the admin's: a device's own token is known but refused.
    device_auth = {"Authorization": f"Bearer {device['token']}"}
    assert httpx.get(f"{coord.url}/v1/runs/{run_id}/clients", headers=device_auth, timeout=10).status_code == 403
    assert httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/current", headers=device_auth, timeout=10).is_success

    revoked = as_json(cotune(coord, "devices", "revoke", device["client_id"], "--json"))
    assert revoked == {"client_id": device["client_id"], "revoked": True}
    after = httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/current", headers=device_auth, timeout=10)
    assert after.status_code == 403
    assert as_json(cotune(coord, "devices", "list", run_id, "--json"))[0]["revoked"] is True

    assert as_json(cotune(coord, "builds", "list", "cli-made", "--json")) == []
    frame = json.loads(cotune(coord, "watch", "cli-made", "--once", "--json").stdout)
    assert frame["run_id"] == run_id and len(frame["devices"]) == 1
    live = cotune(coord, "watch", "cli-made", "--once")
    assert live.returncode == 0 and "phone-1" in live.stdout, live.stderr


def test_stopping_a_run_ends_its_devices_join_loop(coord, world, tmp_path) -> None:
    spec = run_spec(world, name="to-stop", algorithm="fedavg", min_clients=2)
    created = as_json(cotune(coord, "runs", "create", str(write_run_toml(tmp_path / "run.toml", spec)), "--json"))
    coord.run = spec  # join_cmd reads the run's enroll token from here
    log = (tmp_path / "device.log").open("w")
    device = subprocess.Popen(join_cmd(coord, world, 0, tmp_path / "device"), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not as_json(cotune(coord, "devices", "list", "to-stop", "--json")):
            assert device.poll() is None and time.monotonic() < deadline, (tmp_path / "device.log").read_text()
            time.sleep(0.5)
        stopped = as_json(cotune(coord, "runs", "stop", "to-stop", "--json"))
        assert stopped["run_id"] == created["run_id"] and stopped["state"] == "stopped"
        assert device.wait(120) == 0, (tmp_path / "device.log").read_text()
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(10)
    output = (tmp_path / "device.log").read_text()
    assert "stopped by its operator" in output and "Traceback" not in output
    again = one_error_line(cotune(coord, "runs", "stop", "to-stop"))
    assert "already stopped" in again and "only a running run" in again
    states = {r["name"]: r["state"] for r in as_json(cotune(coord, "runs", "list", "--json"))}
    assert states["to-stop"] == "stopped"


def test_bad_token_unreachable_coordinator_and_bad_file_are_one_line(coord, tmp_path) -> None:
    denied = one_error_line(cotune(coord, "runs", "list", "--json", token="not-the-admin-token-at-all"))
    assert "admin token" in denied and "not-the-admin-token-at-all" not in denied
    nobody = CoordinatorProcess(tmp_path, port=free_port())  # nothing listens on its port
    unreachable = one_error_line(cotune(nobody, "runs", "list"))
    assert "cannot reach the coordinator" in unreachable
    token_file = tmp_path / "admin-token"
    token_file.write_text(coord.admin_token + "\n")
    env_free = cotune(None, "runs", "list", "--json", "--coordinator", coord.url, "--token-file", str(token_file))
    assert isinstance(as_json(env_free), list)
    missing = one_error_line(cotune(None, "runs", "list", "--coordinator", coord.url))
    assert "COTUNE_ADMIN_TOKEN" in missing
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nrounds = "many"\nsecret_field = "hunter2"\n')
    invalid = one_error_line(cotune(coord, "runs", "create", str(bad)))
    assert "not a valid run spec" in invalid and "rounds" in invalid and "hunter2" not in invalid
