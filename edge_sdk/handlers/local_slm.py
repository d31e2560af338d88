"""Describe a device's own SLM checkpoint without loading it (no torch needed)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from common.protocol import SlmInfo
from common.tensorfile import read_header


def describe_local_slm(ckpt_dir: Path) -> SlmInfo:
    ckpt_dir = Path(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{ckpt_dir} is not a model checkpoint (no config.json)")
    config = json.loads(config_path.read_text())
    params = 0
    for weights in sorted(ckpt_dir.glob("*.safetensors")):
        header = read_header(weights)
        params += sum(math.prod(t.shape) for t in header.tensors.values())
    tokenizer = ckpt_dir / "tokenizer.json"
    return SlmInfo(
        arch=str(config.get("model_type", "unknown")),
        num_parameters=params,
        vocab_size=int(config.get("vocab_size", 0)),
        tokenizer_sha256=hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer.is_file() else None,
    )
