"""FedCoLLM's contract (Fan et al., arXiv 2411.11707): FedAvg's rounds on the shared SLM's
adapter, plus an LLM adapter the server distils with it and never publishes to devices
(ARCHITECTURE.md, "Methods"). Distillation is set by `RunSpec.distill`; `params` takes no keys."""

from __future__ import annotations

from common.methods.contract import LLM_PREFIX, SLM_PREFIX, MethodContract, adapter_artifact
from common.methods.fedavg import LORA_SFT, LORA_SFT_HANDLER, SLM_ADAPTER
from common.methods.registry import register_method
from common.methods.reports import LoraSftMetrics

LLM_ADAPTER = adapter_artifact(LLM_PREFIX)

CONTRACT = MethodContract(
    name="fedcollm",
    task_kind=LORA_SFT,
    update_artifact=SLM_ADAPTER,
    published_prefixes=(SLM_PREFIX, LLM_PREFIX),
    client_prefixes=(SLM_PREFIX,),
    device_metrics=LoraSftMetrics,
    builds_on="server",
    llm_adapter=LLM_ADAPTER,
    export_adapter=SLM_ADAPTER,
)

register_method(CONTRACT, strategy="cloud.strategies.fedcollm:FedCoLLM", handler=LORA_SFT_HANDLER)
