"""The models the coordinator holds (the LLM, and the shared SLM for server-side steps).

A holder keeps each base model in memory with a LoRA adapter attached, and swaps adapter
weights in by digest, so a server step never reloads a base model. The coordinator's settings
(model_device, model_dtype, model_device_map) say where and in which precision they are held;
adapters travel as float32 whatever the base's precision (common.ml.lora).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cloud.store import BlobStore
from common.checkpoint import checkpoint_files
from common.protocol import LoraSpec

log = logging.getLogger("cotune.models")


def publish_checkpoint(store: BlobStore, ckpt_dir: Path, prefix: str) -> dict[str, str]:
    """Put every file of a checkpoint into the store as `prefix/<file name>`."""
    out: dict[str, str] = {}
    for path in checkpoint_files(ckpt_dir):
        with path.open("rb") as fh:
            out[f"{prefix}/{path.name}"] = store.put_chunks(iter(lambda f=fh: f.read(1 << 20), b""))
    return out


class ModelHolder:
    """Base models kept in memory with a LoRA adapter attached; adapters swapped by digest.

    Not thread-safe, by design: every user (server steps, starting scores and inputs, answers
    to /v1/generate) holds the coordinator's one `model_lock` while it loads, swaps or runs a
    model, since an adapter swapped in under another user would change its results."""

    def __init__(self, store: BlobStore, *, device: str = "cpu", dtype: str = "float32",
                 device_map: str = "none") -> None:
        """The defaults hold float32 models on the CPU; the coordinator passes its settings."""
        from common.ml.device import check_device, check_device_map, check_dtype

        self.store = store
        # Checked now, so a typo fails at start-up; what the machine can do is checked at the first load.
        self.device, self.dtype = check_device(device), check_dtype(dtype)
        self.device_map = check_device_map(device_map)
        self._models: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, ckpt_dir: str | Path, lora: LoraSpec, seed: int) -> tuple[Any, Any]:
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import attach_lora

        key = (str(Path(ckpt_dir).resolve()), lora.model_dump_json())
        if key not in self._models:
            model, tokenizer = load_checkpoint(Path(ckpt_dir), device=self.device, dtype=self.dtype,
                                               device_map=self.device_map)
            log.info("holding %s on %s in %s", ckpt_dir, _placement(model), self.dtype)
            self._models[key] = (attach_lora(model, lora, seed), tokenizer)
        return self._models[key]

    def with_adapter(
        self, ckpt_dir: str | Path, lora: LoraSpec, seed: int, adapter_digest: str
    ) -> tuple[Any, Any]:
        from common.ml.lora import adapter_from_bytes, load_adapter_state

        model, tokenizer = self.get(ckpt_dir, lora, seed)
        tensors, _meta = adapter_from_bytes(self.store.read_bytes(adapter_digest))
        load_adapter_state(model, tensors)
        return model, tokenizer

    def save_adapter(self, model: Any) -> str:
        from common.ml.lora import adapter_state, adapter_to_bytes

        return self.store.put_bytes(adapter_to_bytes(adapter_state(model)))


def check_placement(device: str, dtype: str, device_map: str = "none") -> str:
    """Where held models will load, in words ("cuda:0 in bfloat16"); a DeviceError now, rather than
    at the first server step, when this machine cannot give it. Imports torch."""
    from common.ml.device import resolve_placement

    target, _, mapping = resolve_placement(device, dtype, device_map)
    where = "every visible GPU (accelerate's device_map auto)" if mapping == "auto" else str(target)
    return f"{where} in {dtype}"


def _placement(model: Any) -> str:
    """Where a loaded model lives: one device, or accelerate's spread over several."""
    spread = getattr(model, "hf_device_map", None)
    if spread and len(set(spread.values())) > 1:
        return "devices " + ", ".join(sorted({str(d) for d in spread.values()}))
    from common.ml.device import model_device

    return str(model_device(model))
