"""A fuzz run over the coordinator's own OpenAPI document (schemathesis): whatever it sends,
as the admin, as a device or as nobody, the coordinator never answers with a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, run_spec


@pytest.fixture(scope="module")
def coord(world, tmp_path_factory):
    spec = run_spec(world, name="fuzzed", algorithm="fedavg", rounds=2, min_clients=2)
    proc = CoordinatorProcess(tmp_path_factory.mktemp("fuzz"), run=spec,
                              extra={"max_update_bytes": 64 * 1024}).start()
    yield proc
    proc.stop()


def _schemathesis(coord: CoordinatorProcess, token: str | None, report: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (it comes with cotune[dev])")
    cmd = [exe, "run", f"{coord.url}/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "40", "--seed", "1", "--workers", "1", "--max-time", "40",
           "--request-timeout", "30", "--suppress-health-check", "all", "--warnings", "off",
           "--report", "junit", "--report-junit-path", str(report)]
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
