"""HF checkpoint directories, checked without torch: what makes one, and whether it is intact.

The coordinator checks the LLM and SLM of a run before it publishes them, the exporter its
base model, a device its own SLM, and the loader (common.ml.checkpoint) anything before
transformers touches it: all of them here, with one set of messages that say what to do.
Only JSON and safetensors headers are read, so a wrong path or a truncated weights file
fails in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.digest import file_sha256
from common.protocol import SlmInfo
from common.tensorfile import TensorFileError, TensorInfo, read_header

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# chat_template.jinja: where transformers >= 4.43 keeps a tokenizer's chat template.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Loading pickled weights runs arbitrary code: such files are never loaded nor passed on.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".ckpt"})
# Checkpoint headers list every tensor; large models have far longer ones than a wire body.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_RESAVE = "Re-save the model with save_pretrained(..., safe_serialization=True)."


class CheckpointError(ValueError):
    """A directory that is not a usable HF checkpoint; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    dir: Path
    config: dict[str, Any]
    weight_files: list[Path]
    tensors: dict[str, TensorInfo]  # every weight tensor of every shard, from the headers
    tokenizer_file: Path | None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming `what` when it is missing or broken."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): truncated or corrupt {what}?") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object")
    return value


def read_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a checkpoint directory (checked to be one)."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory; point to a directory written by save_pretrained")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this an HF checkpoint directory (written by "
                              "save_pretrained)?")
    return read_json_object(path / CONFIG_FILE, f"model config ({CONFIG_FILE})")


def weight_files(ckpt_dir: Path) -> list[Path]:
    """model.safetensors, or the shards its index lists; never pickled weights."""
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        return [ckpt_dir / WEIGHTS_FILE]
    if (ckpt_dir / WEIGHTS_INDEX).is_file():
        index = read_json_object(ckpt_dir / WEIGHTS_INDEX, "safetensors index")
        files = [ckpt_dir / name for name in sorted(set(index.get("weight_map", {}).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise CheckpointError(f"{ckpt_dir}: weight shards {missing or '(none)'} listed in the index are missing")
        return files
    raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_FILE}; only safetensors weights are loaded (never pickle). "
                          + _RESAVE)


def weight_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor the weight files hold, from their checked headers."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            tensors.update(read_header(f, MAX_HEADER_BYTES, wire_dtypes=False).tensors)
        except TensorFileError as exc:
            raise CheckpointError(f"{f} is not a valid safetensors file: {exc.message}; truncated or corrupt? "
                                  "Re-save or re-download it.") from None
    return tensors


def inspect_checkpoint(ckpt_dir: str | os.PathLike[str], *, need_tokenizer: bool = True) -> Checkpoint:
    """Check a checkpoint directory: config, intact safetensors weights and (unless told not to) a tokenizer."""
    path = Path(ckpt_dir)
    config = read_config(path)
    files = weight_files(path)
    tensors = weight_tensors(files)
    tokenizer: Path | None = path / TOKENIZER_FILE
    if not tokenizer.is_file():
        if need_tokenizer:
            raise CheckpointError(f"{path}: no {TOKENIZER_FILE}; every use of a model needs its tokenizer. Save it "
                                  "into the checkpoint (tokenizer.save_pretrained(dir)).")
        tokenizer = None
    return Checkpoint(dir=path, config=config, weight_files=files, tensors=tensors, tokenizer_file=tokenizer)


def checkpoint_files(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Every file of a checked checkpoint, for handing it on whole (to devices); pickled files refused."""
    path = Path(ckpt_dir)
    inspect_checkpoint(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{path} holds pickled weights {pickles}, which are never passed on. " + _RESAVE)
    return files


def tokenizer_digest(ckpt_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of the checkpoint's tokenizer.json: two models share a tokenizer when these match."""
    return file_sha256(Path(ckpt_dir) / TOKENIZER_FILE)


def describe_local_slm(ckpt_dir: str | os.PathLike[str]) -> SlmInfo:
    """What a device tells the coordinator about its own SLM (no torch needed).

    The tokenizer is optional here: the coordinator decides whether a run needs it.
    """
    ckpt = inspect_checkpoint(ckpt_dir, need_tokenizer=False)
    return SlmInfo(
        arch=ckpt.model_type or "unknown",
        num_parameters=ckpt.num_parameters,
        vocab_size=int(ckpt.config.get("vocab_size", 0)),
        tokenizer_sha256=file_sha256(ckpt.tokenizer_file) if ckpt.tokenizer_file else None,
    )
