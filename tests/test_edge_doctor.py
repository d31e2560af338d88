"""`cotune edge doctor` reports what this install can do, and `cotune edge join` stops before
enrolling when the install cannot train (the one line names the extra to install)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from cotune.demo.quickstart import child_env, cotune_cmd
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, join_cmd, run_spec
from tests.test_edge_installs import BLOCKER

ROOT = Path(__file__).resolve().parents[1]


def doctor(*args: str) -> dict:
    out = subprocess.run(cotune_cmd("edge", "doctor", "--json", *args), capture_output=True, text=True,
                         timeout=180, cwd=ROOT, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def coord(world, tmp_path_factory: pytest.TempPathFactory):
    spec = run_spec(world, name="doctor", algorithm="fedavg", rounds=1, min_clients=2)
    process = CoordinatorProcess(tmp_path_factory.mktemp("doctor"), run=spec).start()
    yield process
    process.stop()


def test_doctor_reports_this_machine() -> None:
    report = doctor()
    assert report["backends"]["llama.cpp"]["available"] is True
    assert report["backends"]["onnxruntime"]["available"] is True
    assert "CPUExecutionProvider" in report["backends"]["onnxruntime"]["providers"]
    assert report["can_train"] is True and report["extras"]["train"]["missing"] == []
    assert report["can_build"] is True
    assert report["profile"]["cores"] >= 1 and report["profile"]["ram_bytes"] > 0
    assert set(report["gpu"]) >= {"torch_cuda", "onnxruntime_gpu_providers", "llama_cpp_gpu_offload"}
    assert report["builds"] is None


def _build(name: str, fmt: str, quant: str, size: int) -> dict:
    files = [{"name": f"model.{fmt}", "sha256": "0" * 64, "size": size}]
    manifest = {"format": fmt, "quantization": quant, "architecture": "llama", "model_file": f"model.{fmt}",
                "base_model": "tiny", "files": files}
    return {"name": name, "round": 1, "manifest": manifest, "files": []}


def test_doctor_says_which_builds_fit(tmp_path: Path) -> None:
    listing = {"builds": [_build("onnx-int8", "onnx", "int8", 10 << 20), _build("gguf-q8_0", "gguf", "q8_0", 10 << 20),
                          _build("gguf-f32", "gguf", "f32", 1 << 50)]}
    path = tmp_path / "builds.json"
    path.write_text(json.dumps(listing))
    fits = {b["name"]: b for b in doctor("--builds", str(path))["builds"]}
    assert fits["gguf-q8_0"]["fits"] and fits["gguf-q8_0"]["best"], "llama.cpp is preferred when both fit"
    assert fits["onnx-int8"]["fits"] and not fits["onnx-int8"]["best"]
    assert not fits["gguf-f32"]["fits"] and "RAM" in " ".join(fits["gguf-f32"]["reasons"])


def test_doctor_refuses_a_file_that_is_not_a_build_list(tmp_path: Path) -> None:
    path = tmp_path / "builds.json"
    path.write_text('{"builds": [{"name": 3}]}')
    out = subprocess.run(cotune_cmd("edge", "doctor", "--builds", str(path)), capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=child_env())
    # typer wraps the message in a panel as wide as the terminal: read it as one line of words
    words = " ".join(out.stderr.replace("│", " ").split())
    assert out.returncode != 0 and "is not a build list" in words and "Traceback" not in out.stderr


def test_doctor_reads_the_run_builds_from_the_coordinator(coord: CoordinatorProcess, tmp_path: Path) -> None:
    client = CoordinatorClient(coord.url)
    creds = client.register(coord.run["enroll_token"], "doctor-probe")
    saved = tmp_path / "credentials.json"
    saved.write_text(json.dumps({"coordinator": coord.url, "credentials": creds.model_dump()}))
    report = doctor("--coordinator", coord.url, "--credentials", str(saved))
    assert report["builds"] == [], "the run publishes no builds"


def _clients(coord: CoordinatorProcess) -> int:
    response = httpx.get(f"{coord.url}/v1/runs/{coord.run_id()}/clients", headers=coord.admin, timeout=10)
    response.raise_for_status()
    return len(response.json())


def test_join_without_train_extra_stops_before_enrolling(coord: CoordinatorProcess, world, tmp_path: Path) -> None:
    before = _clients(coord)
    argv = join_cmd(coord, world, 0, tmp_path / "state")[3:]  # the arguments after `-m cotune.cli.main`
    script = BLOCKER.format(blocked=["torch"]) + textwrap.dedent(f"""
        import sys
        sys.argv = ["cotune", *{argv!r}]
        from cotune.cli.main import main
        main()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env=child_env())

    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert 'pip install "cotune[train]"' in lines[0] and "torch" in lines[0]
    assert _clients(coord) == before, "the device enrolled although it cannot train"
    assert not (tmp_path / "state" / "credentials.json").exists()
    # The count does see an enrollment, so the check above can fail.
    CoordinatorClient(coord.url).register(coord.run["enroll_token"], "counted")
    assert _clients(coord) == before + 1
