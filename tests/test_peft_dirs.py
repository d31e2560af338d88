"""Every LoRA adapter the project keeps for a user is also a stock peft directory that
`peft.PeftModel.from_pretrained` loads with the same outputs as our own loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.ml.peft_dir import CONFIG_FILE, WEIGHTS_FILE, write_peft_dir
from tests.test_export_support import tiny_adapter, tiny_checkpoint

pytest.importorskip("peft")


def _our_logits(checkpoint: Path, adapter: Path, spec, ids):
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_from_bytes, attach_lora, load_adapter_state

    model, _ = load_checkpoint(checkpoint)
    peft_model = attach_lora(model, spec, seed=123)  # the seed is irrelevant: the adapter overwrites A and B
    load_adapter_state(peft_model, adapter_from_bytes(adapter.read_bytes())[0])
    return peft_model.eval()(ids).logits


def _peft_logits(checkpoint: Path, peft_dir: Path, ids):
    from peft import PeftModel

    from common.ml.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return PeftModel.from_pretrained(model, str(peft_dir)).eval()(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_dir_loads_with_the_same_logits(tmp_path: Path, arch: str) -> None:
    import torch

    from common.ml.checkpoint import load_checkpoint

    checkpoint = tiny_checkpoint(tmp_path, arch)
    adapter, spec = tiny_adapter(checkpoint, tmp_path / "adapter.safetensors", targets=(
        "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    before = adapter.read_bytes()
    peft_dir = write_peft_dir(adapter, spec, checkpoint, tmp_path / "peft")

    assert (peft_dir / CONFIG_FILE).is_file() and (peft_dir / WEIGHTS_FILE).is_file()
    assert adapter.read_bytes() == before, "the cotune adapter (and its digest) must not change"
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    with torch.no_grad():
        ours = _our_logits(checkpoint, adapter, spec, ids)
        theirs = _peft_logits(checkpoint, peft_dir, ids)
        plain = load_checkpoint(checkpoint)[0](ids).logits
    assert not torch.allclose(ours, plain, atol=1e-4), "the adapter must change the model, or the test proves nothing"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_peft_dir_refuses_a_file_that_is_not_an_adapter(tmp_path: Path) -> None:
    import numpy as np

    from common.protocol import LoraSpec
    from common.tensorfile import save_arrays

    bogus = save_arrays({"weight": np.zeros((2, 2), dtype=np.float32)}, None)
    with pytest.raises(ValueError, match="no LoRA tensors"):
        write_peft_dir(bogus, LoraSpec(), tmp_path, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_device_final_dir_holds_a_peft_dir(world, tmp_path: Path) -> None:
    """After a short in-process FedAvg round, the device's finish() keeps a peft dir beside its adapter."""
    import json

    import torch

    from benchmarks.inprocess import Device, run_inprocess
    from cloud.store import BlobStore
    from cloud.strategies import strategy_class
    from common.protocol import RunSpec
    from common.records import read_jsonl
    from tests.support import run_spec

    spec = RunSpec.model_validate(run_spec(world, name="peft", algorithm="fedavg", rounds=1, eval_data=None))
    strategy = strategy_class("fedavg")(spec, BlobStore(tmp_path / "store"), None)
    device = Device("device-0", read_jsonl(world.data["client_0"]), tmp_path / "device-0")
    _, history = run_inprocess(strategy, [device], 1, tmp_path / "work")
    assert device.handler is not None
    info = history[-1].info
    digest_before = next(r.sha256 for r in info.artifacts if r.name == "slm/adapter.safetensors")

    final = device.handler.finish(info, tmp_path / "final")

    assert final.adapter_sha256 == digest_before, "the final adapter digest must not change"
    assert final.peft_dir == tmp_path / "final" / "adapter"
    assert (final.peft_dir / CONFIG_FILE).is_file() and (final.peft_dir / WEIGHTS_FILE).is_file()
    assert json.loads((final.peft_dir / CONFIG_FILE).read_text())["base_model_name_or_path"] == str(
        final.model_dir.resolve())
    ids = torch.tensor([[1, 4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ours = _our_logits(final.model_dir, final.adapter, info.task.lora, ids)
        theirs = _peft_logits(final.model_dir, final.peft_dir, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_cotune_export_takes_the_peft_dir_as_its_adapter(tmp_path: Path) -> None:
    """`cotune export --adapter DIR` with the peft dir merges the same model as with the cotune file."""
    import torch

    from export.inputs import inspect_adapter, inspect_base
    from export.merge import prepare_models

    checkpoint = tiny_checkpoint(tmp_path, "qwen2")
    adapter, spec = tiny_adapter(checkpoint, tmp_path / "adapter.safetensors")
    peft_dir = write_peft_dir(adapter, spec, checkpoint, tmp_path / "peft")
    base = inspect_base(checkpoint)
    from_peft = inspect_adapter(peft_dir, base)
    from_file = inspect_adapter(adapter, base, spec)
    assert from_peft.kind == "peft" and from_file.kind == "cotune"

    ids = torch.tensor([[1, 3, 7, 31, 127]])
    with torch.no_grad():
        merged_peft = prepare_models(base, from_peft, keep_base=False)
        merged_file = prepare_models(base, from_file, keep_base=False)
        assert len(merged_peft.lora) == len(merged_file.lora) > 0
        torch.testing.assert_close(merged_peft.merged(ids).logits, merged_file.merged(ids).logits, atol=1e-5, rtol=0)


def test_cotune_runs_pull_writes_the_servers_adapters_as_peft_dirs(world, tmp_path: Path) -> None:
    """The server's adapters (the SLM's it publishes, the LLM's it keeps) pulled by the admin load
    in peft with the outputs of our own loader."""
    import subprocess
    import time

    import numpy as np
    import torch

    from common.methods.fedavg import SLM_ADAPTER
    from common.protocol import META_NUM_SAMPLES, DeviceProfile, LoraSpec
    from common.tensorfile import load_arrays, save_arrays
    from cotune.demo.quickstart import child_env, cotune_cmd
    from edge_sdk.client import CoordinatorClient
    from tests.support import CoordinatorProcess, run_spec

    spec = run_spec(world, name="pull", rounds=1, min_clients=2)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        rng = np.random.default_rng(0)
        for k in range(2):
            device = CoordinatorClient(coord.url)
            creds = device.register(spec["enroll_token"], f"d{k}", DeviceProfile())
            info = device.current_round(creds.run_id)
            ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
            start = load_arrays(device.download(ref, tmp_path / f"start-{k}"))
            update = {n: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32) for n, a in start.items()}
            device.upload_update(creds.run_id, 1, creds.client_id, save_arrays(update, {META_NUM_SAMPLES: "10"}))
        deadline = time.monotonic() + 120
        while coord.status(creds.run_id)["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
        env = {**child_env(), "COTUNE_ADMIN_TOKEN": coord.admin_token}
        out = tmp_path / "pulled"
        done = subprocess.run(cotune_cmd("runs", "pull", "pull", "--out", str(out), "--coordinator", coord.url),
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        coord.stop()
    lora = LoraSpec.model_validate(spec["lora"])
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    for prefix, base in (("slm", out / "slm"), ("llm", world.llm_dir)):
        assert (out / f"{prefix}-adapter" / "adapter_config.json").is_file()
        trained = load_arrays(out / prefix / "adapter.safetensors")
        assert any(np.abs(v).max() > 0 for k, v in trained.items() if "lora_B" in k), "an untrained adapter"
        with torch.no_grad():
            ours = _our_logits(base, out / prefix / "adapter.safetensors", lora, ids)
            theirs = _peft_logits(base, out / f"{prefix}-adapter", ids)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
