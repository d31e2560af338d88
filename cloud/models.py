"""The models the coordinator holds (the LLM, and the shared SLM for server-side steps).

A holder keeps each base model in memory with a LoRA adapter attached, and swaps adapter
weights in by digest, so a server step never reloads a base model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cloud.store import BlobStore
from common.protocol import LoraSpec

# Files of a checkpoint directory that devices may receive. Pickled weights are refused:
# loading them runs arbitrary code.
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise ValueError(
            f"{ckpt_dir} is not a model checkpoint (no config.json); "
            "point the run at a directory written by save_pretrained"
        )
    files = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    pickles = [p.name for p in files if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{ckpt_dir} holds pickled weights {pickles}; save it with safe_serialization=True"
        )
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"{ckpt_dir} has no .safetensors weights")
    if not (ckpt_dir / "tokenizer.json").is_file():
        raise ValueError(f"{ckpt_dir} has no tokenizer.json; devices need the tokenizer")
    return files


def publish_checkpoint(store: BlobStore, ckpt_dir: Path, prefix: str) -> dict[str, str]:
    """Put every file of a checkpoint into the store as `prefix/<file name>`."""
    out: dict[str, str] = {}
    for path in checkpoint_files(ckpt_dir):
        with path.open("rb") as fh:
            out[f"{prefix}/{path.name}"] = store.put_chunks(iter(lambda f=fh: f.read(1 << 20), b""))
    return out


def tokenizer_digest(ckpt_dir: Path) -> str:
    return hashlib.sha256((Path(ckpt_dir) / "tokenizer.json").read_bytes()).hexdigest()


class ModelHolder:
    """Base models kept in memory with a LoRA adapter attached; adapters swapped by digest."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._models: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(self, ckpt_dir: str | Path, lora: LoraSpec, seed: int) -> tuple[Any, Any]:
        from common.ml.lora import attach_lora
        from common.ml.tiny import load_checkpoint

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
