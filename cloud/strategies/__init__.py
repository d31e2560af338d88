"""Server-side co-tuning strategies behind one small interface (see base.py)."""

from __future__ import annotations

from cloud.strategies.base import SpecError, StepResult, Strategy, UpdateFile, weighted_mean
from cloud.strategies.coplms import CoPlms
from cloud.strategies.crosslm import CrossLm
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fedcollm import FedCoLLM

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedCoLLM, CoPlms, CrossLm)}


def strategy_class(algorithm: str) -> type[Strategy]:
    try:
        return STRATEGIES[algorithm]
    except KeyError:
        raise SpecError(
            f"unknown algorithm {algorithm!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None


__all__ = ["STRATEGIES", "SpecError", "StepResult", "Strategy", "UpdateFile", "strategy_class", "weighted_mean"]
