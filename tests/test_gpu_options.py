"""GPU where there is one: the edge runtime's n_gpu_layers / providers, the coordinator's
model_device / model_dtype / model_device_map, and training that follows the model's device.

The CPU paths run for real everywhere. The GPU paths run only where torch sees CUDA, onnxruntime
has the CUDA execution provider, or llama.cpp can offload; elsewhere they skip and say why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from tests.test_runtime_onnx import make_tiny_checkpoint

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA GPU")
PROMPT = "the river lock 3 was"


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _llama_offloads() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint, and its gguf:f32 and onnx:fp32 builds."""
    from export.isolated import export_builds_isolated

    root = tmp_path_factory.mktemp("gpu-options")
    hf = make_tiny_checkpoint(root)
    export_builds_isolated(hf, None, ["gguf:f32", "onnx:fp32"], root / "builds", progress=False, threads=2)
    return {"hf": hf, "gguf": root / "builds" / "gguf-f32", "onnx": root / "builds" / "onnx-fp32"}


# -- edge runtime: what auto picks, and explicit requests the install cannot meet ------------


def test_gpu_layers_auto_follows_what_llama_cpp_can_offload() -> None:
    from edge_sdk.runtime.accel import ALL_LAYERS, resolve_gpu_layers

    assert resolve_gpu_layers("auto", gpu_offload=False) == 0
    assert resolve_gpu_layers("auto", gpu_offload=True) == ALL_LAYERS
    assert resolve_gpu_layers("all", gpu_offload=True) == resolve_gpu_layers(-1, gpu_offload=True) == ALL_LAYERS
    assert resolve_gpu_layers("12", gpu_offload=True) == 12
    assert resolve_gpu_layers(0, gpu_offload=False) == 0


def test_gpu_layers_on_a_cpu_only_llama_cpp_name_the_cuda_build() -> None:
    from edge_sdk.runtime import GpuUnavailableError
    from edge_sdk.runtime.accel import resolve_gpu_layers

    with pytest.raises(GpuUnavailableError, match='CMAKE_ARGS="-DGGML_CUDA=on" pip install') as info:
        resolve_gpu_layers("all", gpu_offload=False)
    assert "llama_supports_gpu_offload() is false" in str(info.value)
    for bad in ("many", -2, 1.5, True):
        with pytest.raises(ValueError, match="n_gpu_layers"):
            resolve_gpu_layers(bad, gpu_offload=True)  # type: ignore[arg-type]


def test_providers_auto_takes_cuda_then_cpu_and_never_other_providers() -> None:
    from edge_sdk.runtime.accel import resolve_providers

    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert resolve_providers("tensorrt", gpu) == gpu
    assert resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], gpu) == gpu[1:]
    assert resolve_providers("CUDAExecutionProvider, CPUExecutionProvider", gpu) == gpu[1:]


def test_providers_the_install_lacks_are_clear_errors() -> None:
    import onnxruntime

    from edge_sdk.runtime import GpuUnavailableError, UnsupportedBuildError
    from edge_sdk.runtime.accel import resolve_providers

    cpu_only, known = ["CPUExecutionProvider"], onnxruntime.get_all_providers()
    with pytest.raises(GpuUnavailableError, match="pip install onnxruntime-gpu") as info:
        resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], cpu_only, known)
    assert "offers only CPUExecutionProvider" in str(info.value)
    with pytest.raises(GpuUnavailableError, match="onnxruntime-gpu"):
        resolve_providers("cuda", cpu_only, known)
    with pytest.raises(UnsupportedBuildError, match="'CudaProvider' is not an ONNX Runtime execution provider"):
        resolve_providers("CudaProvider", cpu_only, known)
    with pytest.raises(ValueError, match="providers is empty"):
        resolve_providers(" , ", cpu_only, known)


def test_onnx_auto_runs_on_the_cpu_here_and_describe_says_so(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    if _ort_has_cuda():
        pytest.skip("this onnxruntime has CUDA: auto would pick it (see the GPU tests)")
    with EdgeModel.load(builds["onnx"], threads=1) as model:
        described = model.describe()
        tokens = model.generate(PROMPT, max_tokens=6, ignore_eos=True).token_ids
    assert described["backend"] == "onnxruntime"
    assert described["providers"] == ["CPUExecutionProvider"] and described["gpu"] is False
    with EdgeModel.load(builds["onnx"], threads=1, providers="cpu") as model:
        assert model.generate(PROMPT, max_tokens=6, ignore_eos=True).token_ids == tokens


def test_onnx_explicit_cuda_without_onnxruntime_gpu_is_refused(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import GpuUnavailableError

    if _ort_has_cuda():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    with pytest.raises(GpuUnavailableError, match="onnxruntime-gpu"):
        EdgeModel.load(builds["onnx"], threads=1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_gguf_auto_runs_on_the_cpu_here_and_describe_says_so(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    if _llama_offloads():
        pytest.skip("this llama.cpp can offload: auto would use the GPU (see the GPU tests)")
    with EdgeModel.load(builds["gguf"], threads=1) as model:
        described = model.describe()
    assert described["backend"] == "llama.cpp"
    assert described["gpu_layers"] == 0 and described["gpu"] is False and described["n_layer"] >= 1


def test_gguf_explicit_gpu_layers_without_a_cuda_build_are_refused(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel
    from edge_sdk.runtime import GpuUnavailableError

    if _llama_offloads():
        pytest.skip("this llama.cpp can offload")
    with pytest.raises(GpuUnavailableError, match="DGGML_CUDA=on"):
        EdgeModel.load(builds["gguf"], threads=1, n_gpu_layers=8)
    # The option of the other engine is checked too, so a typo shows whichever build is loaded.
    with pytest.raises(ValueError, match="n_gpu_layers"):
        EdgeModel.load(builds["onnx"], threads=1, n_gpu_layers="lots")


def _cli() -> typer.Typer:
    from cotune.cli.edge_runtime import edge_bench, edge_generate

    app = typer.Typer()
    app.command("generate")(edge_generate)
    app.command("bench")(edge_bench)
    return app


def test_cli_flags_reach_the_loader(builds: dict[str, Path]) -> None:
    if _ort_has_cuda():
        pytest.skip("this onnxruntime has CUDA")
    app = _cli()
    ok = CliRunner().invoke(app, ["generate", str(builds["onnx"]), PROMPT, "--max-tokens", "4", "--json",
                                  "--providers", "cpu", "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["model"]["providers"] == ["CPUExecutionProvider"]
    refused = CliRunner().invoke(app, ["generate", str(builds["onnx"]), PROMPT, "--providers", "cuda"])
    assert refused.exit_code != 0 and isinstance(refused.exception, Exception)
    assert "onnxruntime-gpu" in str(refused.exception)
    typo = CliRunner().invoke(app, ["bench", str(builds["gguf"]), "--gpu-layers", "most"])
    assert typo.exit_code == 2 and "--gpu-layers" in typo.output


def test_doctor_says_what_auto_picks_and_what_to_install() -> None:
    from edge_sdk.doctor import _gpu, diagnose

    llama_cpu = {"available": True, "gpu_offload": False}
    ort_cpu = {"available": True, "providers": ["AzureExecutionProvider", "CPUExecutionProvider"]}
    report = _gpu("cuda", {"available": True, "devices": ["GPU"]}, llama_cpu, ort_cpu)
    assert report["auto"] == {"llama.cpp": "CPU", "onnxruntime": ["CPUExecutionProvider"]}
    hints = " | ".join(report["hints"])
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in hints and "pip install onnxruntime-gpu" in hints
    ready = _gpu("cuda", {"available": True, "devices": ["GPU"]}, {"available": True, "gpu_offload": True},
                 {"available": True, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert ready["auto"]["llama.cpp"] == "all layers on the GPU" and ready["hints"] == []
    assert ready["auto"]["onnxruntime"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _gpu(None, {"available": False, "devices": []}, llama_cpu, ort_cpu)["hints"] == [], \
        "no GPU here: nothing to install"
    here = diagnose()["gpu"]
    assert here["auto"]["onnxruntime"][-1] == "CPUExecutionProvider"
    assert here["auto"]["llama.cpp"] == ("all layers on the GPU" if _llama_offloads() else "CPU")


# -- coordinator settings -------------------------------------------------------------------


def _settings(**overrides):
    from cloud.settings import load_settings

    return load_settings(None, **overrides)


def test_model_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COTUNE_MODEL_DEVICE", "COTUNE_MODEL_DTYPE", "COTUNE_MODEL_DEVICE_MAP"):
        monkeypatch.delenv(name, raising=False)
    default = _settings()
    assert (default.model_device, default.model_dtype, default.model_device_map) == ("auto", "float32", "none")
    monkeypatch.setenv("COTUNE_MODEL_DEVICE", "CUDA:1")
    monkeypatch.setenv("COTUNE_MODEL_DTYPE", "bfloat16")
    from_env = _settings()
    assert (from_env.model_device, from_env.model_dtype) == ("cuda:1", "bfloat16")
    assert _settings(model_device="cpu").model_device == "cpu", "a flag beats the environment"


def test_model_settings_refuse_what_cannot_work() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="model_device"):
        _settings(model_device="gpu")
    with pytest.raises(ValidationError, match="model_dtype"):
        _settings(model_dtype="int8")
    with pytest.raises(ValidationError, match="float16 on model_device cpu is refused"):
        _settings(model_device="cpu", model_dtype="float16")
    with pytest.raises(ValidationError, match="model_device 'cuda:1' cannot hold with it"):
        _settings(model_device="cuda:1", model_device_map="auto")
    assert _settings(model_device="cpu", model_dtype="bfloat16").model_dtype == "bfloat16"


def test_device_map_auto_without_accelerate_names_the_package() -> None:
    from tests.test_edge_installs import run_blocked

    out = run_blocked(["accelerate"], """
        import json
        from cloud.settings import load_settings
        try:
            load_settings(None, model_device_map="auto")
            print(json.dumps({"error": None}))
        except ValueError as exc:
            print(json.dumps({"error": str(exc)}))
    """)
    assert out["error"] and "pip install accelerate" in out["error"]


def test_the_coordinator_holds_models_as_its_settings_say(tmp_path: Path) -> None:
    from cloud.coordinator import Coordinator

    settings = _settings(state_url=f"sqlite:///{tmp_path / 'state.db'}", artifact_dir=str(tmp_path / "artifacts"),
                         work_dir=tmp_path / "work", model_device="cpu", model_dtype="bfloat16")
    coordinator = Coordinator(settings)
    try:
        holder = coordinator.holder
        assert (holder.device, holder.dtype, holder.device_map) == ("cpu", "bfloat16", "none")
    finally:
        coordinator.close()


def test_the_placement_can_be_checked_before_serving() -> None:
    from cloud.models import check_placement
    from common.ml.device import DeviceError

    assert check_placement("cpu", "bfloat16") == "cpu in bfloat16"
    if CUDA:
        assert check_placement("auto", "float32").startswith("cuda")
        return
    assert check_placement("auto", "float32") == "cpu in float32"
    with pytest.raises(DeviceError, match="CUDA is not available"):
        check_placement("cuda:0", "float32")
    with pytest.raises(DeviceError, match="float16 on the CPU is refused"):
        check_placement("auto", "float16")


# -- load_checkpoint and the held models ---------------------------------------------------


def test_load_checkpoint_default_is_float32_on_the_cpu(world) -> None:
    from common.ml.checkpoint import load_checkpoint

    model, _ = load_checkpoint(world.slm_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_load_checkpoint_in_bfloat16_on_the_cpu(world) -> None:
    from common.ml.checkpoint import load_checkpoint

    full, _ = load_checkpoint(world.slm_dir)
    half, _ = load_checkpoint(world.slm_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        want, got = full(input_ids=ids).logits, half(input_ids=ids).logits.float()
    # bfloat16 keeps 8 bits of mantissa: the same model, within a few hundredths.
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=0.1, rtol=0.05)


def test_load_checkpoint_refusals(world) -> None:
    from common.ml.checkpoint import load_checkpoint
    from common.ml.device import DeviceError

    with pytest.raises(DeviceError, match="float16 on the CPU is refused"):
        load_checkpoint(world.slm_dir, device="cpu", dtype="float16")
    with pytest.raises(DeviceError, match="not one of auto, cpu, cuda"):
        load_checkpoint(world.slm_dir, device="gpu0")
    with pytest.raises(DeviceError, match="cannot hold with it"):
        load_checkpoint(world.slm_dir, device="cpu", device_map="auto")
    if not CUDA:
        with pytest.raises(DeviceError, match="CUDA is not available") as info:
            load_checkpoint(world.slm_dir, device="cuda")
        assert "pytorch.org" in str(info.value)
        with pytest.raises(DeviceError, match="torch sees none"):
            load_checkpoint(world.slm_dir, device="auto", device_map="auto")
        model, _ = load_checkpoint(world.slm_dir, device="auto")
        assert next(model.parameters()).device.type == "cpu", "auto is the CPU without CUDA"


def test_the_holder_keeps_bfloat16_bases_with_float32_adapters(world, tmp_path: Path) -> None:
    from cloud.models import ModelHolder
    from cloud.store import BlobStore
    from common.ml.device import DeviceError
    from common.ml.lora import adapter_state
    from common.protocol import LoraSpec

    with pytest.raises(DeviceError, match="not one of auto, cpu, cuda"):
        ModelHolder(BlobStore(tmp_path / "x"), device="tpu")
    holder = ModelHolder(BlobStore(tmp_path / "blobs"), device="cpu", dtype="bfloat16")
    model, _ = holder.get(world.slm_dir, LoraSpec(r=4), seed=0)
    lora = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and set(lora.values()) == {torch.float32} and base == {torch.bfloat16}
    digest = holder.save_adapter(model)
    again, _ = holder.with_adapter(world.slm_dir, LoraSpec(r=4), 0, digest)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in adapter_state(again).values())


# -- training and evaluation follow the model's device ---------------------------------------


def test_to_device_on_the_cpu_hands_back_the_same_tensors() -> None:
    from common.ml.device import model_device, to_device

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "kept"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["note"] == "kept"
    assert model_device(torch.nn.Linear(2, 2)).type == "cpu"


def test_training_on_the_cpu_computes_what_it_did_before(world) -> None:
    """The first step's loss is the plain CPU loss of the first batch, computed here without any
    device handling, and evaluation matches on a model loaded the old way and the new way."""
    from common.ml.batching import _special_ids, collate, encode_sft, iterate_batches
    from common.ml.checkpoint import load_checkpoint
    from common.ml.evaluate import evaluate, response_nll
    from common.ml.lora import attach_lora
    from common.ml.train import _response_ce, train_lora
    from common.protocol import LoraSpec, TrainSpec
    from common.records import read_jsonl

    records = read_jsonl(world.data["client_0"])[:16]
    spec = TrainSpec(epochs=1.0, lr=1e-2, batch_size=8, max_len=40, max_steps=2)
    old, tok = load_checkpoint(world.slm_dir)
    new, _ = load_checkpoint(world.slm_dir, device="cpu", dtype="float32")
    old, new = attach_lora(old, LoraSpec(r=4), seed=0), attach_lora(new, LoraSpec(r=4), seed=0)
    first = next(iterate_batches(encode_sft(tok, records, spec.max_len), spec.batch_size, 0, spec.epochs,
                                 spec.max_steps))
    batch = collate(first, _special_ids(tok)[2])
    with torch.no_grad():
        old.train()
        expected = float(_response_ce(old(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"]))
        old.eval()
    report = train_lora(new, tok, records, spec, seed=0)
    assert report["steps"] == 2 and report["loss_first"] == pytest.approx(expected, abs=1e-6)
    train_lora(old, tok, records, spec, seed=0)
    assert evaluate(old, tok, records[:4], max_new_tokens=4) == evaluate(new, tok, records[:4], max_new_tokens=4)
    assert response_nll(old, tok, records[:4], max_len=40) == response_nll(new, tok, records[:4], max_len=40)


# -- on a GPU --------------------------------------------------------------------------------


@needs_cuda
def test_cuda_models_train_evaluate_and_distil_on_cuda(world) -> None:
    from cloud.training.distill import mutual_distillation
    from common.ml.checkpoint import load_checkpoint
    from common.ml.evaluate import evaluate
    from common.ml.lora import adapter_state, attach_lora
    from common.ml.train import train_lora
    from common.protocol import DistillSpec, LoraSpec, TrainSpec
    from common.records import read_jsonl

    records = read_jsonl(world.data["client_0"])[:16]
    slm, tok = load_checkpoint(world.slm_dir, device="cuda")
    llm, _ = load_checkpoint(world.llm_dir, device="cuda", dtype="bfloat16")
    slm, llm = attach_lora(slm, LoraSpec(r=4), seed=0), attach_lora(llm, LoraSpec(r=4), seed=0)
    assert next(slm.parameters()).device.type == "cuda"
    before = {k: v.clone() for k, v in adapter_state(slm).items()}
    report = train_lora(slm, tok, records, TrainSpec(epochs=2.0, lr=1e-2, batch_size=8, max_len=40, max_steps=3),
                        seed=0)
    assert report["steps"] == 3 and np.isfinite(report["loss_last"])
    after = adapter_state(slm)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after), "training on CUDA changed the adapter"
    assert evaluate(slm, tok, records[:4], max_new_tokens=4)["n"] == 4
    distilled = mutual_distillation(llm, slm, tok, records, DistillSpec(epochs=1.0, lr=1e-3, batch_size=8,
                                                                        max_steps=2), seed=0)
    assert distilled["steps"] == 2 and np.isfinite(distilled["slm_loss_last"])


@needs_cuda
def test_device_map_auto_spreads_over_the_gpus(world) -> None:
    pytest.importorskip("accelerate")
    from common.ml.checkpoint import load_checkpoint

    model, _ = load_checkpoint(world.llm_dir, device="auto", device_map="auto")
    assert getattr(model, "hf_device_map", None) and next(model.parameters()).device.type == "cuda"


def test_onnx_on_the_cuda_execution_provider(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    if not _ort_has_cuda():
        pytest.skip("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    with EdgeModel.load(builds["onnx"], threads=1, providers="cpu") as cpu:
        ids = cpu.tokenize(PROMPT)
        want = np.array(cpu._backend.prefill(ids))
    with EdgeModel.load(builds["onnx"], threads=1) as gpu:
        assert gpu.describe()["providers"][0] == "CUDAExecutionProvider" and gpu.describe()["gpu"] is True
        got = np.array(gpu._backend.prefill(ids))
        text = gpu.generate(PROMPT, max_tokens=8, ignore_eos=True)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    assert text.completion_tokens == 8


def test_gguf_offloaded_to_the_gpu(builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    if not _llama_offloads():
        pytest.skip("this llama-cpp-python cannot offload to a GPU (build it with -DGGML_CUDA=on)")
    with EdgeModel.load(builds["gguf"], threads=1, n_gpu_layers=0) as cpu:
        ids = cpu.tokenize(PROMPT)
        want = np.array(cpu._backend.prefill(ids))
    with EdgeModel.load(builds["gguf"], threads=1) as gpu:
        described = gpu.describe()
        assert described["gpu"] is True and described["gpu_layers"] == described["n_layer"]
        got = np.array(gpu._backend.prefill(ids))
        assert gpu.generate(PROMPT, max_tokens=8, ignore_eos=True).completion_tokens == 8
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
