"""FedAvg's contract: devices train the shared SLM's LoRA adapter on local data (task
`lora_sft`) and upload it; the sample-weighted mean is the next round's adapter. The server
exports the final SLM to edge builds (ARCHITECTURE.md, "Methods")."""

from __future__ import annotations

from common.methods.contract import SLM_PREFIX, MethodContract, adapter_artifact
from common.methods.registry import register_method
from common.methods.reports import LoraSftMetrics

SLM_ADAPTER = adapter_artifact(SLM_PREFIX)
LORA_SFT = "lora_sft"
LORA_SFT_HANDLER = "edge_sdk.handlers.lora_sft:LoraSftHandler"

CONTRACT = MethodContract(
    name="fedavg",
    task_kind=LORA_SFT,
    update_artifact=SLM_ADAPTER,
    published_prefixes=(SLM_PREFIX,),
    client_prefixes=(SLM_PREFIX,),
    device_metrics=LoraSftMetrics,
    builds_on="server",
    export_adapter=SLM_ADAPTER,
)

register_method(CONTRACT, strategy="cloud.strategies.fedavg:FedAvg", handler=LORA_SFT_HANDLER)
