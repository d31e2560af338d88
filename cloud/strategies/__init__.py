"""Server-side co-tuning strategies behind one small interface (see base.py). Which class
runs a method is the method registry's to say (common.methods; ARCHITECTURE.md, "Methods")."""

from __future__ import annotations

from cloud.strategies.base import ServedModel, SpecError, StepResult, Strategy, UpdateFile, weighted_mean
from common.methods import UnknownMethodError, get_method


def strategy_class(algorithm: str) -> type[Strategy]:
    """The strategy registered for `algorithm` (RunSpec.algorithm); SpecError when none is."""
    try:
        method = get_method(algorithm)
    except UnknownMethodError as exc:
        raise SpecError(str(exc)) from None
    cls = method.strategy_class()
    if getattr(cls, "contract", None) is not method.contract:
        raise TypeError(f"{method.strategy} does not implement method {algorithm!r}: its `contract` is another")
    return cls


__all__ = ["ServedModel", "SpecError", "StepResult", "Strategy", "UpdateFile", "strategy_class", "weighted_mean"]
