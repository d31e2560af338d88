"""Methods for tests only, loaded by coordinators started with COTUNE_METHODS=tests.hostile_methods
(ARCHITECTURE.md, "Methods"): steps that take as long as a test needs.

- `test-slowavg`: FedAvg whose server step sleeps `sleep_s` and notes each call in `calls`.
- `test-gatedcollm`: FedCoLLM whose starting scores (computed under the model lock) first touch
  `entered`, then wait until the file `gate` exists, then raise `fail` if it is set.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cloud.strategies.base import StepResult
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fedcollm import FedCoLLM
from common.methods import fedavg, fedcollm, register_method

SLOW = replace(fedavg.CONTRACT, name="test-slowavg")
GATED = replace(fedcollm.CONTRACT, name="test-gatedcollm")


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sleep_s: float = 0.0
    calls: str | None = None


class GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate: str
    entered: str
    fail: str | None = None


class SlowFedAvg(FedAvg):
    contract = SLOW
    params_model = SlowParams
    params: SlowParams

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        if self.params.calls:
            with open(self.params.calls, "a") as fh:
                fh.write(f"{os.getpid()} round {round_number}\n")
        time.sleep(self.params.sleep_s)
        return super().server_step(round_number, inputs, aggregate_digest)


class GatedFedCoLLM(FedCoLLM):
    contract = GATED
    params_model = GateParams
    params: GateParams

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        Path(self.params.entered).touch()
        deadline = time.monotonic() + 600
        while not Path(self.params.gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.params.fail:
            raise RuntimeError(self.params.fail)
        return super().initial_metrics(inputs)


register_method(SLOW, strategy="tests.hostile_methods:SlowFedAvg", handler=fedavg.LORA_SFT_HANDLER)
register_method(GATED, strategy="tests.hostile_methods:GatedFedCoLLM", handler=fedavg.LORA_SFT_HANDLER)
