"""Device-side round task handlers, by the task kind a run's strategy names."""

from __future__ import annotations

from edge_sdk.handlers.base import DeviceContext, FinalArtifacts, TaskHandler, UpdatePayload
from edge_sdk.handlers.coplms import CoPlmsHandler
from edge_sdk.handlers.crosslm import CrossLmHandler
from edge_sdk.handlers.lora_sft import LoraSftHandler

HANDLERS: dict[str, type[TaskHandler]] = {
    cls.kind: cls for cls in (LoraSftHandler, CoPlmsHandler, CrossLmHandler)
}


def handler_for(kind: str) -> type[TaskHandler]:
    try:
        return HANDLERS[kind]
    except KeyError:
        raise RuntimeError(
            f"the run asks for task kind {kind!r}, which this device's cotune does not know "
            f"(it knows {', '.join(sorted(HANDLERS))}); upgrade cotune on the device"
        ) from None


__all__ = ["HANDLERS", "DeviceContext", "FinalArtifacts", "TaskHandler", "UpdatePayload", "handler_for"]
