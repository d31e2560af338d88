"""Co-PLMs, following the Co-PLMs design (Liu et al., arXiv 2511.11678) as reconstructed
from its abstract (ARCHITECTURE.md, "Methods"): structure-agnostic co-tuning through a shared proxy.

- The run's `slm` checkpoint is the distilled proxy model (DPM) every device shares. At run
  creation its LoRA adapter is distilled from the LLM on the auxiliary data.
- Each device keeps its own SLM of any architecture and size (`cotune edge join --slm`)
  and, per round, tunes it and its copy of the proxy on private data (DST), then runs
  output-level mutual learning between the two (SAML); see edge_sdk/handlers/coplms.py.
- Devices upload only the proxy's adapter. The server averages it, runs FedCoLLM's mutual
  distillation between the LLM (+ its own LoRA) and the averaged proxy on the auxiliary
  data, and broadcasts the proxy's adapter (`dpm/`).
- A device's own SLM never leaves it: edge builds of it are made on the device.

SAML data (`params.saml_data`): "private" (the default) runs mutual learning on the device's
private records only. "private+prompts" adds an unlabelled in-domain prompt set,
`params.saml_prompts` (a task JSONL whose responses are ignored), published once as
`coplms/saml_prompts.jsonl`. On an unlabelled prompt there is no response to learn from, so
the device lets its SLM answer it greedily (up to 16 new tokens, after DST) and both models
learn only the KL term on those answer positions, no CE: each matches the other's
distribution where the SLM would speak, and neither is taught the SLM's answer as a label.
This is a reconstruction: the paper's SAML exchanges knowledge on the device's data; the
prompt set widens where the two models must agree, at the cost of one greedy pass.

Tokenizers: server-side distillation is token-level, so the LLM and the proxy must share a
tokenizer. A device SLM with another tokenizer is taken when `params.vocab_alignment` is on
(the default): its device maps distributions across vocabularies (common.ml.vocab_align);
with it off, such a device is refused.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from cloud.models import publish_checkpoint
from cloud.strategies.base import SpecError, StepResult
from cloud.strategies.device_slm import SlmJoinPolicy, check_device_slm
from cloud.strategies.slm_lora import SlmLoraStrategy, check_jsonl, check_llm, same_tokenizer
from common.checkpoint import read_config, tokenizer_digest
from common.methods import coplms
from common.methods.coplms import (
    DPM_ADAPTER,
    INIT_REPORT,
    LLM_ADAPTER,
    PROXY_PREFIX,
    SAML_PROMPTS,
    CoPlmsDeviceParams,
    prompts_to_bytes,
)
from common.protocol import ClientRegistration, RunSpec


class CoPlmsParams(CoPlmsDeviceParams, SlmJoinPolicy):
    """`RunSpec.params` of a co-plms run (the device part is passed on in each round's task)."""

    model_config = ConfigDict(extra="forbid")

    vocab_alignment: bool = Field(
        True, description="take device SLMs whose tokenizer differs from the proxy's (mapped on the device)")
    init_distill_epochs: float = Field(
        1.0, ge=0, description="epochs distilling the LLM into the proxy's adapter at run creation (0: none)")
    saml_data: Literal["private", "private+prompts"] = Field(
        "private", description="SAML on the private records, or on them plus the unlabelled saml_prompts")
    saml_prompts: str | None = Field(
        None, description="with saml_data = private+prompts: JSONL of in-domain prompts (responses ignored)")


class CoPlms(SlmLoraStrategy):
    contract = coplms.CONTRACT
    params_model = CoPlmsParams
    params: CoPlmsParams

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        super().check_spec(spec)
        params = CoPlmsParams.model_validate(spec.params)
        if params.saml_epochs == 0 and params.dst_epochs == 0:
            raise SpecError("co-plms: params.dst_epochs and params.saml_epochs are both 0; devices would not train")
        check_llm(spec, cls.name)
        check_jsonl(spec.aux_data, "aux_data", required=True)
        if params.saml_data == "private+prompts":
            if params.saml_prompts is None:
                raise SpecError("co-plms: params.saml_data = 'private+prompts' needs params.saml_prompts, the path "
                                "of a JSONL of in-domain prompts (their responses are ignored)")
            if params.saml_epochs == 0:
                raise SpecError("co-plms: params.saml_data = 'private+prompts' needs params.saml_epochs > 0; "
                                "the prompts are only used by SAML")
            check_jsonl(params.saml_prompts, "params.saml_prompts", required=True)
        elif params.saml_prompts is not None:
            raise SpecError("co-plms: params.saml_prompts is only used with params.saml_data = 'private+prompts'; "
                            "set that too, or remove params.saml_prompts")
        if not same_tokenizer(spec.llm, spec.slm):
            raise SpecError(
                "co-plms distils between the LLM and the proxy model (`slm`) token by token on the server, "
                "so those two must share one tokenizer; their tokenizer.json files differ"
            )

    @cached_property
    def proxy_tokenizer(self) -> str:
        return tokenizer_digest(Path(self.spec.slm))

    def check_join(self, registration: ClientRegistration) -> None:
        super().check_join(registration)
        slm = check_device_slm(registration, self.params, self.name)
        if slm is None:
            return
        if slm.tokenizer_sha256 != self.proxy_tokenizer:
            if not self.params.vocab_alignment:
                raise SpecError(
                    "co-plms exchanges token-level output distributions between a device's SLM and the proxy "
                    f"model, and this run (params.vocab_alignment = false) requires the proxy's tokenizer "
                    f"(tokenizer.json sha256 {self.proxy_tokenizer}); this SLM's tokenizer is "
                    f"{slm.tokenizer_sha256}. Use an SLM trained with the run's tokenizer."
                )
            return
        proxy_vocab = int(read_config(self.spec.slm).get("vocab_size", 0))
        if slm.vocab_size != proxy_vocab:
            raise SpecError(
                f"the device's SLM uses the run's tokenizer but its output layer has {slm.vocab_size} ids "
                f"where the proxy's has {proxy_vocab}; resize its embeddings to the tokenizer's vocabulary"
            )

    # -- server side ---------------------------------------------------------------------

    def initial_inputs(self) -> dict[str, str]:
        from common.ml.mutual import distill_into

        inputs = publish_checkpoint(self.store, Path(self.spec.slm), PROXY_PREFIX)
        inputs[LLM_ADAPTER] = self.fresh_adapter(self.spec.llm)
        proxy_start = self.fresh_adapter(self.spec.slm)
        report: dict[str, Any] = {"epochs": self.params.init_distill_epochs}
        if self.params.init_distill_epochs > 0:
            # The DPM starts as the LLM's student on the public data (the "distilled" in its name).
            proxy, tok = self.holder.with_adapter(self.spec.slm, self.spec.lora, self.spec.seed, proxy_start)
            llm, llm_tok = self.holder.with_adapter(self.spec.llm, self.spec.lora, self.spec.seed, inputs[LLM_ADAPTER])
            spec = self.spec.distill.model_copy(update={"epochs": self.params.init_distill_epochs})
            records = self.aux_answered_by(llm, llm_tok)  # the teacher answers prompts that carry none
            if records:
                report.update(distill_into(proxy, tok, llm, llm_tok, records, spec, seed=self.spec.seed))
            inputs[DPM_ADAPTER] = self.holder.save_adapter(proxy)
        else:
            inputs[DPM_ADAPTER] = proxy_start
        inputs[INIT_REPORT] = self.store.put_bytes(json.dumps(report, sort_keys=True).encode())
        if self.params.saml_data == "private+prompts":
            from common.records import read_jsonl

            records = read_jsonl(Path(self.params.saml_prompts or ""))
            inputs[SAML_PROMPTS] = self.store.put_bytes(prompts_to_bytes([(r.prompt, r.domain) for r in records]))
        return inputs

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "dpm": self.evaluate(self.spec.slm, inputs[DPM_ADAPTER]),
            "llm": self.evaluate(self.spec.llm, inputs[LLM_ADAPTER]),
        }
        if INIT_REPORT in inputs:
            metrics["init_distill"] = json.loads(self.store.read_bytes(inputs[INIT_REPORT]))
        return metrics

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:

        proxy, tok = self.holder.with_adapter(self.spec.slm, self.spec.lora, self.spec.seed, aggregate_digest)
        llm, _ = self.holder.with_adapter(self.spec.llm, self.spec.lora, self.spec.seed, inputs[LLM_ADAPTER])
        # Prompts without answers: distil along the averaged proxy's own answers (the devices' side).
        report = self.mutual_distillation(llm, proxy, tok, self.aux_answered_by(proxy, tok),
                                          self.round_seed(round_number))
        proxy_digest = self.holder.save_adapter(proxy)
        llm_digest = self.holder.save_adapter(llm)
        outputs = {**inputs, DPM_ADAPTER: proxy_digest, LLM_ADAPTER: llm_digest}
        metrics = {
            "distill": {k.replace("slm_", "dpm_"): v for k, v in report.items()},
            "dpm": self.evaluate(self.spec.slm, proxy_digest),
            "llm": self.evaluate(self.spec.llm, llm_digest),
        }
        return StepResult(outputs, metrics)
