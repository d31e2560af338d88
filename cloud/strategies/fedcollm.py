"""FedCoLLM (Fan et al., arXiv 2411.11707): FedAvg on the SLM adapter, then mutual
knowledge distillation between the server's LLM (with its own LoRA) and the aggregated
SLM on the auxiliary public data; the distilled SLM adapter goes back to the devices.
Auxiliary records without answers are answered by the aggregated SLM first (cloud/training/pseudo_labels.py).
"""

from __future__ import annotations

from typing import Any

from cloud.strategies.base import SpecError, StepResult
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.slm_lora import check_jsonl, check_llm, same_tokenizer
from common.methods import fedcollm
from common.protocol import RunSpec


class FedCoLLM(FedAvg):
    contract = fedcollm.CONTRACT

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        super().check_spec(spec)
        check_llm(spec, cls.name)
        check_jsonl(spec.aux_data, "aux_data", required=True)
        # Distillation compares the two models' next-token distributions position by
        # position, which only means something over one shared vocabulary.
        if not same_tokenizer(spec.llm, spec.slm):
            raise SpecError(
                "fedcollm needs the LLM and the SLM to share one tokenizer; their tokenizer.json "
                "files differ (use co-plms for models with different tokenizers)"
            )

    def initial_inputs(self) -> dict[str, str]:
        inputs = super().initial_inputs()
        inputs[fedcollm.LLM_ADAPTER] = self.fresh_adapter(self.spec.llm)
        return inputs

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        metrics = super().initial_metrics(inputs)
        metrics["llm"] = self.evaluate(self.spec.llm, inputs[fedcollm.LLM_ADAPTER])
        return metrics

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        from cloud.training.pseudo_labels import unlabelled

        seed = self.round_seed(round_number)
        slm, tok = self.holder.with_adapter(self.spec.slm, self.spec.lora, self.spec.seed, aggregate_digest)
        llm, _ = self.holder.with_adapter(self.spec.llm, self.spec.lora, self.spec.seed, inputs[fedcollm.LLM_ADAPTER])
        # Prompts without answers: distil along the aggregated SLM's own answers.
        records = self.aux_answered_by(slm, tok)
        report = self.mutual_distillation(llm, slm, tok, records, seed)
        report["pseudo_labelled"] = len(unlabelled(self.aux_records))
        slm_digest = self.holder.save_adapter(slm)
        llm_digest = self.holder.save_adapter(llm)
        outputs = {**inputs, fedcollm.SLM_ADAPTER: slm_digest, fedcollm.LLM_ADAPTER: llm_digest}
        metrics = {
            "distill": report,
            "slm": self.evaluate(self.spec.slm, slm_digest),
            "llm": self.evaluate(self.spec.llm, llm_digest),
        }
        return StepResult(outputs, metrics)
