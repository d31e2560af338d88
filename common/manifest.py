"""The manifest every edge build carries (`manifest.json` beside its files).

`export/` writes it, the coordinator publishes it, and the device runtime reads it to pick
a backend; it lives here, in the lowest layer, so all three agree on one schema.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.digest import file_sha256

MANIFEST_NAME = "manifest.json"

BuildFormat = Literal["gguf", "gguf-lora", "onnx"]


class BuildFile(BaseModel):
    name: str = Field(description="path relative to the build directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class BuildManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: BuildFormat
    quantization: str = Field(description="f32, f16, q8_0, q4_k_m, int8, int4, ...")
    architecture: str = Field(description="llama, qwen2, gemma3, gpt2, ...")
    model_file: str = Field(description="the file a backend loads (e.g. model.gguf, model.onnx)")
    tokenizer_file: str | None = Field(None, description="tokenizer.json for ONNX builds")
    base_model: str = Field(description="where the base weights came from (name or sha256)")
    base_gguf: str | None = Field(None, description="for gguf-lora: sha256 of the base GGUF it applies to")
    adapter_sha256: str | None = None
    run_id: str | None = None
    round: int | None = None
    context_length: int = Field(0, ge=0)
    files: list[BuildFile] = Field(default_factory=list)
    parity: dict[str, Any] = Field(default_factory=dict, description="figures measured against the torch model")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    cotune_version: str = ""

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def write(self, build_dir: Path) -> Path:
        path = Path(build_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, build_dir_or_file: Path) -> BuildManifest:
        path = Path(build_dir_or_file)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is this a cotune build directory?")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid build manifest: {exc}") from None

    def verify(self, build_dir: Path) -> None:
        """Every listed file exists with its size and sha256; raise ValueError naming the first that does not."""
        for f in self.files:
            path = Path(build_dir) / f.name
            if not path.is_file():
                raise ValueError(f"{path} is missing from the build")
            if path.stat().st_size != f.size:
                raise ValueError(f"{path} is {path.stat().st_size} bytes, the manifest says {f.size}: truncated?")
            if file_sha256(path) != f.sha256:
                raise ValueError(f"{path} does not match its sha256 in the manifest: corrupt?")


def build_files(build_dir: Path) -> list[BuildFile]:
    """Every file under `build_dir` but its manifest, with size and sha256, for the manifest to list."""
    root = Path(build_dir)
    return [BuildFile(name=p.relative_to(root).as_posix(), sha256=file_sha256(p), size=p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_NAME]
