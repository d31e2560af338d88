"""A fuzz run over the coordinator's own OpenAPI document (schemathesis): whatever it sends,
as the admin, as a device or as nobody, the coordinator never answers with a 5xx.

Beyond the sweep, a device session that holds a real round open: an enrolled device of a run
whose round 1 is collecting, with the path parameters pinned to that run, that round, that
device and an artifact it may download, so generated requests reach the upload's full checks;
and generated uploads (hypothesis) built from the round's own adapter with hostile metadata,
values, tensors and header bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_METRICS, META_NUM_SAMPLES
from common.tensorfile import load_arrays, save_arrays
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, run_spec


@pytest.fixture(scope="module")
def coord(world, tmp_path_factory):
    # A long deadline: the round a device session holds open stays collecting while it is fuzzed.
    spec = run_spec(world, name="fuzzed", algorithm="fedavg", rounds=2, min_clients=2, round_deadline_s=3600.0)
    proc = CoordinatorProcess(tmp_path_factory.mktemp("fuzz"), run=spec,
                              extra={"max_update_bytes": 256 * 1024}).start()
    yield proc
    proc.stop()


def _schemathesis(coord: CoordinatorProcess, token: str | None, report: Path, config: Path | None = None,
                  har: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (it comes with cotune[dev])")
    cmd = [exe, *(["--config-file", str(config)] if config else []), "run", f"{coord.url}/openapi.json",
           "--checks", "not_a_server_error",
           # Stopping the fuzzed run would end it for the sweeps that follow (stop has its own tests).
           "--exclude-path", "/v1/runs/{run_id}/stop",
           "--max-examples", "40", "--seed", "1", "--workers", "1", "--max-time", "40",
           "--request-timeout", "30", "--suppress-health-check", "all", "--warnings", "off",
           "--report", "junit" + (",har" if har else ""), "--report-junit-path", str(report)]
    if har:
        cmd += ["--report-har-path", str(har)]
    if token:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("who", ["admin", "device", "anonymous"])
def test_no_server_errors_under_fuzzing(coord, who, tmp_path) -> None:
    token = None
    if who == "admin":
        token = coord.admin_token
    elif who == "device":
        client = CoordinatorClient(coord.url)
        token = client.register(coord.run["enroll_token"], "fuzz-device").token
        client.close()
    result = _schemathesis(coord, token, tmp_path / "junit.xml")
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"schemathesis found server errors as {who}:\n{tail}\n{coord.log_tail()}"
    assert coord.proc.poll() is None, "the coordinator died under fuzzing"


# -- a device session holding a real round open ----------------------------------------------------


class Session:
    """An enrolled device of the fuzzed run, its round 1 collecting, and the adapter it trains."""

    def __init__(self, coord: CoordinatorProcess, tmp: Path) -> None:
        self.idle = CoordinatorClient(coord.url)  # enrolled, never uploads: the round cannot close early
        self.idle.register(coord.run["enroll_token"], "fuzz-idle")
        self.client = CoordinatorClient(coord.url)
        creds = self.client.register(coord.run["enroll_token"], "fuzz-session")
        self.run_id, self.client_id, self.token = creds.run_id, creds.client_id, creds.token
        deadline = time.monotonic() + 60
        while (info := self.client.current_round(self.run_id)).state.value != "collecting":
            assert time.monotonic() < deadline, f"round 1 never started collecting: {info}"
            time.sleep(0.2)
        self.round = info.round
        self.adapter_ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
        path = self.client.download(self.adapter_ref, tmp / self.adapter_ref.sha256)
        self.adapter = {k: np.array(v) for k, v in load_arrays(path).items()}

    def upload_url(self, coord: CoordinatorProcess) -> str:
        return f"{coord.url}/v1/runs/{self.run_id}/rounds/{self.round}/updates/{self.client_id}"

    def close(self) -> None:
        self.client.close()
        self.idle.close()


@pytest.fixture(scope="module")
def session(coord, tmp_path_factory):
    made = Session(coord, tmp_path_factory.mktemp("session"))
    yield made
    made.close()


def test_no_server_errors_in_a_device_session_holding_a_round_open(coord, session, tmp_path) -> None:
    config = tmp_path / "schemathesis.toml"
    # Every generated request names this run, round, device and a downloadable artifact.
    config.write_text("\n".join([
        "[parameters]",
        f'"path.run_id" = "{session.run_id}"',
        f'"path.client_id" = "{session.client_id}"',
        f'"path.number" = {session.round}',
        f'"path.sha256" = "{session.adapter_ref.sha256}"',
    ]) + "\n")
    har = tmp_path / "requests.har"
    result = _schemathesis(coord, session.token, tmp_path / "junit.xml", config=config, har=har)
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"schemathesis found server errors in a device session:\n{tail}\n{coord.log_tail()}"
    assert coord.proc.poll() is None, "the coordinator died under fuzzing"
    # The session was real: generated uploads reached the checks of the open round's own slot.
    uploads = [e for e in json.loads(har.read_text())["log"]["entries"]
               if e["request"]["method"] == "PUT" and e["request"]["url"].startswith(session.upload_url(coord))]
    statuses = {e["response"]["status"] for e in uploads}
    assert uploads and statuses & {413, 422}, f"no generated upload reached the round's checks: {statuses}"
    assert session.client.current_round(session.run_id).round == session.round, "the round moved on"


def test_generated_uploads_in_an_open_round_never_get_a_5xx(coord, session) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=16)
    reports = st.fixed_dictionaries({}, optional={
        "loss": json_values, "train": json_values, "eval": json_values,
        "privacy": st.fixed_dictionaries({}, optional={"epsilon": json_values, "delta": json_values}),
    })
    metrics = st.one_of(reports.map(json.dumps), json_values.map(json.dumps), st.text(max_size=40),
                        st.sampled_from(['{"loss": NaN}', '{"privacy": {"epsilon": "x"}}', "[" * 5000 + "]" * 5000,
                                         '{"loss": 1e999}']))
    samples = st.one_of(st.integers(-(2**70), 2**70).map(str), st.text(max_size=24),
                        st.sampled_from(["²", "١٢", "2**64", "1e3", "0x10", " 7", "+7", "007", "1000000"]))
    metadata = st.one_of(
        st.fixed_dictionaries({}, optional={META_NUM_SAMPLES: samples, META_METRICS: metrics}),
        st.dictionaries(st.text(max_size=16), st.text(max_size=32), max_size=4))
    changes = st.sampled_from(["none", "nan", "inf", "huge", "drop", "extra", "float16", "shape"])
    flips = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3)

    @hypothesis.settings(max_examples=60, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(meta=metadata, change=changes, flips=flips)
    def upload(meta: dict[str, str], change: str, flips: list[tuple[int, int]]) -> None:
        body = bytearray(save_arrays(_changed(session.adapter, change), meta))
        for offset, value in flips:  # into the length prefix and the JSON header
            if offset < len(body):
                body[offset] = value
        r = httpx.put(session.upload_url(coord), content=bytes(body), timeout=60,
                      headers={"Authorization": f"Bearer {session.token}"})
        assert r.status_code < 500, f"{r.status_code} {r.text[:300]}\n{coord.log_tail()}"
        if r.status_code >= 400:
            assert r.json()["detail"]["code"], r.text[:300]

    upload()
    assert coord.proc.poll() is None, "the coordinator died under fuzzing"
    assert session.client.current_round(session.run_id).round == session.round, "the round moved on"


def _changed(adapter: dict[str, np.ndarray], change: str) -> dict[str, np.ndarray]:
    arrays = {k: v.copy() for k, v in adapter.items()}
    first = sorted(arrays)[0]
    if change == "nan":
        arrays[first].flat[0] = np.nan
    elif change == "inf":
        arrays[first].flat[-1] = -np.inf
    elif change == "huge":
        arrays[first].flat[0] = np.float32(3e38)
    elif change == "drop":
        del arrays[first]
    elif change == "extra":
        arrays["extra.weight"] = np.zeros(3, np.float32)
    elif change == "float16":
        arrays[first] = arrays[first].astype(np.float16)
    elif change == "shape":
        arrays[first] = np.zeros((arrays[first].size + 1,), np.float32)
    return arrays
