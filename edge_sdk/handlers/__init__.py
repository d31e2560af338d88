"""Device-side round task handlers, by the task kind a run's strategy names. Which class
handles a kind is the method registry's to say (common.methods; ARCHITECTURE.md, "Methods")."""

from __future__ import annotations

from common.methods import UnknownMethodError, method_for_kind, task_kinds
from edge_sdk.handlers.base import DeviceContext, FinalArtifacts, TaskHandler, UpdatePayload


def handler_for(kind: str) -> type[TaskHandler]:
    """The handler registered for task kind `kind`; RuntimeError when this device has none."""
    try:
        method = method_for_kind(kind)
    except UnknownMethodError:
        raise RuntimeError(
            f"the run asks for task kind {kind!r}, which this device's cotune does not know "
            f"(it knows {', '.join(task_kinds())}); upgrade cotune on the device"
        ) from None
    return method.handler_class()


__all__ = ["DeviceContext", "FinalArtifacts", "TaskHandler", "UpdatePayload", "handler_for", "task_kinds"]
