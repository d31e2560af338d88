"""Co-tuning methods, each in one place: its contract (what its server strategy and device
handler agree on) and where those two live, in one registry (ARCHITECTURE.md, "Methods").

    from common.methods import MethodContract, register_method
    register_method(CONTRACT, strategy="mypkg.server:MyStrategy", handler="edge_sdk.handlers.lora_sft:LoraSftHandler")

Importing this package is cheap: strategies and handlers are imported only when looked up.
"""

from __future__ import annotations

from common.methods.contract import ADAPTER_FILE, BuildSite, MethodContract, NoParams, adapter_artifact
from common.methods.registry import (
    Method,
    UnknownMethodError,
    get_method,
    method_for_kind,
    method_names,
    methods,
    register_method,
    task_kinds,
)

__all__ = [
    "ADAPTER_FILE",
    "BuildSite",
    "Method",
    "MethodContract",
    "NoParams",
    "UnknownMethodError",
    "adapter_artifact",
    "get_method",
    "method_for_kind",
    "method_names",
    "methods",
    "register_method",
    "task_kinds",
]
