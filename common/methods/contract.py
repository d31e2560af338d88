"""The contract of a co-tuning method: what its server strategy and its device handler agree
on, in one frozen value both sides import (ARCHITECTURE.md, "Methods").

A method publishes artifacts by name (`prefix/file`); a checkpoint published under a prefix
keeps its adapter as `prefix/adapter.safetensors`. Devices may download only the names the
contract calls client-visible; everything else stays on the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from common.methods.reports import DeviceMetrics

# Where a method's edge builds are made: from a model the server holds, or on each device
# from its own SLM (which never leaves it).
BuildSite = Literal["server", "device"]

# The file name of a LoRA adapter inside a published checkpoint or a device's final model.
ADAPTER_FILE = "adapter.safetensors"
# Where methods publish the run's checkpoints: `slm` is the run's SLM as devices receive it;
# `llm` is the server's LLM, whose adapter never leaves the server.
SLM_PREFIX = "slm"
LLM_PREFIX = "llm"

# Build formats (export/targets.py) each site can make. A gguf-lora build ships a base shared
# by many adapters; a device's own SLM has one adapter, so it makes merged builds only.
_FORMATS: dict[str, tuple[str, ...]] = {"server": ("gguf", "gguf-lora", "onnx"), "device": ("gguf", "onnx")}


def adapter_artifact(prefix: str) -> str:
    """The name of the adapter of the checkpoint published under `prefix`."""
    return f"{prefix}/{ADAPTER_FILE}"


class NoParams(BaseModel):
    """`RunSpec.params` of a method that takes none: any key is refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class MethodContract:
    """Everything about a method that both sides must agree on.

    `update_tensors` names the tensors of an upload when they are fixed; empty means an upload
    carries exactly the tensors of `update_artifact` (a LoRA adapter) as the round published it.
    `params` is the part of `RunSpec.params` a device needs (sent in each `ClientTask.params`);
    `device_metrics` is what the device handler reports with each update.
    """

    name: str
    task_kind: str
    update_artifact: str
    published_prefixes: tuple[str, ...]
    client_prefixes: tuple[str, ...]
    client_artifacts: tuple[str, ...] = ()
    update_tensors: tuple[str, ...] = ()
    params: type[BaseModel] = NoParams
    device_metrics: type[BaseModel] = DeviceMetrics
    builds_on: BuildSite | None = "server"
    llm_adapter: str | None = None
    export_adapter: str | None = None

    def __post_init__(self) -> None:
        # Fail at import, where the method is written, not in the middle of a run.
        for name in (self.update_artifact, *self.client_artifacts, self.llm_adapter, self.export_adapter):
            if name is not None and not self.is_published(name):
                raise ValueError(f"method {self.name!r}: {name!r} is under none of its published prefixes "
                                 f"{list(self.published_prefixes)}")
        unpublished = [p for p in self.client_prefixes if p not in self.published_prefixes]
        if unpublished:
            raise ValueError(f"method {self.name!r}: client prefixes {unpublished} are not published prefixes")
        if self.llm_adapter is not None and self.client_visible(self.llm_adapter):
            raise ValueError(f"method {self.name!r}: the LLM's adapter must stay on the server")
        if (self.builds_on == "server") != (self.export_adapter is not None):
            raise ValueError(f"method {self.name!r}: server builds need `export_adapter`, and only they use it")

    def is_published(self, name: str) -> bool:
        return any(name.startswith(prefix + "/") for prefix in self.published_prefixes)

    def client_visible(self, name: str) -> bool:
        """Whether devices may download the artifact `name`."""
        return name in self.client_artifacts or any(name.startswith(p + "/") for p in self.client_prefixes)

    @property
    def build_formats(self) -> tuple[str, ...]:
        """The build formats this method can make (none when it makes no edge builds)."""
        return _FORMATS[self.builds_on] if self.builds_on is not None else ()

    def build_problem(self, formats: Iterable[str]) -> str | None:
        """Why builds of these formats cannot be made for this method; None when they can."""
        if self.builds_on is None:
            return f"{self.name} makes no edge builds; remove `builds`"
        refused = sorted({f for f in formats if f not in self.build_formats})
        if not refused:
            return None
        where = "on each device from its own SLM" if self.builds_on == "device" else "on the server"
        return (f"{self.name} makes its builds {where}, which can be {', '.join(self.build_formats)}, "
                f"not {', '.join(refused)}")

    def device_params(self, params: BaseModel) -> dict:
        """The device's part of a method's validated run params, as `ClientTask.params` carries it."""
        return {k: v for k, v in params.model_dump().items() if k in self.params.model_fields}
