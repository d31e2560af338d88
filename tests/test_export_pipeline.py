"""export_builds end to end: atomic output, failing gates, peft adapters, base-only export, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.manifest import BuildManifest
from export import ParityBounds, ParityError, export_builds_isolated
from tests.test_export_support import tiny_adapter, tiny_checkpoint

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("pipeline")
    base = tiny_checkpoint(root, "llama")
    adapter, spec = tiny_adapter(base, root / "adapter" / "adapter.safetensors")
    return base, adapter, spec


def test_a_crossed_bound_fails_and_leaves_nothing(world: tuple[Path, Path, object], tmp_path: Path) -> None:
    base, adapter, spec = world
    out = tmp_path / "out"
    impossible = ParityBounds(min_top1_8bit=1.01)
    with pytest.raises(ParityError, match="gguf:q8_0 failed its parity check: top-1 agreement") as err:
        export_builds_isolated(base, (adapter, spec), "gguf:f16,gguf:q8_0", out, bounds=impossible, progress=False)
    assert err.value.figures["top1_agreement"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out, no staging left beside it

    # An existing output directory keeps its other builds and its old copy of a failed one.
    out.mkdir()
    (out / "gguf-q8_0").mkdir()
    (out / "gguf-q8_0" / "old.txt").write_text("previous round")
    (out / "onnx-int4").mkdir()
    with pytest.raises(ParityError):
        export_builds_isolated(base, (adapter, spec), "gguf:q8_0", out, bounds=impossible, progress=False)
    assert (out / "gguf-q8_0" / "old.txt").read_text() == "previous round"
    assert sorted(p.name for p in out.iterdir()) == ["gguf-q8_0", "onnx-int4"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # A passing export replaces that build as a whole and leaves the others alone.
    export_builds_isolated(base, (adapter, spec), "gguf:q8_0", out, progress=False)
    assert not (out / "gguf-q8_0" / "old.txt").exists()
    assert BuildManifest.read(out / "gguf-q8_0").quantization == "q8_0"
    assert sorted(p.name for p in out.iterdir()) == ["gguf-q8_0", "onnx-int4"]


def test_float_gate_fails_on_a_tight_logit_bound(world: tuple[Path, Path, object], tmp_path: Path) -> None:
    base, adapter, spec = world
    with pytest.raises(ParityError, match="relative logit difference"):
        export_builds_isolated(base, (adapter, spec), "gguf:f16", tmp_path / "out",
                      bounds=ParityBounds(max_rel_logit_diff_f16=1e-9), progress=False)
    assert not (tmp_path / "out").exists()


def test_peft_directory_and_adapter_info_and_base_only(world: tuple[Path, Path, object], tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import attach_lora

    base, adapter, spec = world
    # The same adapter as a peft save_pretrained directory.
    model, _ = load_checkpoint(base)
    peft_model = attach_lora(model, spec, seed=0)
    tensors = load_file(str(adapter))
    state = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    missing = peft_model.load_state_dict(state, strict=False).unexpected_keys
    assert missing == []
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(str(peft_dir))
    assert isinstance(peft_model, PeftModel)

    from_peft = export_builds_isolated(base, peft_dir, "gguf:f32", tmp_path / "a", progress=False)[0]
    # A cotune adapter file with the adapter_info.json a device writes beside it.
    (adapter.parent / "adapter_info.json").write_text(json.dumps({"lora": spec.model_dump()}))
    from_file = export_builds_isolated(base, adapter, "gguf:f32", tmp_path / "b", progress=False)[0]
    assert from_file.manifest.adapter_sha256 != from_peft.manifest.adapter_sha256  # different files...
    model_a = (from_peft.path / "model.gguf").read_bytes()
    model_b = (from_file.path / "model.gguf").read_bytes()
    assert model_a == model_b  # ...the same merged model

    plain = export_builds_isolated(base, None, "gguf:f32", tmp_path / "c", progress=False)[0]
    assert plain.manifest.adapter_sha256 is None
    assert (plain.path / "model.gguf").read_bytes() != model_a
    assert torch.is_tensor(next(iter(tensors.values())))


def test_cli_export_command(world: tuple[Path, Path, object], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from cotune.cli.export import export_command

    base, adapter, spec = world
    app = typer.Typer()
    app.command("export")(export_command)
    app.command("noop")(lambda: None)  # two commands: typer then expects the command name
    (adapter.parent / "adapter_info.json").write_text(json.dumps({"lora": spec.model_dump()}))
    result = CliRunner().invoke(app, ["export", "--base", str(base), "--adapter", str(adapter), "--to",
                                      "gguf:q8_0", "--out", str(tmp_path / "out"), "--run-id", "r1", "--round", "2",
                                      "--no-progress", "--bound", "min_top1_8bit=0.5"])
    assert result.exit_code == 0, result.output
    assert "gguf:q8_0" in result.output and "top-1" in result.output
    manifest = BuildManifest.read(tmp_path / "out" / "gguf-q8_0")
    assert (manifest.run_id, manifest.round) == ("r1", 2)

    bad = CliRunner().invoke(app, ["export", "--base", str(base), "--to", "gguf:q8_0", "--out",
                                   str(tmp_path / "out2"), "--bound", "nonsense=1"])
    assert bad.exit_code != 0 and "nonsense" in str(bad.output) + str(bad.exception)
