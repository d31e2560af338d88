"""FedAvg: the SLM adapter is the sample-weighted mean of the devices' adapters."""

from __future__ import annotations

from cloud.strategies.base import StepResult
from cloud.strategies.slm_lora import SLM_ADAPTER, SlmLoraStrategy


class FedAvg(SlmLoraStrategy):
    name = "fedavg"

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        outputs = {**inputs, SLM_ADAPTER: aggregate_digest}
        return StepResult(outputs, {"slm": self.evaluate(self.spec.slm, aggregate_digest)})
