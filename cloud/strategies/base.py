"""The interface every co-tuning strategy implements.

The coordinator core (cloud/service.py, cloud/rounds.py) only ever calls these methods:
it knows nothing of LoRA, distillation or models. A round's artifacts are a mapping
name -> sha256; which names devices may download, which one they upload a new version of,
where the LLM's adapter and the exportable SLM are, all come from the method's contract
(common.methods; ARCHITECTURE.md, "Methods"). How updates are aggregated is the run's choice
(`RunSpec.aggregation`), made in cloud/strategies/aggregation.py.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from cloud.models import ModelHolder
from cloud.secure.spec import device_task, secure_aggregation_problem
from cloud.store import BlobStore
from cloud.strategies.aggregation import Aggregate, UpdateFile, weighted_mean
from cloud.strategies.aggregation import aggregate as aggregate_updates
from cloud.strategies.lora_products import check_frozen_factors, lora_aggregation_problem
from common.encoding import decode, wire_schema
from common.methods import MethodContract
from common.methods.reports import checked_metrics
from common.ml.lora import frozen_factor
from common.protocol import AggregationRule, ClientRegistration, ClientTask, LoraSpec, RunSpec
from common.tensorfile import DTYPES, Schema, check_schema, load_arrays, read_header, schema_of

P = TypeVar("P", bound=BaseModel)
log = logging.getLogger("cotune.strategies")

__all__ = ["Aggregate", "ServedModel", "SpecError", "StepResult", "Strategy", "UpdateFile", "parse_params",
           "weighted_mean"]


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
        cls.check_aggregation(spec)

    @classmethod
    def check_aggregation(cls, spec: RunSpec) -> None:
        """Refuse an aggregation this method's updates cannot take, or one a quorum round defeats.

        Coordinate-wise rules and norm bounds are for updates that are the round's adapter
        trained further. Uploads of other values (`contract.update_tensors`, e.g. CrossLM's
        per-sample scores) take the weighted mean only, unless their strategy overrides this.
        """
        problem = secure_aggregation_problem(spec)
        if problem is not None:
            raise SpecError(problem)
        agg = spec.aggregation
        what = (f"{cls.name} devices upload {', '.join(cls.contract.update_tensors)}, not an adapter"
                if cls.contract.update_tensors else None)
        problem = lora_aggregation_problem(spec.lora.aggregation, agg.rule.value, what)
        if problem is not None:
            raise SpecError(problem)
        if what is not None:
            if agg.norm_bound is not None:
                raise SpecError(f"aggregation.norm_bound bounds an update's change from the round's adapter; {what}: "
                                "remove norm_bound")
            if agg.rule is not AggregationRule.mean:
                raise SpecError(f"aggregation.rule {agg.rule.value!r} works coordinate by coordinate, which would "
                                f"pair one device's values with another's; {what}: use rule 'mean' (with "
                                "max_weight_share to cap what one device weighs)")
        quorum = spec.min_clients
        if agg.max_weight_share is not None and agg.max_weight_share * quorum < 1:
            least = math.ceil(1 / agg.max_weight_share)
            raise SpecError(f"aggregation.max_weight_share {agg.max_weight_share} cannot hold in a round that closes "
                            f"with min_clients = {quorum} updates ({quorum} x {agg.max_weight_share} < 1): raise it "
                            f"to at least {1 / quorum:.4g}, or min_clients to at least {least}")
        if agg.rule is AggregationRule.median and quorum < 3:
            raise SpecError(f"aggregation.rule 'median' of {quorum} updates is their mean, which one device can "
                            "steer: set min_clients to at least 3")
        if agg.rule is AggregationRule.trimmed_mean and int(agg.trim * quorum) < 1:
            fix = (f"raise trim_fraction to at least 1/min_clients ({1 / quorum:.4g})" if quorum >= 3
                   else "set min_clients to at least 3 and trim_fraction to at least 1/min_clients")
            raise SpecError(f"aggregation.trim_fraction {agg.trim} drops no update from a round that closes with "
                            f"min_clients = {quorum} updates, which leaves a plain mean: {fix}")

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
                          privacy=self.spec.privacy, secure_aggregation=device_task(self.spec),
                          update_encoding=self.spec.update_encoding, update_base=self._update_base(), builds=builds)

    def _update_base(self) -> str | None:
        """What an encoded upload is the change from: the round's published adapter, or nothing
        (zero) for methods whose uploads are other values (`contract.update_tensors`)."""
        if self.spec.update_encoding == "fp32" or self.contract.update_tensors:
            return None
        return self.update_artifact

    def _frozen(self) -> Callable[[str], bool]:
        lora = self.spec.lora.aggregation
        return lambda name: not self.contract.update_tensors and frozen_factor(name, lora)

    def wire_schema(self, inputs: dict[str, str]) -> Schema:
        """The tensors an upload carries under the run's update encoding."""
        return wire_schema(self.update_schema(inputs), self.spec.update_encoding, self._frozen())

    def read_update(self, path: Path, inputs: Mapping[str, str]) -> dict[str, np.ndarray]:
        """An upload (checked against the wire schema) as the float32 tensors it stands for."""
        header = read_header(path)
        check_schema(header, self.wire_schema(dict(inputs)))
        wire = load_arrays(path, header)
        if self.spec.update_encoding == "fp32":
            return wire
        return decode(wire, self._update_start(inputs), self.spec.update_encoding, self._frozen())

    def _update_start(self, inputs: Mapping[str, str]) -> dict[str, np.ndarray]:
        base = self._update_base()
        if base is None:
            schema = self.update_schema(dict(inputs))
            return {name: np.zeros(shape, np.float32) for name, (shape, _dt) in schema.items()}
        path = self.store.path(inputs[base])
        return load_arrays(path, read_header(path))

    def update_schema(self, inputs: dict[str, str]) -> Schema:
        """Uploads must have exactly the tensors of the adapter the round published."""
        return schema_of(read_header(self.store.path(inputs[self.update_artifact])))

    def aggregate_round(self, updates: Iterable[UpdateFile], inputs: Mapping[str, str]) -> Aggregate:
        """The round's updates aggregated under the run's rule (`RunSpec.aggregation`), weights
        capped by `max_samples_per_update`, and the figures the round reports about it.
        `inputs` are the round's inputs: the update schema and, for norm bounding, the start.

        Under local DP a device's sample count is private (it declares 1), so every update
        weighs the same and no device can claim more."""
        agg = self.spec.aggregation
        lora = self.spec.lora.aggregation
        needs_start = agg.norm_bound is not None or lora == "ffa"
        reference = self.store.path(inputs[self.update_artifact]) if needs_start else None
        max_samples = 1 if self.spec.privacy is not None else self.spec.max_samples_per_update
        # The coordinator sees every update on its own today, so the factor-gap figure is always
        # computed; under a secure aggregation that reveals only the sum it would be turned off.
        read = None if self.spec.update_encoding == "fp32" else (lambda path: self.read_update(path, inputs))
        return aggregate_updates(updates, self.update_schema(dict(inputs)), agg, max_samples,
                                 reference=reference, scratch=self._scratch(), lora=lora, factor_gap=True, read=read)

    def aggregate_mean(self, mean: Mapping[str, np.ndarray], inputs: Mapping[str, str],
                       figures: dict[str, Any]) -> Aggregate:
        """The round's aggregate from the weighted mean a secure aggregation unmasked (float64,
        by tensor name): cast to the update's dtypes, and under 'ffa' every lora_A taken from the
        round's start (what devices sent for A never counts: it cannot be checked one by one)."""
        schema = self.update_schema(dict(inputs))
        arrays = {name: np.asarray(mean[name], dtype=np.dtype(DTYPES[dtype])) for name, (_shape, dtype) in
                  schema.items()}
        if self.spec.lora.aggregation == "ffa" and not self.contract.update_tensors:
            reference = self.store.path(inputs[self.update_artifact])
            start = load_arrays(reference, read_header(reference))
            arrays.update({k: np.array(start[k]) for k in arrays if frozen_factor(k, "ffa")})
        return Aggregate(arrays=arrays, figures=figures)

    def check_update(self, arrays: Mapping[str, Any], inputs: Mapping[str, str]) -> None:
        """Refuse (TensorFileError, answered 422) an upload this run's LoRA aggregation cannot take:
        under 'ffa', one whose lora_A tensors are not the round's starting ones."""
        if self.spec.lora.aggregation == "ffa" and not self.contract.update_tensors:
            reference = self.store.path(inputs[self.update_artifact])
            check_frozen_factors(arrays, load_arrays(reference, read_header(reference)), "ffa")

    def _scratch(self) -> Path:
        # The store's scratch folder (BlobStore makes it): on the data disk, beside the updates.
        return self.store.root / "tmp"

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

    def check_device_metrics(self, value: Any) -> dict[str, Any]:
        """A device's metrics (parsed JSON) bounded and validated against the schema: what to store.
        Raises pydantic's ValidationError, or ValueError for a size bound, saying what is wrong."""
        return checked_metrics(self.device_metrics_schema(), value)

    def round_metrics(self, device_metrics: Sequence[Mapping[str, Any] | BaseModel]) -> dict[str, Any]:
        """Round-level figures from the devices' (validated) metrics: the worst epsilon spent.

        Stored metrics are read defensively (a row stored before the schema was checked, or by an
        older coordinator): an epsilon that is not a finite number >= 0 is left out, with a log line.
        """
        epsilons = []
        for metrics in device_metrics:
            data = metrics.model_dump() if isinstance(metrics, BaseModel) else metrics
            privacy = data.get("privacy") if isinstance(data, Mapping) else None
            epsilon = privacy.get("epsilon") if isinstance(privacy, Mapping) else None
            if epsilon is None:
                continue
            if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < math.inf:
                log.warning("a device's privacy epsilon is not a finite number >= 0; left out of the round's figures")
                continue
            epsilons.append(float(epsilon))
        return {"privacy_epsilon_max": max(epsilons)} if epsilons else {}

