"""The interface every co-tuning strategy implements, and the streaming weighted mean.

The coordinator core (cloud/service.py, cloud/rounds.py) only ever calls these methods:
it knows nothing of LoRA, distillation or models. A round's artifacts are a mapping
name -> sha256; which names devices may download, which one they upload a new version of,
where the LLM's adapter and the exportable SLM are, all come from the method's contract
(common.methods; ARCHITECTURE.md, "Methods").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from cloud.models import ModelHolder
from cloud.store import BlobStore
from common.methods import MethodContract
from common.protocol import ClientRegistration, ClientTask, LoraSpec, RunSpec
from common.tensorfile import Schema, check_schema, load_arrays, read_header, schema_of

P = TypeVar("P", bound=BaseModel)


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


def parse_params(model: type[P], params: dict[str, Any], algorithm: str) -> P:
    """Validate `RunSpec.params` into `model`; SpecError listing every problem otherwise."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"{algorithm}: {problems}") from None


class Strategy(ABC):
    """One method's server side. Subclasses set `contract`; `name`, `task_kind` and
    `update_artifact` follow from it."""

    contract: ClassVar[MethodContract]
    name: ClassVar[str]
    task_kind: ClassVar[str]
    update_artifact: ClassVar[str]
    # `RunSpec.params`: the contract's device params plus any server-only settings.
    params_model: ClassVar[type[BaseModel] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        contract = cls.__dict__.get("contract")
        if contract is not None:
            cls.name, cls.task_kind, cls.update_artifact = contract.name, contract.task_kind, contract.update_artifact

    def __init__(self, spec: RunSpec, store: BlobStore, holder: ModelHolder | None = None) -> None:
        self.spec = spec
        self.store = store
        self.holder = holder if holder is not None else ModelHolder(store)
        self.params = parse_params(self.run_params(), spec.params, self.name)

    @classmethod
    def run_params(cls) -> type[BaseModel]:
        return cls.params_model or cls.contract.params

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        """Raise SpecError before anything is created if the spec cannot run."""
        parse_params(cls.run_params(), spec.params, cls.name)
        cls.check_builds(spec.builds)

    @classmethod
    def check_builds(cls, builds: Sequence[str]) -> None:
        """Refuse build targets that do not parse or that this method cannot make."""
        if not builds:
            return
        from export.errors import ExportError
        from export.targets import parse_targets

        try:
            targets = parse_targets(list(builds))
        except ExportError as exc:
            raise SpecError(f"builds: {exc}") from None
        problem = cls.contract.build_problem(t.format for t in targets)
        if problem is not None:
            raise SpecError(f"builds: {problem}")

    @abstractmethod
    def initial_inputs(self) -> dict[str, str]:
        """Write round 1's artifacts into the store; return name -> digest."""

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        """Scores of the starting models (round 0 of the report)."""
        return {}

    def check_join(self, registration: ClientRegistration) -> None:
        """Raise SpecError, saying why, if this device cannot take part in the run."""
        if self.task_kind not in registration.task_kinds:
            raise SpecError(
                f"this run needs devices that can run {self.task_kind!r} tasks; this one offers "
                f"{registration.task_kinds}; upgrade cotune on the device"
            )

    @classmethod
    def client_visible(cls, name: str) -> bool:
        return cls.contract.client_visible(name)

    def round_seed(self, round_number: int) -> int:
        return self.spec.seed * 100_003 + round_number

    def client_task(self, round_number: int) -> ClientTask:
        # Devices make the builds only where the method's SLM lives on them.
        builds = list(self.spec.builds) if self.contract.builds_on == "device" else []
        return ClientTask(kind=self.task_kind, lora=self.spec.lora, train=self.spec.train,
                          seed=self.round_seed(round_number), params=self.contract.device_params(self.params),
                          privacy=self.spec.privacy, builds=builds)

    def update_schema(self, inputs: dict[str, str]) -> Schema:
        """Uploads must have exactly the tensors of the adapter the round published."""
        return schema_of(read_header(self.store.path(inputs[self.update_artifact])))

    def aggregate(self, updates: Iterable[UpdateFile], schema: Schema) -> dict[str, np.ndarray]:
        return weighted_mean(updates, schema)

    @abstractmethod
    def server_step(
        self, round_number: int, inputs: dict[str, str], aggregate_digest: str
    ) -> StepResult:
        """Turn the aggregate into the next round's inputs (and metrics)."""

    # -- what the coordinator core asks instead of knowing artifact names ---------------------

    def llm_adapter(self, outputs: dict[str, str]) -> ServedModel | None:
        """The co-tuned LLM that answers /v1/generate, given a round's outputs; None if the
        method holds no LLM."""
        name = self.contract.llm_adapter
        if name is None or self.spec.llm is None or name not in outputs:
            return None
        return ServedModel(self.spec.llm, self.spec.lora, self.spec.seed, outputs[name])

    def exportable_model(self, outputs: dict[str, str]) -> ServedModel | None:
        """The model the coordinator exports to edge builds; None when the method's builds
        are made on the devices (their SLM never leaves them)."""
        name = self.contract.export_adapter
        if self.contract.builds_on != "server" or name is None or name not in outputs:
            return None
        return ServedModel(self.spec.slm, self.spec.lora, self.spec.seed, outputs[name])

    def device_metrics_schema(self) -> type[BaseModel]:
        """The pydantic model a device's update metrics must validate against."""
        return self.contract.device_metrics

    def round_metrics(self, device_metrics: Sequence[Mapping[str, Any] | BaseModel]) -> dict[str, Any]:
        """Round-level figures from the devices' (validated) metrics: the worst epsilon spent."""
        epsilons = []
        for metrics in device_metrics:
            data = metrics.model_dump() if isinstance(metrics, BaseModel) else metrics
            privacy = data.get("privacy")
            if isinstance(privacy, Mapping) and privacy.get("epsilon") is not None:
                epsilons.append(privacy["epsilon"])
        return {"privacy_epsilon_max": max(epsilons)} if epsilons else {}


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
