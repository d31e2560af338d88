"""Edge builds made on the device, for methods whose device SLM never leaves it (Co-PLMs,
CrossLM): the device exports its own final SLM, reports each build's manifest, and skips
with a reason (never failing the run) when it cannot. In process, at the handler level; the
same over real HTTP is in test_coplms.py and test_crosslm.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.manifest import BuildManifest
from common.protocol import DeviceBuildReport, DeviceProfile, RunSpec
from common.records import read_jsonl
from edge_sdk.builds import make_device_builds
from edge_sdk.client import CoordinatorError
from edge_sdk.handlers import FinalArtifacts
from tests.support import TinyWorld, run_spec

PROFILE = DeviceProfile(arch="x86_64", ram_bytes=8 << 30, cores=4, backends=["llama.cpp"])
PARAMS = {"co-plms": {"saml_epochs": 1.0, "dst_epochs": 1.0, "init_distill_epochs": 0.0},
          "crosslm": {"prompts_per_domain": 1, "samples_per_prompt": 1, "max_new_tokens": 4, "threshold": 0.0}}


def _finish_one_round(world: TinyWorld, method: str, work: Path) -> tuple[FinalArtifacts, RunSpec]:
    """One round of `method` in process with one device (no SLM of its own); its final model."""
    from benchmarks.inprocess import Device, run_inprocess
    from cloud.store import BlobStore
    from cloud.strategies import strategy_class

    spec = RunSpec.model_validate(run_spec(world, name=method, algorithm=method, rounds=1, min_clients=1,
                                           eval_data=None, params=PARAMS[method], builds=["gguf:f32"]))
    strategy = strategy_class(method)(spec, BlobStore(work / "store"))
    device = Device("device-0", read_jsonl(world.data["client_0"]), work / "device-0")
    _final, history = run_inprocess(strategy, [device], 1, work)
    assert history[-1].info.task.builds == ["gguf:f32"], "the run's build targets travel in the task"
    return device.handler.finish(history[-1].info, work / "final"), spec  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def finals(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FinalArtifacts, RunSpec]]:
    return {m: _finish_one_round(world, m, tmp_path_factory.mktemp(m)) for m in ("co-plms", "crosslm")}


@pytest.mark.parametrize("method", ["co-plms", "crosslm"])
def test_the_device_exports_its_own_slm_and_reports_it(finals, method: str, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the export extra (llama-cpp-python) is not installed")
    final, spec = finals[method]
    said: list[str] = []
    reports: list[DeviceBuildReport] = []

    def report(build: DeviceBuildReport) -> None:
        reports.append(build)
        if method == "crosslm":  # a coordinator that refuses the report loses nothing here
            raise CoordinatorError(404, "not_found", "no such route")

    chosen = make_device_builds(final, spec.lora, ["gguf:f32"], tmp_path, run_id="run-1", round=1, say=said.append,
                                report=report, profile=PROFILE)
    assert chosen == tmp_path / "build" / "gguf-f32"
    manifest = BuildManifest.read(chosen)
    manifest.verify(chosen)
    assert manifest.adapter_sha256 == final.adapter_sha256, "the build is of the device's own final adapter"
    assert (manifest.run_id, manifest.round) == ("run-1", 1) and manifest.parity["top1_agreement"] > 0.9
    assert [r.name for r in reports] == ["gguf-f32"]
    assert BuildManifest.model_validate(reports[0].manifest) == manifest
    expected = "reporting it failed" if method == "crosslm" else "and reported"
    assert any(expected in line for line in said), said


def test_a_device_without_the_export_extras_says_so_and_skips(finals, tmp_path: Path, monkeypatch) -> None:
    import edge_sdk.builds

    monkeypatch.setattr(edge_sdk.builds, "missing_modules", lambda targets: ["gguf", "llama_cpp"])
    final, spec = finals["co-plms"]
    said: list[str] = []
    chosen = make_device_builds(final, spec.lora, ["gguf:q8_0"], tmp_path, run_id="r", round=1, say=said.append,
                                report=lambda _b: pytest.fail("nothing to report"), profile=PROFILE)
    assert chosen is None and not (tmp_path / "build").exists()
    assert len(said) == 1 and "lacks the export extras (gguf, llama_cpp)" in said[0] and "cotune[export]" in said[0]


def test_an_slm_the_exporter_cannot_take_is_skipped(finals, world: TinyWorld, tmp_path: Path) -> None:
    from common.ml.checkpoint import save_checkpoint
    from cotune.demo.tiny import build_tiny_model

    final, spec = finals["co-plms"]
    gpt2 = save_checkpoint(build_tiny_model("gpt2", "tiny", 384, seed=3), world.root / "tokenizer", tmp_path / "gpt2")
    shutil.copyfile(final.adapter, gpt2 / "adapter.safetensors")
    said: list[str] = []
    chosen = make_device_builds(FinalArtifacts(gpt2, gpt2 / "adapter.safetensors", final.adapter_sha256), spec.lora,
                                ["gguf:f32"], tmp_path, run_id="r", round=1, say=said.append,
                                report=lambda _b: pytest.fail("nothing to report"), profile=PROFILE)
    assert chosen is None and len(said) == 1
    assert "export of this device's SLM failed" in said[0] and "gpt2" in said[0]


def test_cotune_edge_export_builds_the_final_model_by_hand(finals, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the export extra (llama-cpp-python) is not installed")
    from typer.testing import CliRunner

    from cotune.cli.main import app

    final, _spec = finals["crosslm"]
    final_dir = final.model_dir.parent
    (final_dir / "final.json").write_text(json.dumps({
        "run_id": "run-7", "round": 1, "model_dir": str(final.model_dir), "adapter_sha256": final.adapter_sha256}))
    result = CliRunner().invoke(app, ["edge", "export", "--final", str(final_dir), "--target", "gguf:f32",
                                      "--out", str(tmp_path / "builds"), "--json"])
    assert result.exit_code == 0, result.output
    (build,) = json.loads(result.stdout)
    assert build["name"] == "gguf-f32" and build["path"] == str(tmp_path / "builds" / "gguf-f32")
    assert build["manifest"]["adapter_sha256"] == final.adapter_sha256 and build["manifest"]["run_id"] == "run-7"
    assert build["manifest"]["parity"] and build["reported"] is False
