"""Checks on the inputs, done before any model is loaded or any file written.

Reads only JSON and safetensors headers (no torch), so a wrong path, a truncated weights
file, an unsupported architecture or an adapter trained on another base fails in
milliseconds with a message that says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoint import CheckpointError, inspect_checkpoint, read_config, read_json_object
from common.digest import bytes_sha256, file_sha256
from common.tensorfile import TensorFileError, read_header
from export.errors import ExportError, UnsupportedModelError

if TYPE_CHECKING:
    from common.protocol import LoraSpec

# HF model_type -> llama.cpp architecture name.
SUPPORTED_ARCHS: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}

TensorShapes = dict[str, tuple[str, tuple[int, ...]]]


@dataclass
class BaseInfo:
    dir: Path
    config: dict[str, Any]
    model_type: str
    arch: str
    weights: TensorShapes
    weight_files: list[Path]
    tokenizer_file: Path

    @property
    def name(self) -> str:
        return str(self.config.get("_name_or_path") or self.config.get("_model_name_or_path") or self.dir.name)


@dataclass
class AdapterInfo:
    kind: str  # "peft" (a save_pretrained directory) or "cotune" (safetensors of peft state-dict names)
    sha256: str
    tensors: TensorShapes
    path: Path | None = None
    data: bytes | None = None
    spec: LoraSpec | None = None
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path | None:
        return self.path / "adapter_model.safetensors" if self.kind == "peft" and self.path else self.path


def safetensors_header(source: Path | bytes, what: str) -> TensorShapes:
    """name -> (dtype, shape) from a safetensors file or body; ExportError when truncated or malformed."""
    try:
        header = read_header(source, wire_dtypes=False)
    except TensorFileError as exc:
        raise ExportError(f"{what} is not a valid safetensors file: {exc.message}; truncated or corrupt? "
                          "Re-save or re-download it.") from None
    return {name: (info.dtype, info.shape) for name, info in header.tensors.items()}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_json_object(path, what)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def inspect_base(base_dir: str | os.PathLike[str]) -> BaseInfo:
    """Check an HF checkpoint directory: config, supported architecture, intact weights, a tokenizer."""
    path = Path(base_dir)
    try:
        config = read_config(path)
        model_type = str(config.get("model_type", ""))
        if model_type == "gemma3" and "text_config" in config:
            raise UnsupportedModelError(
                f"{path}: this is the multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); export its "
                "text model instead (a Gemma3ForCausalLM checkpoint, model_type gemma3_text)")
        if model_type not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"{path}: architecture {model_type or '(none)'!r} is not supported by the exporter; "
                f"supported: {', '.join(SUPPORTED_ARCHS)}")
        ckpt = inspect_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    assert ckpt.tokenizer_file is not None  # inspect_checkpoint requires one
    tok = _read_json(ckpt.tokenizer_file, "tokenizer (tokenizer.json)")
    if "model" not in tok:
        raise ExportError(f"{ckpt.tokenizer_file}: not a tokenizers-library tokenizer.json (no 'model'); corrupt?")
    return BaseInfo(dir=path, config=config, model_type=model_type, arch=SUPPORTED_ARCHS[model_type],
                    weights={name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()},
                    weight_files=ckpt.weight_files, tokenizer_file=ckpt.tokenizer_file)


def _module_of(name: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in name:
            module = name.split(marker)[0]
            return module.removeprefix("base_model.model."), part
    return None


def check_adapter_fits(adapter: TensorShapes, base: BaseInfo) -> int:
    """Every LoRA pair matches a base linear layer's shape; returns the largest rank. ExportError otherwise."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, (_, shape) in adapter.items():
        found = _module_of(name)
        if found is None:
            continue
        module, part = found
        pairs.setdefault(module, {})[part] = shape
    if not pairs:
        raise ExportError("the adapter holds no LoRA tensors (no '.lora_A.' / '.lora_B.' names); is it a LoRA adapter?")
    max_rank = 0
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise ExportError(f"adapter module {module} has lora_{''.join(parts)} but not its pair; corrupt adapter?")
        weight = base.weights.get(module + ".weight")
        if weight is None:
            raise ExportError(f"the adapter adapts {module}, which this base model does not have: it was trained on "
                              "another base model. Export it with the base it was trained on.")
        a, b = parts["A"], parts["B"]
        w = weight[1]
        if len(a) != 2 or len(b) != 2 or len(w) != 2 or a[0] != b[1]:
            raise ExportError(f"adapter module {module}: lora_A {a} and lora_B {b} do not form a LoRA pair")
        if a[1] != w[1] or b[0] != w[0]:
            raise ExportError(
                f"the adapter does not match this base model: {module} is {w[0]}x{w[1]} here but the adapter was "
                f"trained on a {b[0]}x{a[1]} layer (other hidden size or shapes). Export it with its own base model.")
        max_rank = max(max_rank, a[0])
    return max_rank


def inspect_adapter(adapter: Any, base: BaseInfo, spec: LoraSpec | None = None) -> AdapterInfo:
    """A peft adapter directory, or a cotune adapter (safetensors file or bytes) with its LoraSpec."""
    if isinstance(adapter, tuple):
        adapter, spec = adapter
    if isinstance(adapter, (bytes, bytearray, memoryview)):
        data = bytes(adapter)
        tensors = safetensors_header(data, "the adapter body")
        info = AdapterInfo(kind="cotune", sha256=bytes_sha256(data), tensors=tensors, data=data)
    else:
        path = Path(adapter)
        if path.is_dir():
            cfg = _read_json(path / "adapter_config.json", "peft adapter config (adapter_config.json)")
            if str(cfg.get("peft_type", "")).upper() != "LORA":
                raise UnsupportedModelError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters export")
            weights = path / "adapter_model.safetensors"
            if not weights.is_file():
                raise ExportError(f"{path}: no adapter_model.safetensors (pickled adapter_model.bin is never loaded); "
                                  "save the adapter with save_pretrained(dir, safe_serialization=True)")
            tensors = safetensors_header(weights, str(weights))
            info = AdapterInfo(kind="peft", sha256=file_sha256(weights), tensors=tensors, path=path, peft_config=cfg)
        elif path.is_file():
            tensors = safetensors_header(path, str(path))
            info = AdapterInfo(kind="cotune", sha256=file_sha256(path), tensors=tensors, path=path)
            spec = spec or adapter_spec_beside(path)
        else:
            raise ExportError(f"{path}: no such adapter (a peft adapter directory or a cotune adapter .safetensors)")
    rank = check_adapter_fits(info.tensors, base)
    if info.kind == "cotune":
        if spec is None:
            raise ExportError("a cotune adapter file needs its LoRA settings (r, alpha, target modules): pass a "
                              "LoraSpec, or keep the adapter_info.json the device wrote beside it")
        if spec.r != rank:
            raise ExportError(f"the LoRA settings say r={spec.r} but the adapter's tensors have rank {rank}; "
                              "pass the settings it was trained with")
        info.spec = spec
    return info


def adapter_spec_beside(path: Path) -> LoraSpec | None:
    """The LoraSpec in the adapter_info.json a device writes beside its final adapter, if any."""
    from common.protocol import LoraSpec

    info = path.parent / "adapter_info.json"
    if not info.is_file():
        return None
    data = _read_json(info, "adapter info")
    try:
        return LoraSpec.model_validate(data.get("lora", data))
    except ValueError as exc:
        raise ExportError(f"{info}: not valid LoRA settings ({exc})") from None
