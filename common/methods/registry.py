"""The one registry of co-tuning methods: name -> contract, server strategy, device handler
(ARCHITECTURE.md, "Methods").

Strategy and handler are named by import path ("package.module:Class") and imported only
when asked for, so a device never imports coordinator code and the coordinator never needs a
device's extras. The built-in methods register themselves in their contract modules; other
methods are imported from the modules named in COTUNE_METHODS (comma-separated) or in the
"cotune.methods" entry-point group, the first time a name is not found.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from common.methods.contract import MethodContract

_BUILTIN_MODULES = ("common.methods.fedavg", "common.methods.fedcollm", "common.methods.coplms",
                    "common.methods.crosslm")
PLUGINS_ENV = "COTUNE_METHODS"
ENTRY_POINT_GROUP = "cotune.methods"


class UnknownMethodError(LookupError):
    """No method of that name (or no handler for that task kind) is registered."""


@dataclass(frozen=True)
class Method:
    """A registered method. `strategy` and `handler` are "module:attribute" import paths."""

    contract: MethodContract
    strategy: str
    handler: str

    @property
    def name(self) -> str:
        return self.contract.name

    def strategy_class(self) -> Any:
        return load_object(self.strategy)

    def handler_class(self) -> Any:
        return load_object(self.handler)


_methods: dict[str, Method] = {}
_loaded = {"builtins": False, "entry_points": False}
_plugin_modules: set[str] = set()


def _check_path(path: str, what: str) -> None:
    module, sep, attr = path.partition(":")
    if not (sep and module and attr):
        raise ValueError(f"{what} {path!r} must be an import path 'package.module:Class'")


def register_method(contract: MethodContract, *, strategy: str, handler: str) -> Method:
    """Register a method; registering the same method again is a no-op (modules get re-imported).

    Methods may share a task kind (FedAvg and FedCoLLM both run `lora_sft`), but one kind
    always maps to one handler: the device picks its handler by kind alone.
    """
    _check_path(strategy, "strategy")
    _check_path(handler, "handler")
    entry = Method(contract, strategy, handler)
    existing = _methods.get(contract.name)
    if existing is not None:
        if existing == entry:
            return existing
        raise ValueError(f"a different method named {contract.name!r} is already registered")
    for other in _methods.values():
        if other.contract.task_kind == contract.task_kind and other.handler != handler:
            raise ValueError(f"task kind {contract.task_kind!r} is already handled by {other.handler} "
                             f"(method {other.name!r}); give {contract.name!r} its own task kind")
    _methods[contract.name] = entry
    return entry


def _ensure_builtins() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def _load_plugins() -> None:
    """Import the modules that register further methods, each once per process."""
    for module in (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")):
        if module and module not in _plugin_modules:
            _plugin_modules.add(module)
            importlib.import_module(module)
    if not _loaded["entry_points"]:
        _loaded["entry_points"] = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()


def _lookup(match: Any) -> Method | None:
    _ensure_builtins()
    for attempt in range(2):
        found = next((m for m in _methods.values() if match(m)), None)
        if found is not None or attempt:
            return found
        _load_plugins()
    return None


def get_method(name: str) -> Method:
    """The method registered as `name` (RunSpec.algorithm); UnknownMethodError otherwise."""
    found = _lookup(lambda m: m.name == name)
    if found is None:
        raise UnknownMethodError(f"unknown algorithm {name!r}; choose one of {', '.join(method_names())}")
    return found


def method_for_kind(kind: str) -> Method:
    """A method whose devices run task kind `kind` (all such share one handler)."""
    found = _lookup(lambda m: m.contract.task_kind == kind)
    if found is None:
        raise UnknownMethodError(f"no method runs task kind {kind!r}")
    return found


def methods() -> list[Method]:
    """Every registered method, plugins included."""
    _ensure_builtins()
    _load_plugins()
    return list(_methods.values())


def method_names() -> list[str]:
    return sorted(m.name for m in methods())


def task_kinds() -> list[str]:
    """The task kinds this installation can run on a device."""
    return sorted({m.contract.task_kind for m in methods()})


def load_object(path: str) -> Any:
    """Import "package.module:attribute" and return the attribute."""
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
