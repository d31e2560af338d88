"""The models the coordinator holds (the LLM, and the shared SLM for server-side steps).

A holder keeps each base model in memory with a LoRA adapter attached, and swaps adapter
weights in by digest, so a server step never reloads a base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud.store import BlobStore
from common.checkpoint import checkpoint_files
from common.protocol import LoraSpec


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

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._models: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, ckpt_dir: str | Path, lora: LoraSpec, seed: int) -> tuple[Any, Any]:
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import attach_lora

        key = (str(Path(ckpt_dir).resolve()), lora.model_dump_json())
        if key not in self._models:
            model, tokenizer = load_checkpoint(Path(ckpt_dir))
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
