"""Hostile callers against a live coordinator on loopback, over real HTTP (ARCHITECTURE.md,
"Privacy"): bodies bounded and callers known before a body is read, no input echoed back,
hostile Range headers, one device racing itself, hostile upload metadata, /metrics closed and
exception text kept from devices. Whatever they send, the coordinator answers 4xx, keeps
answering, and its state stays sound (no negative byte counts, no update in a closed round,
no blob without its row).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud.settings import CoordinatorSettings
from cloud.state import SqlState
from cloud.state.records import ClientRecord, NewRun, UpdateOutcome, UpdateRecord
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_METRICS, META_NUM_SAMPLES, RoundState
from common.tensorfile import load_arrays, save_arrays
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, run_spec

LIMIT = 256 * 1024  # max_update_bytes
BIG = 16 * 1024 * 1024  # the attack's body
CHUNK = 64 * 1024
MARKER = "Zq9-echo-me-back-Zq9"


def _limit(name: str) -> int:
    return CoordinatorSettings.model_fields[name].default


@pytest.fixture(scope="module")
def coord(world, tmp_path_factory):
    # A long deadline and an idle device keep round 1 collecting for the whole module.
    spec = run_spec(world, name="hostile", algorithm="fedavg", rounds=2, min_clients=2, round_deadline_s=3600.0)
    proc = CoordinatorProcess(tmp_path_factory.mktemp("hostile"), run=spec,
                              extra={"max_update_bytes": LIMIT}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def idle(coord):
    """A device that enrolls and never uploads: the round cannot close by every device sending."""
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], "idle")
    yield client, creds
    client.close()


def _device(coord: CoordinatorProcess, name: str) -> tuple[CoordinatorClient, str, str]:
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], name)
    return client, creds.run_id, creds.client_id


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _healthy(coord: CoordinatorProcess) -> None:
    r = httpx.get(f"{coord.url}/healthz", timeout=10)
    assert r.status_code == 200, r.text
    assert coord.proc.poll() is None, "the coordinator died"


# -- bodies bounded, callers known, before a body is read ------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    # Body bytes the client had handed out when the answer came.
    sent: int

    def detail(self) -> dict:
        return json.loads(self.body)["detail"]


def _send_part(url: str, path: str, headers: dict[str, str], *, declared: int | None, send: int,
               method: str = "POST", wait: float = 20.0) -> Answer:
    """Send a body that would be BIG bytes, but hand out only `send` of them, then wait for the
    answer. An answer proves the coordinator decided without the rest of the body; one that
    waits for the rest times out. `declared` sends a Content-Length, None chunked framing."""
    target = httpx.URL(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items()),
             "Transfer-Encoding: chunked" if declared is None else f"Content-Length: {declared}"]
    with socket.create_connection((target.host, target.port), timeout=wait) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        while sent < send:
            n = min(CHUNK, send - sent)
            piece = b" " * n
            sock.sendall(f"{n:x}\r\n".encode() + piece + b"\r\n" if declared is None else piece)
            sent += n
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except TimeoutError:
            pytest.fail(f"{method} {path}: no answer after {sent} of {BIG} body bytes; the coordinator waits "
                        "for the rest of the body")
        return Answer(response.status, response.read(), sent)


HUGE_ROUTES = ["/v1/clients", "/v1/generate", "/v1/runs"]


@pytest.mark.parametrize("path", HUGE_ROUTES)
@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_anonymous_huge_body_is_refused_before_a_byte_is_read(coord, path, framing) -> None:
    answer = _send_part(coord.url, path, {}, declared=BIG if framing == "content-length" else None, send=0)
    assert answer.status in (401, 413), answer.body[:300]
    assert answer.detail()["code"] in ("unauthorized", "too_large")
    _healthy(coord)


@pytest.mark.parametrize("path", HUGE_ROUTES)
def test_an_unknown_token_is_refused_before_a_byte_is_read(coord, path) -> None:
    answer = _send_part(coord.url, path, _bearer("x" * 40), declared=None, send=0)
    assert answer.status == 401, answer.body[:300]
    _healthy(coord)


def _tokens(coord: CoordinatorProcess, idle) -> dict[str, tuple[str, int]]:
    """Each huge-body route with a token it accepts, and the body limit it then applies."""
    return {"/v1/clients": (coord.run["enroll_token"], _limit("max_json_bytes")),
            "/v1/generate": (idle[0].token, _limit("max_json_bytes")),
            "/v1/runs": (coord.admin_token, _limit("max_admin_json_bytes"))}


@pytest.mark.parametrize("path", HUGE_ROUTES)
def test_a_known_caller_cannot_make_the_coordinator_read_past_the_limit(coord, idle, path) -> None:
    token, limit = _tokens(coord, idle)[path]
    # Chunked, no length up front: the coordinator must stop at the limit. It is handed one
    # chunk more than the limit and nothing after: it answers, so it never needed more.
    answer = _send_part(coord.url, path, _bearer(token), declared=None, send=limit + CHUNK)
    assert answer.status == 413, answer.body[:300]
    detail = answer.detail()
    assert detail["code"] == "too_large" and str(limit) in detail["message"]
    # Declared up front: refused before a byte is read.
    answer = _send_part(coord.url, path, _bearer(token), declared=BIG, send=0)
    assert answer.status == 413, answer.body[:300]
    _healthy(coord)


def test_an_upload_over_its_limit_is_refused_as_soon_as_it_is(coord, idle) -> None:
    client, creds = idle
    path = f"/v1/runs/{creds.run_id}/rounds/1/updates/{creds.client_id}"
    for declared, send in ((None, LIMIT + CHUNK), (BIG, 0)):
        answer = _send_part(coord.url, path, _bearer(client.token), declared=declared, send=send, method="PUT")
        assert answer.status == 413, answer.body[:300]
        assert answer.detail()["code"] == "too_large"
    assert not client.current_round(creds.run_id).submitted
    _healthy(coord)


def test_a_bad_body_is_answered_without_echoing_it(coord, idle) -> None:
    enroll = _bearer(coord.run["enroll_token"])
    cases = [
        {"name": MARKER * 20},  # too long
        {"name": "ok", "profile": {"cores": MARKER, "arch": MARKER * 10}},
        {"name": "ok", "profile": {"backends": [{MARKER: MARKER}] * 16}},  # 16 errors: more than listed
        {"name": "ok", MARKER * 50: 1},  # an unknown key is a location, and the key is input
    ]
    for body in cases:
        r = httpx.post(f"{coord.url}/v1/clients", json=body, headers=enroll, timeout=10)
        assert r.status_code == 422, r.text[:300]
        assert MARKER not in r.text, f"the 422 echoes the input: {r.text[:300]}"
        detail = r.json()["detail"]
        assert detail["code"] == "invalid_request" and detail["message"]
        assert 1 <= len(detail["errors"]) <= 10
        for error in detail["errors"]:
            assert set(error) == {"loc", "msg"}, error
    many = httpx.post(f"{coord.url}/v1/clients", json=cases[2], headers=enroll, timeout=10).json()["detail"]
    assert len(many["errors"]) == 10 and "6 more" in many["message"]
    # Not JSON at all, and JSON nested past any parser's depth: 4xx, not echoed.
    for raw in (f"{{not json {MARKER}".encode(), b"[" * 50_000 + b"]" * 50_000):
        r = httpx.post(f"{coord.url}/v1/clients", content=raw, timeout=10,
                       headers={**enroll, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, r.text[:300]
        assert MARKER not in r.text and "[[[" not in r.text
        assert r.json()["detail"]["code"]
    _healthy(coord)


# -- /metrics and what a device learns of a failure ------------------------------------------------


def test_metrics_need_the_admin_token(coord, idle) -> None:
    assert httpx.get(f"{coord.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{coord.url}/metrics", headers=_bearer(idle[0].token), timeout=10).status_code == 401
    r = httpx.get(f"{coord.url}/metrics", headers=coord.admin, timeout=10)
    assert r.status_code == 200 and "cotune_runs" in r.text


def test_metrics_can_be_opened_for_a_scraper(tmp_path) -> None:
    coord = CoordinatorProcess(tmp_path / "coord", extra={"metrics_public": True}).start()
    try:
        r = httpx.get(f"{coord.url}/metrics", timeout=10)
        assert r.status_code == 200 and "cotune_clients" in r.text
    finally:
        coord.stop()


def test_a_device_sees_that_its_run_failed_but_not_the_exception(world, tmp_path) -> None:
    spec = run_spec(world, name="fails", algorithm="fedavg", rounds=1, min_clients=2)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        client, run_id, _ = _device(coord, "a")
        secret = "OSError: [Errno 2] No such file or directory: '/srv/private/aux.jsonl'"
        state = SqlState(f"sqlite:///{coord.state_dir / 'coordinator.db'}")  # as the round driver records it
        state.fail_run(run_id, 1, secret)
        state.close()
        seen = httpx.get(f"{coord.url}/v1/runs/{run_id}", headers=_bearer(client.token), timeout=10).json()
        assert seen["state"] == "failed"
        assert "/srv/private" not in json.dumps(seen) and "OSError" not in json.dumps(seen)
        assert "run_failed" in seen["error"] and "round 1" in seen["error"]
        assert "/srv/private/aux.jsonl" in coord.status(run_id)["error"], "the admin sees the detail"
        client.close()
    finally:
        coord.stop()


# -- Range headers ---------------------------------------------------------------------------------

HOSTILE_RANGES = ["bytes=--1000000", "bytes=--9223372036854775807", "bytes=99999999999999999999-",
                  "bytes=-99999999999999999999", "bytes=0-99999999999999999999", "bytes=5-1", "bytes=-",
                  "bytes=abc", "bytes=0-0,-1", "items=0-1", "bytes=-0", "bytes=18446744073709551616-"]


def test_hostile_ranges_never_record_impossible_byte_counts(world, tmp_path, state_url) -> None:
    spec = run_spec(world, name="ranges", algorithm="fedavg", rounds=1, min_clients=2)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec, extra={"state_url": state_url}).start()
    try:
        client, run_id, client_id = _device(coord, "ranger")
        ref = next(r for r in client.current_round(run_id).artifacts if r.name == SLM_ADAPTER)
        url = f"{coord.url}/v1/artifacts/{ref.sha256}"
        expected = 0
        for header in [*HOSTILE_RANGES, *HOSTILE_RANGES, "bytes=0-9", "bytes=-5"]:
            r = httpx.get(url, headers={**_bearer(client.token), "Range": header}, timeout=30)
            assert r.status_code < 500, f"{header}: {r.status_code} {r.text[:200]}"
            if r.status_code in (200, 206):
                expected += min(len(r.content), ref.size)
            # Every answer leaves the listings readable, for the admin and the device.
            assert httpx.get(f"{coord.url}/v1/runs", headers=coord.admin, timeout=10).status_code == 200
            seen = httpx.get(f"{coord.url}/v1/runs/{run_id}", headers=_bearer(client.token), timeout=10)
            assert seen.status_code == 200, f"after {header}: {seen.status_code} {seen.text[:200]}"
            figures = seen.json()["rounds"][-1]["metrics"]["clients"].get(client_id, {})
            assert figures.get("bytes_down", 0) == expected, f"after {header}: {figures}"
        assert expected >= 15, "the two valid ranges were recorded"
        assert httpx.get(url, headers={**_bearer(client.token), "Range": "bytes=--1000000"},
                         timeout=30).status_code == 416
        client.close()
    finally:
        coord.stop()


# -- one device racing itself, and the round moving on under an upload -------------------------------


def _adapter(client: CoordinatorClient, run_id: str, tmp_path: Path) -> dict[str, np.ndarray]:
    ref = next(r for r in client.current_round(run_id).artifacts if r.name == SLM_ADAPTER)
    return {k: np.array(v) for k, v in load_arrays(client.download(ref, tmp_path / ref.sha256)).items()}


def _body(arrays: dict[str, np.ndarray], samples: str = "10", metrics: str | None = None) -> bytes:
    meta = {META_NUM_SAMPLES: samples, META_METRICS: metrics if metrics is not None else json.dumps({"loss": 1.0})}
    return save_arrays(arrays, meta)


def _put(coord: CoordinatorProcess, run_id: str, client_id: str, token: str, body: bytes) -> httpx.Response:
    return httpx.put(f"{coord.url}/v1/runs/{run_id}/rounds/1/updates/{client_id}", content=body,
                     headers=_bearer(token), timeout=60)


def _blobs(coord: CoordinatorProcess) -> set[str]:
    root = coord.state_dir / "artifacts"
    return {p.name for p in root.glob("??/*") if p.is_file()}


def _at_once(coord: CoordinatorProcess, run_id: str, client_id: str, token: str,
             bodies: list[bytes]) -> list[httpx.Response]:
    """PUT each body from its own thread, all released together."""
    answers: list[httpx.Response] = [None] * len(bodies)  # type: ignore[list-item]
    start = threading.Barrier(len(bodies))

    def send(side: int) -> None:
        start.wait()
        answers[side] = _put(coord, run_id, client_id, token, bodies[side])

    threads = [threading.Thread(target=send, args=(side,)) for side in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_two_different_bodies_at_once_give_one_201_and_one_409(coord, idle, tmp_path) -> None:
    base = _adapter(idle[0], idle[1].run_id, tmp_path)
    for attempt in range(12):
        client, run_id, client_id = _device(coord, f"racer-{attempt}")
        bodies = [_body({k: v + 0.01 * (2 * attempt + side + 1) for k, v in base.items()}) for side in (0, 1)]
        answers = _at_once(coord, run_id, client_id, client.token, bodies)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [201, 409], f"attempt {attempt}: {[(a.status_code, a.text[:200]) for a in answers]}"
        loser = next(a for a in answers if a.status_code == 409)
        assert loser.json()["detail"]["code"] == "update_exists"
        assert "already" in loser.json()["detail"]["message"]
        winner = next(a for a in answers if a.status_code == 201).json()["sha256"]
        refused = bodies[answers.index(loser)]
        assert hashlib.sha256(refused).hexdigest() not in _blobs(coord), "the refused body's blob was kept"
        assert winner in _blobs(coord)
        assert client.current_round(run_id).submitted
        client.close()
    _healthy(coord)


def test_an_update_never_lands_in_a_round_that_has_left_collecting(state_url) -> None:
    """The round driver closes collection while an upload is between its round check and its
    insert: the insert must commit before the transition or be refused, never land after it."""
    from sqlalchemy import event

    uploader, driver = SqlState(state_url), SqlState(state_url)  # two connections, as two threads have
    try:
        uploader.create_run(NewRun(id="r", name="r", algorithm="fedavg", spec={"rounds": 1},
                                   enroll_token_hash="e"), {}, [])
        uploader.enroll_client(ClientRecord(id="c", run_id="r", name="c", token_hash="t"))
        assert uploader.transition("r", 1, RoundState.open, RoundState.collecting)
        at_insert, closed = threading.Event(), threading.Event()

        def pause_before_insert(_conn, _cursor, statement, *_args) -> None:
            # Before the upload's first insert (its update, its bytes up or its artifact row).
            if statement.lstrip().upper().startswith("INSERT") and not at_insert.is_set():
                # Hand the driver its chance to close collection now; a lock held by this
                # transaction makes the driver wait, and this short wait then lets it through.
                at_insert.set()
                closed.wait(timeout=2)

        event.listen(uploader.engine, "before_cursor_execute", pause_before_insert)
        result: list[UpdateOutcome] = []
        upload = threading.Thread(target=lambda: result.append(uploader.insert_update(UpdateRecord(
            run_id="r", round=1, client_id="c", sha256="1" * 64, size=10, num_samples=3)).outcome))
        upload.start()
        at_insert.wait(timeout=30)
        moved = driver.transition("r", 1, RoundState.collecting, RoundState.aggregating)
        at_close = driver.count_updates("r", 1)
        closed.set()
        upload.join()
        assert moved
        assert driver.count_updates("r", 1) == at_close, (
            f"an update ({result}) was recorded after the round left collecting")
    finally:
        uploader.close()
        driver.close()


def test_a_blob_that_cannot_be_stored_leaves_no_update(state_url) -> None:
    """The service stores an update's blob inside the insert's transaction: if storing fails
    (a full disk), the round holds no update that points at a missing blob."""
    state = SqlState(state_url)
    try:
        state.create_run(NewRun(id="r", name="r", algorithm="fedavg", spec={"rounds": 1}, enroll_token_hash="e"),
                         {}, [])
        state.enroll_client(ClientRecord(id="c", run_id="r", name="c", token_hash="t"))

        def disk_full() -> None:
            raise OSError(28, "No space left on device")

        update = UpdateRecord(run_id="r", round=1, client_id="c", sha256="1" * 64, size=10, num_samples=3)
        with pytest.raises(OSError):
            state.insert_update(update, before_commit=disk_full)
        assert state.count_updates("r", 1) == 0 and state.transfer_totals("r", 1) == []
        stored: list[str] = []
        assert state.insert_update(update, before_commit=lambda: stored.append("blob")).outcome \
            is UpdateOutcome.accepted
        assert stored == ["blob"] and state.count_updates("r", 1) == 1
        again = state.insert_update(update, before_commit=lambda: stored.append("again"))
        assert again.outcome is UpdateOutcome.duplicate and stored == ["blob"], "a duplicate stores nothing"
    finally:
        state.close()


# -- hostile upload metadata -----------------------------------------------------------------------


def _nested_header_body(arrays: dict[str, np.ndarray]) -> bytes:
    """A safetensors body whose JSON header nests far past any parser's depth."""
    header = ('{"__metadata__": {"cotune.num_samples": "3"}, "deep": ' + "[" * 20_000 + "]" * 20_000 + "}").encode()
    return struct.pack("<Q", len(header)) + header


def test_hostile_upload_metadata_is_refused_with_what_is_allowed(coord, idle, tmp_path) -> None:
    client, run_id, client_id = _device(coord, "hostile-metadata")
    base = _adapter(client, run_id, tmp_path)
    cap = 1_000_000  # RunSpec.max_samples_per_update's default
    before = _blobs(coord)
    samples = ["²", "١٢", "2**64", str(2**64), str(2**63 - 1), "-1", "0", "1.5", "1e3", " 7", "7\n", "+7",
               "0x10", str(cap + 1), "", MARKER]
    for value in samples:
        r = _put(coord, run_id, client_id, client.token, _body(base, samples=value))
        assert r.status_code == 422, f"num_samples={value!r}: {r.status_code} {r.text[:300]}"
        detail = r.json()["detail"]
        assert detail["code"] == "bad_metadata", detail
        assert f"[1, {cap}]" in detail["message"], detail
        assert MARKER not in r.text
    nested = json.dumps({"loss": 1.0})[:-1] + ', "x": ' + "[" * 20_000 + "]" * 20_000 + "}"
    for label, body in [("nested metrics", _body(base, metrics=nested)),
                        ("nested header", _nested_header_body(base))]:
        r = _put(coord, run_id, client_id, client.token, body)
        assert r.status_code == 422, f"{label}: {r.status_code} {r.text[:300]}"
        assert r.json()["detail"]["code"] in ("bad_metadata", "invalid_safetensors")
        assert "[[[" not in r.text
    assert not client.current_round(run_id).submitted
    assert _blobs(coord) == before, "a refused upload left a blob behind"
    ok = _put(coord, run_id, client_id, client.token, _body(base, samples=str(cap)))
    assert ok.status_code == 201, ok.text
    client.close()
    _healthy(coord)


# -- fsync before the database points at a blob -----------------------------------------------------


def test_a_stored_blob_is_synced_before_and_after_its_rename(tmp_path, monkeypatch) -> None:
    """A power cut cannot be simulated in a test (the page cache survives a killed process), so
    this checks the order of the calls that make a blob durable: the file's data synced before
    it is renamed into the store, and the directory synced after, so that a database row
    committed afterwards never points at an empty or missing blob."""
    import os

    import cloud.store as store_module

    store = store_module.BlobStore(tmp_path / "store")
    source = tmp_path / "upload.part"
    source.write_bytes(b"an update")
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(info.st_mode) else "fsync-file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", replace)
    file_ino = source.stat().st_ino
    digest = store.put_file(source)
    target = store.path(digest)
    assert target.read_bytes() == b"an update"
    kinds = list(events)
    assert ("fsync-file", file_ino) in kinds, events
    assert kinds.index(("fsync-file", file_ino)) < kinds.index(("replace", file_ino)), events
    assert ("fsync-dir", target.parent.stat().st_ino) in kinds[kinds.index(("replace", file_ino)):], events
    # The same for bytes written by the store itself.
    events.clear()
    digest = store.put_bytes(b"another blob")
    replaced = next(i for i, e in enumerate(events) if e[0] == "replace")
    assert any(e[0] == "fsync-file" for e in events[:replaced]), events
    assert ("fsync-dir", store.path(digest).parent.stat().st_ino) in events[replaced:], events
