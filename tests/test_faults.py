"""Faults with real processes on loopback: crashes in the slow steps, a client dying
mid-upload, a dropped download, a straggler, a revoked token."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.methods.contract import SLM_PREFIX
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES
from common.retry import Backoff
from common.tensorfile import load_arrays, save_arrays
from edge_sdk.client import CoordinatorClient, CoordinatorError
from tests.support import CoordinatorProcess, run_spec


def _wait(coord: CoordinatorProcess, run_id: str, until, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = coord.status(run_id)
        if until(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"timed out; coordinator log:\n{coord.log_tail()}")


def _updates(client: CoordinatorClient, run_id: str, tmp_path: Path, seeds: list[int]) -> list[bytes]:
    """Deterministic updates built from the round's adapter (no training needed)."""
    ref = next(r for r in client.current_round(run_id).artifacts if r.name == SLM_ADAPTER)
    base = {k: np.array(v) for k, v in load_arrays(client.download(ref, tmp_path / ref.sha256)).items()}
    bodies = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
        bodies.append(save_arrays(arrays, {META_NUM_SAMPLES: str(10 + seed)}))
    return bodies


def _final_slm(status: dict) -> str:
    return next(a["sha256"] for a in status["rounds"][-1]["artifacts"] if a["name"] == SLM_ADAPTER)


def _fedcollm_run(world, tmp_path: Path, name: str, failpoints: list[str]) -> str:
    """One FedCoLLM round with two fixed updates; crash at each failpoint in turn, restarting
    on the same state after each crash. Returns the final SLM adapter digest."""
    spec = run_spec(world, name="faults", rounds=1, min_clients=2, enroll_token="t" * 32)
    coord = CoordinatorProcess(tmp_path / name, run=spec)
    coord.start(env={"COTUNE_FAILPOINTS": failpoints[0]} if failpoints else None)
    try:
        a, b = CoordinatorClient(coord.url), CoordinatorClient(coord.url)
        ca, cb = a.register(spec["enroll_token"], "a"), b.register(spec["enroll_token"], "b")
        body_a, body_b = _updates(a, ca.run_id, tmp_path, [1, 2])
        a.upload_update(ca.run_id, 1, ca.client_id, body_a)
        b.upload_update(cb.run_id, 1, cb.client_id, body_b)
        for k, _point in enumerate(failpoints):
            assert coord.wait_exit() == 137, "the failpoint did not fire"
            following = failpoints[k + 1 : k + 2]
            coord.start(env={"COTUNE_FAILPOINTS": following[0]} if following else None)
        status = _wait(coord, ca.run_id, lambda s: s["state"] != "running")
        assert status["state"] == "finished", status["error"]
        assert status["rounds"][-1]["num_updates"] == 2
        a.close()
        b.close()
        return _final_slm(status)
    finally:
        coord.stop()


def test_crash_in_aggregation_and_server_step_ends_like_an_uninterrupted_run(world, tmp_path) -> None:
    reference = _fedcollm_run(world, tmp_path, "clean", [])
    crashed = _fedcollm_run(world, tmp_path, "crashed", ["aggregated", "server_stepped"])
    assert crashed == reference


@pytest.fixture()
def fedavg_coord(world, tmp_path):
    spec = run_spec(world, name="fedavg-faults", algorithm="fedavg", rounds=2, min_clients=2,
                    round_deadline_s=2.0)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    yield coord
    coord.stop()


def test_client_killed_mid_upload_leaves_nothing_and_retry_succeeds(fedavg_coord, tmp_path) -> None:
    coord = fedavg_coord
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], "flaky")
    (body,) = _updates(client, creds.run_id, tmp_path, [3])
    path = f"/v1/runs/{creds.run_id}/rounds/1/updates/{creds.client_id}"
    with socket.create_connection(("127.0.0.1", coord.port)) as sock:
        head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {client.token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.3)
    spool = coord.state_dir / "work" / "uploads"
    deadline = time.monotonic() + 10
    while list(spool.glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(spool.glob("*.part")), "the partial body was kept"
    assert not client.current_round(creds.run_id).submitted
    receipt = client.upload_update(creds.run_id, 1, creds.client_id, body)
    assert receipt.duplicate is False
    client.close()


def test_straggler_is_refused_then_takes_part_in_the_next_round(fedavg_coord, tmp_path) -> None:
    coord = fedavg_coord
    clients = [CoordinatorClient(coord.url) for _ in range(3)]
    creds = [c.register(coord.run["enroll_token"], f"d{k}") for k, c in enumerate(clients)]
    run_id = creds[0].run_id
    bodies = _updates(clients[0], run_id, tmp_path, [4, 5, 6])
    for k in (0, 1):
        clients[k].upload_update(run_id, 1, creds[k].client_id, bodies[k])
    # Quorum (2 of 3) is in; the 2 s deadline passes and the round closes without the third.
    _wait(coord, run_id, lambda s: s["current_round"] == 2, timeout=60)
    with pytest.raises(CoordinatorError) as info:
        clients[2].upload_update(run_id, 1, creds[2].client_id, bodies[2])
    assert info.value.status == 409 and info.value.code == "round_closed"
    info2 = clients[2].current_round(run_id)
    assert info2.round == 2 and not info2.submitted
    (late_body,) = _updates(clients[2], run_id, tmp_path, [7])
    assert clients[2].upload_update(run_id, 2, creds[2].client_id, late_body).round == 2
    summary = httpx.get(f"{coord.url}/v1/runs/{run_id}/rounds/1", headers=coord.admin, timeout=10).json()
    assert summary["num_updates"] == 2
    for c in clients:
        c.close()


class _CuttingProxy:
    """A TCP proxy that drops its first connection after `cut_after` bytes from the server."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port, self.cut_after = target_port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe_pair, args=(downstream, limit), daemon=True).start()

    def _pipe_pair(self, downstream: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(downstream, upstream, None), daemon=True).start()
        self._pipe(upstream, downstream, limit)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


def test_dropped_download_resumes_with_range(fedavg_coord, tmp_path) -> None:
    coord = fedavg_coord
    direct = CoordinatorClient(coord.url)
    creds = direct.register(coord.run["enroll_token"], "far-away")
    ref = next(r for r in direct.current_round(creds.run_id).artifacts if r.name == f"{SLM_PREFIX}/model.safetensors")
    proxy = _CuttingProxy(coord.port, cut_after=ref.size // 2)
    via_proxy = CoordinatorClient(f"http://127.0.0.1:{proxy.port}", token=direct.token,
                                  backoff=Backoff(max_tries=4, base_s=0.05))
    try:
        dest = via_proxy.download(ref, tmp_path / "model.safetensors")
    finally:
        proxy.close()
        via_proxy.close()
    assert proxy.connections >= 2, "the first connection should have been cut"
    assert dest.stat().st_size == ref.size
    ranged = [t for t in _transfers(coord, creds.run_id) if t < ref.size]
    assert ranged, "the retry should have asked only for the missing bytes"
    direct.close()


def _transfers(coord: CoordinatorProcess, run_id: str) -> list[int]:
    import sqlite3

    db = sqlite3.connect(coord.state_dir / "coordinator.db")
    try:
        return [row[0] for row in db.execute("SELECT bytes FROM transfers WHERE direction = 'down'")]
    finally:
        db.close()


def test_revoked_client_is_locked_out(fedavg_coord) -> None:
    coord = fedavg_coord
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], "stolen")
    assert client.current_round(creds.run_id).round >= 1
    r = httpx.delete(f"{coord.url}/v1/clients/{creds.client_id}", headers=coord.admin, timeout=10)
    assert r.status_code == 204
    with pytest.raises(CoordinatorError) as info:
        client.current_round(creds.run_id)
    assert info.value.status == 403
    client.close()
