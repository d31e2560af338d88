"""A device facing a hostile or broken coordinator: names that would write outside the
device's state directory, a download left complete by a crash, credentials on disk.

The hostile coordinator is a small HTTP server on loopback that answers what the test tells
it to; the device is the real `EdgeWorker`, talking real HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.methods.contract import SLM_PREFIX
from common.protocol import ArtifactRef
from common.retry import Backoff
from common.tensorfile import save_arrays
from edge_sdk.client import CoordinatorClient, IntegrityError
from edge_sdk.worker import ArtifactCache, EdgeWorker, JoinConfig
from tests.support import CoordinatorProcess, run_spec

RUN_ID = "run-1"
PAYLOAD = b"print('owned')\n"
SHA = hashlib.sha256(PAYLOAD).hexdigest()

Route = Callable[[str, str], tuple[int, Any]]


@dataclass(frozen=True)
class Flood:
    """A body of `size` zero bytes, sent in chunks while the device keeps reading."""

    size: int


class FakeCoordinator:
    """Answers each request with `route(method, path)`: (status, JSON-able body or bytes)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.requests: list[tuple[str, str]] = []
        self.sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests.append((self.command, self.path))
                status, body = outer.route(self.command, self.path)
                if isinstance(body, Flood):
                    return self._flood(body.size)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _flood(self, size: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    while outer.sent < size:
                        self.wfile.write(chunk)
                        outer.sent += len(chunk)
                except OSError:  # the device hung up
                    pass

            do_GET = do_POST = do_PUT = _answer  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _task() -> dict[str, Any]:
    return {"kind": "lora_sft", "lora": {"r": 4, "alpha": 8.0}, "train": {}, "seed": 0}


def _round(artifacts: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    info = {"run_id": RUN_ID, "run_state": "running", "rounds_total": 1, "round": 1, "state": "collecting",
            "artifacts": artifacts, "task": _task(), "submitted": False}
    return {**info, **overrides}


def _ref(name: str, data: bytes = PAYLOAD) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _serve(round_info: dict[str, Any], builds: dict[str, Any] | None = None,
           run_id: str = RUN_ID, blobs: dict[str, bytes] | None = None) -> Route:
    blobs = {SHA: PAYLOAD, **(blobs or {})}

    def route(method: str, path: str) -> tuple[int, Any]:
        if method == "POST" and path == "/v1/clients":
            return 201, {"client_id": "c1", "run_id": run_id, "token": "device-token"}
        if path.endswith("/rounds/current"):
            return 200, round_info
        if "/builds" in path and builds is not None:
            return 200, builds
        if (m := re.fullmatch(r"/v1/artifacts/([0-9a-f]{64})", path)) and m.group(1) in blobs:
            return 200, blobs[m.group(1)]
        return 404, {"detail": {"code": "not_found", "message": "no such thing"}}

    return route


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A folder holding the device's state dir; anything written beside `state` escaped it."""
    root = tmp_path / "box"
    (root / "state").mkdir(parents=True)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{k}", "response": f"r{k}"}) + "\n" for k in range(3)))
    return root


def _outside(box: Path) -> list[str]:
    """Everything under `box` that the device wrote outside its state dir."""
    return sorted(str(p.relative_to(box)) for p in box.rglob("*")
                  if p.name != "data.jsonl" and p != box / "state" and box / "state" not in p.parents)


def _worker(box: Path, url: str) -> EdgeWorker:
    return EdgeWorker(JoinConfig(coordinator=url, enroll_token="enroll", data=box / "data.jsonl",
                                 state_dir=box / "state", poll_s=0.05, progress=False),
                      on_event=lambda msg: None)


def _join_against(box: Path, route: Route) -> tuple[str, BaseException]:
    fake = FakeCoordinator(route)
    try:
        with pytest.raises(Exception) as caught:
            _worker(box, fake.url).run()
        return fake.url, caught.value
    finally:
        fake.close()


HOSTILE_ARTIFACTS = [
    pytest.param(f"{SLM_PREFIX}/../../../escaped.py", id="dot-dot"),
    pytest.param(f"{SLM_PREFIX}/..\\..\\..\\escaped.py", id="backslash"),
    pytest.param(f"{SLM_PREFIX}/C:/escaped.py", id="drive-letter"),
    pytest.param(f"{SLM_PREFIX}/model\x00.safetensors", id="nul"),
    pytest.param(f"{SLM_PREFIX}/", id="empty"),
]


@pytest.mark.parametrize("name", HOSTILE_ARTIFACTS)
def test_artifact_name_that_leaves_the_model_dir_stops_the_device(box: Path, name: str) -> None:
    url, exc = _join_against(box, _serve(_round([_ref(name)])))
    assert isinstance(exc, RuntimeError), f"{type(exc).__name__}: {exc}"
    assert "artifact" in str(exc) and url in str(exc) and "refus" in str(exc)
    assert _outside(box) == []


def test_absolute_artifact_name_writes_nothing_there(box: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "escaped.py"
    target.parent.mkdir()
    url, exc = _join_against(box, _serve(_round([_ref(f"{SLM_PREFIX}/{target}")])))
    assert isinstance(exc, RuntimeError) and url in str(exc), f"{type(exc).__name__}: {exc}"
    assert not target.exists()
    assert _outside(box) == []


def test_symlink_in_the_model_dir_is_not_written_through(box: Path) -> None:
    model_dir = box / "state" / "model" / SLM_PREFIX
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").symlink_to(box / "victim.json")  # dangling: a write would create it
    url, exc = _join_against(box, _serve(_round([_ref(f"{SLM_PREFIX}/config.json")])))
    assert isinstance(exc, RuntimeError) and url in str(exc), f"{type(exc).__name__}: {exc}"
    assert not (box / "victim.json").exists()


def test_run_id_that_is_a_path_is_refused_at_enrollment(box: Path) -> None:
    url, exc = _join_against(box, _serve(_round([]), run_id="../../escaped"))
    assert isinstance(exc, RuntimeError) and "run id" in str(exc) and url in str(exc), f"{exc!r}"
    assert not (box / "state" / "credentials.json").exists(), "credentials for a refused run were kept"
    assert _outside(box) == []


def test_round_of_another_run_stops_the_device(box: Path) -> None:
    url, exc = _join_against(box, _serve(_round([], run_id="someone-elses-run")))
    assert isinstance(exc, RuntimeError) and "answered for run" in str(exc) and url in str(exc), f"{exc!r}"


def test_own_slm_folder_of_a_run_id_that_is_a_path_is_refused(box: Path) -> None:
    """Co-PLMs and CrossLM keep the device's private adapter under state/<method>/<run id>."""
    from common.protocol import RoundInfo
    from edge_sdk.handlers import DeviceContext
    from edge_sdk.handlers.own_slm import OwnSlm

    ctx = DeviceContext(records=[], eval_records=[], cache=None, state_dir=box / "state",  # type: ignore[arg-type]
                        say=lambda msg: None, coordinator="http://coordinator.example")
    info = RoundInfo.model_validate(_round([], run_id="../../escaped"))
    with pytest.raises(RuntimeError, match="run id.*http://coordinator.example"):
        OwnSlm(ctx, "coplms", fallback_prefix="dpm")._dir(info)


def _manifest() -> dict[str, Any]:
    return {"format": "gguf", "quantization": "q8_0", "architecture": "llama", "model_file": "model.gguf",
            "base_model": "tiny"}


@pytest.mark.parametrize(("build_name", "file_name"), [
    pytest.param("../../../escaped", "model.gguf", id="build-name"),
    pytest.param("gguf-q8_0", "../../../../escaped.py", id="file-name"),
    pytest.param("gguf-q8_0", "{box}/escaped.py", id="absolute-file-name"),
])
def test_build_list_that_leaves_the_build_dir_stops_the_device(box: Path, build_name: str,
                                                               file_name: str) -> None:
    file_name = file_name.format(box=box)
    # A well-formed adapter: the device keeps it (and its peft copy) before it pulls the builds.
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    body = save_arrays({f"{module}.lora_A.weight": np.zeros((4, 8), np.float32),
                        f"{module}.lora_B.weight": np.zeros((8, 4), np.float32)})
    adapter = _ref(f"{SLM_PREFIX}/adapter.safetensors", body)
    finished = _round([adapter], run_state="finished", state="closed", builds="ready")
    build = {"name": build_name, "round": 1, "manifest": _manifest(), "files": [_ref(file_name)]}
    url, exc = _join_against(box, _serve(finished, builds={"best": build, "builds": [build]},
                                         blobs={adapter["sha256"]: body}))
    assert isinstance(exc, RuntimeError), f"{type(exc).__name__}: {exc}"
    assert "build" in str(exc) and url in str(exc) and "refus" in str(exc)
    assert _outside(box) == []


def test_credentials_are_created_private(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token file never exists with a looser mode: it is created 0600, not chmod'ed after.
    With umask 0 and chmod disabled, a file written first and tightened later stays readable."""
    chmods: list[str] = []
    monkeypatch.setattr(os, "chmod", lambda path, *a, **k: chmods.append(str(path)))
    monkeypatch.setattr(Path, "chmod", lambda self, *a, **k: chmods.append(str(self)))
    old = os.umask(0)
    fake = FakeCoordinator(_serve(_round([])))
    try:
        _worker(box, fake.url)._credentials()
    finally:
        os.umask(old)
        fake.close()
    path = box / "state" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert json.loads(path.read_text())["credentials"]["token"] == "device-token"
    assert list((box / "state").iterdir()) == [path], "a temporary copy of the token was left behind"


def test_download_longer_than_listed_is_cut_off(tmp_path: Path) -> None:
    """A coordinator that streams more than an artifact's listed size cannot fill the disk."""
    flood = 256 * 2**20
    fake = FakeCoordinator(lambda method, path: (200, Flood(flood)))
    client = CoordinatorClient(fake.url, token="t", backoff=Backoff(max_tries=1))
    try:
        with pytest.raises(IntegrityError, match="more than its listed"):
            client.download(ArtifactRef(name="slm/model.safetensors", sha256=SHA, size=len(PAYLOAD)),
                            tmp_path / "blob")
    finally:
        client.close()
        fake.close()
    assert fake.sent < flood // 4, f"the device read {fake.sent} bytes of a {len(PAYLOAD)}-byte artifact"
    assert list(tmp_path.iterdir()) == []


# -- a download a crash left complete, against a live coordinator ------------------------


@pytest.fixture(scope="module")
def live(world, tmp_path_factory: pytest.TempPathFactory):
    spec = run_spec(world, name="device-resume", algorithm="fedavg", rounds=1, min_clients=2)
    coord = CoordinatorProcess(tmp_path_factory.mktemp("coord"), run=spec).start()
    yield coord
    coord.stop()


def _model_ref(client: CoordinatorClient, run_id: str) -> ArtifactRef:
    return next(r for r in client.current_round(run_id).artifacts if r.name == f"{SLM_PREFIX}/model.safetensors")


@pytest.mark.parametrize("part_state", ["complete", "complete-but-corrupt", "all-the-server-has"])
def test_device_restarts_with_a_complete_part_file(live: CoordinatorProcess, tmp_path: Path,
                                                   part_state: str) -> None:
    """A crash between the last byte and the rename leaves `<blob>.part` whole; the restarted
    device asked `bytes=<size>-`, got 416 and failed on every restart."""
    client = CoordinatorClient(live.url, backoff=Backoff(max_tries=3, base_s=0.01))
    try:
        creds = client.register(live.run["enroll_token"], f"resume-{part_state}")
        ref = _model_ref(client, creds.run_id)
        good = client.download(ref, tmp_path / "first" / ref.sha256)
        cache = ArtifactCache(tmp_path / "cache", client)
        part = cache.root / "blobs" / f"{ref.sha256}.part"
        part.parent.mkdir(parents=True)
        shutil.copyfile(good, part)
        if part_state == "complete-but-corrupt":
            with part.open("r+b") as fh:
                fh.seek(ref.size // 2)
                fh.write(b"\xff" * 16)
        if part_state == "all-the-server-has":  # the listing said more than the blob holds: 416
            ref = ref.model_copy(update={"size": ref.size + 7})
        path = cache.fetch(ref)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256
        assert not part.exists()
    finally:
        client.close()


def test_a_new_enroll_token_is_not_silently_ignored(box: Path) -> None:
    """A state directory enrolled in one run, started with another run's enroll token, stops with
    what to do instead of joining the old run again."""
    fake = FakeCoordinator(_serve(_round([])))
    try:
        _worker(box, fake.url)._credentials()
        again = _worker(box, fake.url)._credentials()  # the same token: the same enrollment, kept
        assert again.token == "device-token"
        other = EdgeWorker(JoinConfig(coordinator=fake.url, enroll_token="another-run", data=box / "data.jsonl",
                                      state_dir=box / "state", poll_s=0.05, progress=False),
                           on_event=lambda msg: None)
        with pytest.raises(RuntimeError, match="another enroll token.*--state-dir"):
            other._credentials()
    finally:
        fake.close()
