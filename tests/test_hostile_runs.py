"""Runs against hostile callers and slow steps: enrollment is bounded per run, /v1/generate is
rate limited per device and queue-bounded, a device never sees the coordinator's error text,
a start-up run is joinable and resumes by name, a slow step keeps its lease, build publishing
and run creation take what they share (the build lease, the model lock)."""

from __future__ import annotations

import secrets
import stat
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from cloud.state import RunFull, SqlState
from cloud.state.records import ClientRecord, NewRun
from common.protocol import RoundState
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, TinyWorld, run_spec
from tests.test_faults import _updates

PLUGINS = {"COTUNE_METHODS": "tests.hostile_methods"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _wait_for(check, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _enroll(url: str, token: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/clients", json={"name": name}, headers=_bearer(token), timeout=30)


# -- the state: enrollment counts and inserts in one transaction ---------------------------------


def test_concurrent_enrollments_never_pass_the_bound(state_url: str) -> None:
    state = SqlState(state_url)
    try:
        state.create_run(NewRun(id="r1", name="bounded", algorithm="fedavg", spec={}, enroll_token_hash="h"), {}, [])

        def enroll(k: int) -> bool:
            record = ClientRecord(id=f"c{k:02d}", run_id="r1", name=f"d{k}", token_hash=f"t{k}")
            try:
                state.enroll_client(record, max_clients=3)
                return True
            except RunFull:
                return False

        with ThreadPoolExecutor(12) as pool:
            admitted = list(pool.map(enroll, range(12)))
        assert sum(admitted) == 3
        assert state.count_active_clients("r1") == 3
        # A revoked device frees its place; the bound holds again right after.
        first = next(f"c{k:02d}" for k, ok in enumerate(admitted) if ok)
        assert state.revoke_client(first)
        assert enroll(20)
        assert not enroll(21)
        assert state.count_active_clients("r1") == 3
    finally:
        state.close()


# -- one live coordinator: a FedCoLLM run (it has an LLM to generate with) ------------------------


@pytest.fixture(scope="module")
def coord(world: TinyWorld, tmp_path_factory):
    spec = run_spec(world, name="hostile", algorithm="fedcollm", rounds=1, min_clients=3, max_devices=3)
    extra = {"generate_burst": 2, "generate_rate_per_minute": 0.01, "generate_queue": 8}
    proc = CoordinatorProcess(tmp_path_factory.mktemp("hostile"), run=spec, extra=extra).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def enrolled(coord) -> list[httpx.Response]:
    """Eight devices enroll at once into a run that takes three."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda k: _enroll(coord.url, coord.run["enroll_token"], f"dev{k}"), range(8)))


def test_enrollment_is_bounded_per_run(coord, enrolled) -> None:
    codes = Counter(r.status_code for r in enrolled)
    assert codes == {201: 3, 409: 5}, [r.text for r in enrolled]
    refused = next(r for r in enrolled if r.status_code == 409).json()["detail"]
    assert refused["code"] == "run_full"
    assert "3" in refused["message"] and "max_devices" in refused["message"]
    status = httpx.get(f"{coord.url}/v1/runs/{coord.run_id()}", headers=coord.admin, timeout=10).json()
    assert status["num_clients"] == 3


def test_generate_is_rate_limited_per_device(coord, enrolled) -> None:
    a, b = [r.json()["token"] for r in enrolled if r.status_code == 201][:2]

    def ask(token: str) -> httpx.Response:
        return httpx.post(f"{coord.url}/v1/generate", json={"prompt": "hello", "max_tokens": 2},
                          headers=_bearer(token), timeout=120)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, [a] * 6))
    assert Counter(r.status_code for r in answers) == {200: 2, 429: 4}, [r.text for r in answers]
    for r in answers:
        if r.status_code == 429:
            assert r.json()["detail"]["code"] == "rate_limited"
            assert int(r.headers.get("Retry-After", "0")) >= 1, "a 429 says when to retry"
    assert httpx.get(f"{coord.url}/healthz", timeout=10).status_code == 200
    # Another device has its own allowance.
    other = ask(b)
    assert other.status_code == 200, other.text


def test_an_enroll_token_another_run_uses_is_refused(coord, world: TinyWorld) -> None:
    taken = run_spec(world, name="another", algorithm="fedavg", enroll_token=coord.run["enroll_token"])
    r = httpx.post(f"{coord.url}/v1/runs", json=taken, headers=coord.admin, timeout=60)
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["code"] == "run_exists"
    assert coord.run["enroll_token"] not in r.text
    # The same spec again resumes the run; another spec under its name says what differs.
    again = httpx.post(f"{coord.url}/v1/runs", json=coord.run, headers=coord.admin, timeout=60)
    assert again.status_code == 200 and again.json()["created"] is False
    changed = httpx.post(f"{coord.url}/v1/runs", json={**coord.run, "rounds": 7, "seed": 3},
                         headers=coord.admin, timeout=60)
    assert changed.status_code == 409
    assert "rounds" in changed.json()["detail"]["message"] and "seed" in changed.json()["detail"]["message"]


# -- a coordinator whose model lock is held until the test opens a gate ---------------------------


@pytest.fixture(scope="module")
def gated(world: TinyWorld, tmp_path_factory):
    root = tmp_path_factory.mktemp("gated")
    params = {"gate": str(root / "gate"), "entered": str(root / "entered"),
              "fail": "cannot read /srv/private/aux.jsonl: permission denied"}
    spec = run_spec(world, name="gated", algorithm="test-gatedcollm", rounds=1, min_clients=1, params=params)
    extra = {"generate_burst": 100, "generate_rate_per_minute": 6000.0, "generate_queue": 2}
    proc = CoordinatorProcess(root / "coord", run=spec, extra=extra, env=PLUGINS).start()
    _wait_for(lambda: Path(params["entered"]).exists(), "the run's starting scores to hold the model lock")
    # Enrolled while the run still runs: the gate, once open, fails it.
    devices = [_enroll(proc.url, spec["enroll_token"], name).json() for name in ("asker", "reader")]
    yield proc, params, devices
    Path(params["gate"]).touch()
    proc.stop()


def test_generate_queue_is_bounded(gated) -> None:
    coord, params, devices = gated
    token = devices[0]["token"]
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(httpx.post(f"{coord.url}/v1/generate", json={"prompt": "hi", "max_tokens": 1},
                                  headers=_bearer(token), timeout=300))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        # Two wait for the models the run holds; the other six are answered at once.
        _wait_for(lambda: len(answers) >= 6, "six answers while the model lock is held", timeout=60)
        assert Counter(r.status_code for r in answers) == {429: 6}, [r.text for r in answers]
        for r in answers:
            assert r.json()["detail"]["code"] == "busy"
            assert int(r.headers.get("Retry-After", "0")) >= 1, "a 429 says when to retry"
        assert httpx.get(f"{coord.url}/healthz", timeout=10).status_code == 200
    finally:
        Path(params["gate"]).touch()
        for t in threads:
            t.join(300)
    assert Counter(r.status_code for r in answers) == {429: 6, 200: 2}, [r.text for r in answers]


def test_a_device_never_sees_the_coordinators_error_text(gated) -> None:
    coord, params, devices = gated
    device = devices[1]
    Path(params["gate"]).touch()
    run_id = device["run_id"]
    _wait_for(lambda: coord.status(run_id)["state"] == "failed", "the run to fail")
    assert "/srv/private" in coord.status(run_id)["error"], "the admin sees what went wrong"
    seen = httpx.get(f"{coord.url}/v1/runs/{run_id}", headers=_bearer(device["token"]), timeout=10).json()
    assert seen["state"] == "failed"
    assert seen["error"] and "/srv/private" not in seen["error"] and "RuntimeError" not in seen["error"]


# -- a start-up run without an enroll token ------------------------------------------------------


def test_a_start_up_run_is_joinable_and_resumes_by_name(world: TinyWorld, tmp_path: Path) -> None:
    spec = run_spec(world, name="startup", algorithm="fedavg", rounds=1)
    del spec["enroll_token"]
    coord = CoordinatorProcess(tmp_path / "coord", run=spec)
    coord.start()
    try:
        token_file = tmp_path / "coord" / "enroll_token-startup"
        assert token_file.is_file(), coord.log_tail()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert str(token_file) in coord.log_tail() and token in coord.log_tail()
        assert _enroll(coord.url, token, "first").status_code == 201
        run_id = coord.run_id()
    finally:
        coord.stop()

    log = coord.state_dir / "coordinator.log"
    before = len(log.read_text())
    coord.start()  # the same command again
    try:
        assert [r["run_id"] for r in httpx.get(f"{coord.url}/v1/runs", headers=coord.admin).json()] == [run_id]
        assert token_file.read_text().strip() == token
        assert _enroll(coord.url, token, "second").status_code == 201
        assert token not in log.read_text()[before:], "the token is printed once, when it is made"
    finally:
        coord.stop()

    coord.run = {**spec, "rounds": 5}
    with pytest.raises(RuntimeError):
        coord.start()
    assert "rounds" in coord.log_tail(3), coord.log_tail()


# -- two replicas, a server step longer than the lease ------------------------------------------


def test_a_slow_server_step_keeps_its_lease(world: TinyWorld, tmp_path: Path, state_url: str) -> None:
    calls = tmp_path / "server_steps"
    spec = run_spec(world, name="slow", algorithm="test-slowavg", rounds=1, min_clients=1,
                    params={"sleep_s": 10.0, "calls": str(calls)})
    shared = {"state_url": state_url, "artifact_dir": str(tmp_path / "blobs"), "lease_s": 3.0}
    first = CoordinatorProcess(tmp_path / "r1", run=spec, extra=shared, env=PLUGINS).start()
    second = CoordinatorProcess(tmp_path / "r2", run=spec, extra=shared, env=PLUGINS,
                                admin_token=first.admin_token).start()
    try:
        client = CoordinatorClient(first.url)
        creds = client.register(spec["enroll_token"], "a")
        (body,) = _updates(client, creds.run_id, tmp_path, [1])
        client.upload_update(creds.run_id, 1, creds.client_id, body)
        _wait_for(lambda: first.status(creds.run_id)["state"] != "running", "the run to end", timeout=180)
        status = first.status(creds.run_id)
        assert status["state"] == "finished", status["error"] or first.log_tail() + second.log_tail()
        client.close()
    finally:
        first.stop()
        second.stop()
    assert len(calls.read_text().splitlines()) == 1, "the server step ran more than once"
    engine = create_engine(state_url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT e.step, COUNT(DISTINCT e.instance) FROM round_events e GROUP BY e.step ORDER BY e.step")).all()
    engine.dispose()
    assert [step for step, _ in rows] == ["aggregating", "server_step"]
    assert all(instances == 1 for _, instances in rows), rows


# -- in process: build publishing takes a lease, run creation the model lock --------------------


def _finished_run(state: SqlState, runs: Any, spec: dict[str, Any]) -> str:
    from common.protocol import RunSpec

    run_id = runs.create(RunSpec.model_validate(spec)).run_id
    inputs = dict(state.get_round(run_id, 1).inputs)
    S = RoundState
    for old, new in [(S.open, S.collecting), (S.collecting, S.aggregating), (S.aggregating, S.server_step)]:
        assert state.transition(run_id, 1, old, new)
    assert state.transition(run_id, 1, S.server_step, S.publishing, outputs=inputs)
    assert state.close_round(run_id, 1, last=True)
    return run_id


def test_two_publishers_export_a_runs_builds_once(world: TinyWorld, tmp_path: Path) -> None:
    from cloud.models import ModelHolder
    from cloud.rounds import DriverConfig, RoundDriver
    from cloud.services.builds import BuildsService
    from cloud.services.runs import RunsService, strategy_factory
    from cloud.store import BlobStore
    from common.protocol import BuildInfo

    state = SqlState(f"sqlite:///{tmp_path / 'state.db'}")
    store = BlobStore(tmp_path / "blobs")
    runs = RunsService(state, store, strategy_factory(store, ModelHolder(store)))
    run_id = _finished_run(state, runs, run_spec(world, name="built", algorithm="fedavg", rounds=1,
                                                 builds=["gguf:f16"], eval_data=None))
    exports: list[str] = []
    release = threading.Event()

    def slow_publish(run_id: str, targets: list[str]) -> list[BuildInfo]:
        exports.append(run_id)
        release.wait(10)
        return [BuildInfo(name="gguf-f16", round=1, manifest={}, files=[])]

    drivers = []
    for instance in ("a", "b"):
        builds = BuildsService(state, store, runs, tmp_path)
        builds.publish = slow_publish  # type: ignore[method-assign]
        drivers.append(RoundDriver(state, runs, store, threading.Lock(), DriverConfig(instance, lease_s=30.0),
                                   builds=builds))
    first = threading.Thread(target=drivers[0].tick)
    first.start()
    try:
        _wait_for(lambda: exports, "the first publisher to start exporting", timeout=30)
        drivers[1].tick()  # the second replica, while the first is still exporting
    finally:
        release.set()
        first.join(30)
    assert exports == [run_id]
    assert state.get_run(run_id).metrics["builds"] == {"names": ["gguf-f16"]}
    state.close()


def test_run_creation_uses_the_held_models_under_the_model_lock(world: TinyWorld, tmp_path: Path) -> None:
    from cloud.coordinator import Coordinator
    from cloud.settings import CoordinatorSettings
    from cloud.strategies.fedavg import FedAvg
    from common.protocol import RunSpec

    parts: dict[str, Coordinator] = {}
    locked: list[bool] = []

    class Watched(FedAvg):
        def initial_inputs(self) -> dict[str, str]:
            locked.append(parts["coord"].model_lock.locked())
            return super().initial_inputs()

    settings = CoordinatorSettings(state_url="sqlite://", artifact_dir=tmp_path / "blobs", work_dir=tmp_path / "w",
                                   admin_token=secrets.token_urlsafe(24))
    coord = Coordinator(settings, factory=lambda spec: Watched(spec, coord.store, coord.holder))
    parts["coord"] = coord
    try:
        coord.runs.create(RunSpec.model_validate(run_spec(world, name="locked", algorithm="fedavg")))
    finally:
        coord.close()
    assert locked == [True]


def test_max_devices_below_the_quorum_is_refused(world: TinyWorld, tmp_path: Path) -> None:
    from cloud.coordinator import Coordinator
    from cloud.errors import ApiError
    from cloud.settings import CoordinatorSettings
    from common.protocol import RunSpec

    settings = CoordinatorSettings(state_url="sqlite://", artifact_dir=tmp_path / "blobs", work_dir=tmp_path / "w",
                                   admin_token=secrets.token_urlsafe(24))
    coord = Coordinator(settings)
    try:
        with pytest.raises(ApiError) as info:
            coord.runs.create(RunSpec.model_validate(run_spec(world, name="tiny", algorithm="fedavg",
                                                              min_clients=3, max_devices=2)))
        assert info.value.status == 422 and "max_devices" in info.value.detail.message
        assert coord.state.list_runs() == []
    finally:
        coord.close()


def test_a_token_bucket_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    from cloud.services.limits import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(rate_per_s=0.5, burst=2, clock=lambda: now[0])
    assert buckets.take("a") == 0.0 and buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(2.0), "one token comes back in 1/rate seconds"
    assert buckets.take("b") == 0.0, "each key has its own bucket"
    now[0] = 1.0
    assert buckets.take("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert buckets.take("a") == 0.0
    buckets.give_back("b")
    buckets.give_back("b")
    assert [buckets.take("b") > 0 for _ in range(3)] == [False, False, True], "never more than the burst"


def test_secret_files_are_owner_only_from_the_first_byte(tmp_path: Path, monkeypatch) -> None:
    """Created 0600 whatever the umask, never loosened first and tightened by chmod after; a
    file that was there with a looser mode is replaced."""
    import os

    from cloud.startup import write_secret

    chmods: list[str] = []
    monkeypatch.setattr(os, "chmod", lambda path, *a, **k: chmods.append(str(path)))
    monkeypatch.setattr(Path, "chmod", lambda self, *a, **k: chmods.append(str(self)))
    old = os.umask(0)
    try:
        fresh, loose = tmp_path / "admin_token", tmp_path / "enroll_token-x"
        loose.write_text("old")  # 0666 under umask 0
        for path in (fresh, loose):
            write_secret(path, "s3cret")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
            assert path.read_text() == "s3cret\n"
    finally:
        os.umask(old)
    assert chmods == []
