"""The interface every co-tuning strategy implements, and the streaming weighted mean.

The coordinator core (cloud/service.py, cloud/rounds.py) only ever calls these methods:
it knows nothing of LoRA, distillation or models. A round's artifacts are a mapping
name -> sha256; names under `slm/` are what devices may download, everything else stays
on the server (e.g. the LLM's adapter).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from cloud.store import BlobStore
from common.protocol import ClientRegistration, ClientTask, LoraSpec, RunSpec
from common.tensorfile import Schema, check_schema, load_arrays, read_header, schema_of


class SpecError(ValueError):
    """A run spec this strategy cannot run; the message says what to change."""


@dataclass
class StepResult:
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedModel:
    """A model the coordinator can load: base checkpoint + LoRA settings + adapter blob."""

    checkpoint: str
    lora: LoraSpec
    seed: int
    adapter_digest: str


@dataclass(frozen=True)
class UpdateFile:
    path: Path
    num_samples: int


class Strategy(ABC):
    name: ClassVar[str]
    # The artifact every client trains and uploads a new version of.
    update_artifact: ClassVar[str] = "slm/adapter.safetensors"

    def __init__(self, spec: RunSpec, store: BlobStore) -> None:
        self.spec = spec
        self.store = store

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        """Raise SpecError before anything is created if the spec cannot run."""
        return None

    @abstractmethod
    def initial_inputs(self) -> dict[str, str]:
        """Write round 1's artifacts into the store; return name -> digest."""

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        """Scores of the starting models (round 0 of the report)."""
        return {}

    # The device-side handler this strategy's rounds need (edge_sdk.handlers).
    task_kind: ClassVar[str] = "lora_sft"

    def check_join(self, registration: ClientRegistration) -> None:
        """Raise SpecError, saying why, if this device cannot take part in the run."""
        if self.task_kind not in registration.task_kinds:
            raise SpecError(
                f"this run needs devices that can run {self.task_kind!r} tasks; this one offers "
                f"{registration.task_kinds}; upgrade cotune on the device"
            )

    @staticmethod
    def client_visible(name: str) -> bool:
        return name.startswith("slm/")

    @abstractmethod
    def client_task(self, round_number: int) -> ClientTask: ...

    def update_schema(self, inputs: dict[str, str]) -> Schema:
        """Uploads must have exactly the tensors of the adapter the round published."""
        return schema_of(read_header(self.store.path(inputs[self.update_artifact])))

    def aggregate(self, updates: Iterable[UpdateFile], schema: Schema) -> dict[str, np.ndarray]:
        return weighted_mean(updates, schema)

    # -- what the coordinator core asks instead of knowing artifact names ---------------------

    def llm_adapter(self, outputs: dict[str, str]) -> ServedModel | None:
        """The co-tuned LLM that answers /v1/generate, given a round's outputs; None if the
        method holds no LLM."""
        return None

    def exportable_model(self, outputs: dict[str, str]) -> ServedModel | None:
        """The model the coordinator exports to edge builds; None when the method's builds
        are made on the devices (their SLM never leaves them)."""
        return None

    def device_metrics_schema(self) -> type[BaseModel]:
        """The pydantic model a device's update metrics must validate against."""
        return BaseModel

    def round_metrics(self, device_metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Round-level figures from the devices' (validated) metrics, e.g. the worst epsilon."""
        return {}

    @abstractmethod
    def server_step(
        self, round_number: int, inputs: dict[str, str], aggregate_digest: str
    ) -> StepResult:
        """Turn the aggregate into the next round's inputs (and metrics)."""


def weighted_mean(updates: Iterable[UpdateFile], schema: Schema) -> dict[str, np.ndarray]:
    """Sample-weighted mean of updates, streamed: one update is mapped at a time.

    Memory is one float64 accumulator per tensor, whatever the number of clients.
    """
    sums: dict[str, np.ndarray] | None = None
    total = 0
    for update in updates:
        header = read_header(update.path)
        check_schema(header, schema)
        arrays = load_arrays(update.path, header)
        if sums is None:
            sums = {name: np.zeros(arr.shape, dtype=np.float64) for name, arr in arrays.items()}
        for name, arr in arrays.items():
            sums[name] += arr.astype(np.float64) * update.num_samples
        total += update.num_samples
        del arrays
    if sums is None or total <= 0:
        raise ValueError("no updates with samples to aggregate")
    return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}
