"""Device-side round tasks. The coordinator's strategy names a task kind; the worker runs
the handler registered for it. New co-tuning methods add a handler, not worker code."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.protocol import ArtifactRef, LoraSpec, RoundInfo


class Fetcher(Protocol):
    def fetch(self, ref: ArtifactRef) -> Path: ...

    def materialize(self, refs: list[ArtifactRef], prefix: str, target: Path) -> Path: ...


@dataclass
class DeviceContext:
    """What a handler may use: the device's own data and files, and the artifact cache."""

    records: list[Any]
    eval_records: list[Any]
    cache: Fetcher
    state_dir: Path
    say: Callable[[str], None]
    progress: bool = True
    local_slm: Path | None = None
    coordinator: str = "(unknown)"  # its URL: messages about names it sent say who sent them
    device: str = "cpu"  # where models load and train: auto, cpu, cuda, cuda:N (common.ml.device)


@dataclass
class UpdatePayload:
    """What a round's work produced: tensors to upload, their weight, and device metrics."""

    arrays: dict[str, Any]
    num_samples: int
    metrics: dict[str, Any]


@dataclass
class FinalArtifacts:
    model_dir: Path
    adapter: Path
    adapter_sha256: str
    # The same adapter as a stock peft directory (adapter_config.json + adapter_model.safetensors).
    peft_dir: Path | None = None


def keep_peft_dir(adapter: Path, lora: LoraSpec, model_dir: Path, out: Path) -> Path:
    """Write the final adapter as a peft directory at `out`, its base being `model_dir`."""
    from common.ml.peft_dir import write_peft_dir

    return write_peft_dir(adapter, lora, model_dir.resolve(), out)


def artifact(info: RoundInfo, name: str) -> ArtifactRef:
    for ref in info.artifacts:
        if ref.name == name:
            return ref
    raise RuntimeError(f"round {info.round} publishes no {name!r}; is this device's SDK too old for the run?")


class TaskHandler(ABC):
    kind: str

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def run(self, info: RoundInfo) -> UpdatePayload:
        """Do the round's work on local data; return what to upload."""

    @abstractmethod
    def finish(self, info: RoundInfo, out_dir: Path) -> FinalArtifacts:
        """Keep what the run produced for this device."""
