"""FedAvgM: FedAvg with server momentum (Hsu et al., arXiv 1909.06335), as a method added
from outside cotune in one module (README, "Adding a method"; ARCHITECTURE.md, "Methods").

Devices run FedAvg's `lora_sft` task unchanged, so they need nothing new. The server treats
the change from the published adapter to the devices' mean as a pseudo-gradient and keeps a
velocity of it: v <- momentum * v + (mean - adapter); adapter <- adapter + server_lr * v.
The velocity is a server-only artifact, so a restarted coordinator resumes it exactly.

Run it with `COTUNE_METHODS=examples.methods.fedavgm` (from the repository root) and
`algorithm = "fedavgm"` in the run.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from cloud.strategies.base import StepResult
from cloud.strategies.fedavg import FedAvg
from common.methods import fedavg, register_method

VELOCITY = "fedavgm/velocity.safetensors"

# FedAvg's contract with another name and one more server-only prefix for the velocity.
CONTRACT = replace(fedavg.CONTRACT, name="fedavgm", published_prefixes=(*fedavg.CONTRACT.published_prefixes, "fedavgm"))


class FedAvgMParams(BaseModel):
    """`RunSpec.params` of a fedavgm run (all server-side)."""

    model_config = ConfigDict(extra="forbid")

    momentum: float = Field(0.9, ge=0, lt=1, description="how much of last round's velocity carries over")
    server_lr: float = Field(1.0, gt=0, description="step along the velocity (1 with momentum 0 is FedAvg)")


class FedAvgM(FedAvg):
    contract = CONTRACT
    params_model = FedAvgMParams
    params: FedAvgMParams

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        import numpy as np

        from common.tensorfile import load_arrays, save_arrays

        current = load_arrays(self.store.path(inputs[fedavg.SLM_ADAPTER]))
        mean = load_arrays(self.store.path(aggregate_digest))
        previous = load_arrays(self.store.path(inputs[VELOCITY])) if VELOCITY in inputs else {}
        velocity, adapter = {}, {}
        for name, weights in current.items():
            change = mean[name].astype(np.float64) - weights
            velocity[name] = self.params.momentum * previous.get(name, 0.0) + change
            adapter[name] = (weights + self.params.server_lr * velocity[name]).astype(np.float32)
        digest = self.store.put_bytes(save_arrays(adapter))
        outputs = {**inputs, fedavg.SLM_ADAPTER: digest, VELOCITY: self.store.put_bytes(save_arrays(velocity))}
        return StepResult(outputs, {"slm": self.evaluate(self.spec.slm, digest)})


register_method(CONTRACT, strategy="examples.methods.fedavgm:FedAvgM", handler=fedavg.LORA_SFT_HANDLER)
