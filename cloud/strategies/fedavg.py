"""FedAvg: the SLM adapter is the sample-weighted mean of the devices' adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud.models import publish_checkpoint
from cloud.strategies.base import StepResult
from cloud.strategies.slm_lora import SlmLoraStrategy
from common.methods import fedavg
from common.methods.contract import SLM_PREFIX


class FedAvg(SlmLoraStrategy):
    contract = fedavg.CONTRACT

    def initial_inputs(self) -> dict[str, str]:
        inputs = publish_checkpoint(self.store, Path(self.spec.slm), SLM_PREFIX)
        inputs[fedavg.SLM_ADAPTER] = self.fresh_adapter(self.spec.slm)
        return inputs

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        return {"slm": self.evaluate(self.spec.slm, inputs[fedavg.SLM_ADAPTER])}

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        outputs = {**inputs, fedavg.SLM_ADAPTER: aggregate_digest}
        return StepResult(outputs, {"slm": self.evaluate(self.spec.slm, aggregate_digest)})
