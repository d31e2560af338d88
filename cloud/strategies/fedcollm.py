"""FedCoLLM (Fan et al., arXiv 2411.11707): FedAvg on the SLM adapter, then mutual
knowledge distillation between the server's LLM (with its own LoRA) and the aggregated
SLM on the auxiliary public data; the distilled SLM adapter goes back to the devices.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from cloud.models import checkpoint_files, tokenizer_digest
from cloud.strategies.base import SpecError, StepResult
from cloud.strategies.slm_lora import SLM_ADAPTER, SlmLoraStrategy, _check_jsonl
from common.protocol import RunSpec

LLM_ADAPTER = "llm/adapter.safetensors"


class FedCoLLM(SlmLoraStrategy):
    name = "fedcollm"

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        super().check_spec(spec)
        if spec.llm is None:
            raise SpecError("fedcollm needs an LLM: set `llm` to its checkpoint directory")
        try:
            checkpoint_files(Path(spec.llm))
        except (OSError, ValueError) as exc:
            raise SpecError(f"llm: {exc}") from None
        _check_jsonl(spec.aux_data, "aux_data", required=True)
        # Distillation compares the two models' next-token distributions position by
        # position, which only means something over one shared vocabulary.
        if tokenizer_digest(Path(spec.llm)) != tokenizer_digest(Path(spec.slm)):
            raise SpecError(
                "fedcollm needs the LLM and the SLM to share one tokenizer; their tokenizer.json "
                "files differ (use co-plms for models with different tokenizers)"
            )

    def initial_inputs(self) -> dict[str, str]:
        inputs = super().initial_inputs()
        inputs[LLM_ADAPTER] = self.fresh_adapter(self.spec.llm)
        return inputs

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        metrics = super().initial_metrics(inputs)
        metrics["llm"] = self.evaluate(self.spec.llm, inputs[LLM_ADAPTER])
        return metrics

    @cached_property
    def aux_records(self) -> list:
        from common.records import read_jsonl

        return read_jsonl(Path(self.spec.aux_data))

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        from cloud.training.distill import mutual_distillation

        seed = self.round_seed(round_number)
        slm, tok = self.holder.with_adapter(self.spec.slm, self.spec.lora, self.spec.seed, aggregate_digest)
        llm, _ = self.holder.with_adapter(self.spec.llm, self.spec.lora, self.spec.seed, inputs[LLM_ADAPTER])
        report = mutual_distillation(llm, slm, tok, self.aux_records, self.spec.distill, seed=seed)
        slm_digest = self.holder.save_adapter(slm)
        llm_digest = self.holder.save_adapter(llm)
        outputs = {**inputs, SLM_ADAPTER: slm_digest, LLM_ADAPTER: llm_digest}
        metrics = {
            "distill": report,
            "slm": self.evaluate(self.spec.slm, slm_digest),
            "llm": self.evaluate(self.spec.llm, llm_digest),
        }
        return StepResult(outputs, metrics)
