"""`coplms`: a device's round following the Co-PLMs design (Liu et al., arXiv 2511.11678),
reconstructed from its abstract (ARCHITECTURE.md, "Methods"; the contract is common.methods.coplms).

The device keeps its own SLM, of any architecture, and gets a copy of the shared proxy
model (the DPM, under `dpm/`) each round. Domain-Specific Tuning (DST) trains both on the
private data; Structure-Agnostic Mutual Learning (SAML) then lets them teach each other at
the output level (CE + alpha * KL each way). Only the proxy's adapter is uploaded; the SLM's
adapter stays on the device. A device without its own SLM (no `--slm`) uses a private copy
of the proxy's base as its SLM.

When the run publishes an unlabelled prompt set (`coplms/saml_prompts.jsonl`, with
`params.saml_data = "private+prompts"`), SAML also runs on those prompts: the SLM answers each
greedily (up to SAML_ANSWER_TOKENS new tokens, after DST) and, on those records, both sides
learn only the KL term over the answer positions (no CE: the answer is no label). The SAML
report counts them as `prompts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.methods.coplms import (
    CONTRACT,
    PROXY_PREFIX,
    SAML_ANSWER_TOKENS,
    SAML_PROMPTS,
    CoPlmsDeviceParams,
    prompts_from_bytes,
)
from common.protocol import RoundInfo
from common.records import TaskRecord
from edge_sdk.handlers.base import FinalArtifacts, UpdatePayload, artifact
from edge_sdk.handlers.lora_sft import LoraSftHandler, private_payload
from edge_sdk.handlers.own_slm import OwnSlm


class CoPlmsHandler(LoraSftHandler):
    kind = CONTRACT.task_kind
    prefix = PROXY_PREFIX  # the proxy is loaded exactly as lora_sft loads its shared SLM

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.own = OwnSlm(ctx, CONTRACT.task_kind, fallback_prefix=PROXY_PREFIX)

    def device_model(self, info: RoundInfo) -> tuple[Any, Any]:
        """The device's own SLM with its latest private adapter (for local use and benchmarks)."""
        model, tokenizer = self.own.load(info.model_copy(update={"round": info.round + 1}))
        return model, tokenizer

    def _prompt_records(self, info: RoundInfo, slm: Any, slm_tok: Any) -> list[TaskRecord]:
        """The published unlabelled prompts with the SLM's greedy answers (empty answers dropped)."""
        from common.ml.evaluate import generate_greedy

        if not any(r.name == SAML_PROMPTS for r in info.artifacts):
            return []
        prompts = prompts_from_bytes(self.ctx.cache.fetch(artifact(info, SAML_PROMPTS)).read_bytes())
        answers = generate_greedy(slm, slm_tok, prompts, SAML_ANSWER_TOKENS)
        return [TaskRecord(p, a) for p, a in zip(prompts, answers, strict=True) if a]

    def run(self, info: RoundInfo) -> UpdatePayload:
        from common.ml.evaluate import evaluate
        from common.ml.lora import adapter_state
        from common.ml.mutual import mutual_learning
        from common.ml.train import train_lora
        from common.protocol import DistillSpec

        params = CoPlmsDeviceParams.model_validate(info.task.params)
        train, seed, records = info.task.train, info.task.seed, self.ctx.records
        self.ctx.say(f"round {info.round}/{info.rounds_total}: co-plms on {len(records)} local records")
        proxy, proxy_tok = self.load(info)
        start = {name: t.numpy().copy() for name, t in adapter_state(proxy).items()}
        slm, slm_tok = self.own.load(info)
        metrics: dict[str, Any] = {"slm_arch": getattr(slm.config, "model_type", "unknown")}
        if self.ctx.eval_records:
            metrics["local_eval_before"] = evaluate(slm, slm_tok, self.ctx.eval_records)
        dst_epochs = train.epochs if params.dst_epochs is None else params.dst_epochs
        if dst_epochs > 0:
            dst = train.model_copy(update={"epochs": dst_epochs})
            metrics["dst_slm"] = train_lora(slm, slm_tok, records, dst, seed=seed, progress=self.ctx.progress)
            metrics["dst_proxy"] = train_lora(proxy, proxy_tok, records, dst, seed=seed + 1,
                                              progress=self.ctx.progress)
        if params.saml_epochs > 0:
            saml = DistillSpec(epochs=params.saml_epochs, lr=train.lr, batch_size=train.batch_size,
                               lambda_kd=params.alpha, temperature=params.temperature, top_k=params.top_k,
                               max_steps=train.max_steps, labelled_logits=train.labelled_logits)
            prompted = self._prompt_records(info, slm, slm_tok)
            data, kl_only = list(records) + prompted, None
            if prompted:
                kl_only = [False] * len(records) + [True] * len(prompted)
                self.ctx.say(f"SAML adds {len(prompted)} unlabelled prompts (KL only)")
            report = mutual_learning(slm, slm_tok, proxy, proxy_tok, data, saml, seed=seed + 2,
                                     max_len=train.max_len, progress=self.ctx.progress, token_map=params.token_map,
                                     kl_only=kl_only)
            if "kl_only" in report:
                report["prompts"] = report.pop("kl_only")
            metrics["saml"] = {k.replace("first_", "slm_").replace("second_", "proxy_"): v for k, v in report.items()}
        self.own.save(info)
        if self.ctx.eval_records:
            metrics["local_eval_after"] = evaluate(slm, slm_tok, self.ctx.eval_records)
        arrays = {name: t.numpy() for name, t in adapter_state(proxy).items()}
        if info.task.privacy is not None:  # only the proxy leaves the device, noised; the metrics stay here
            return private_payload(self.ctx, info, start, arrays)
        return UpdatePayload(arrays=arrays, num_samples=len(records), metrics=metrics)

    def finish(self, info: RoundInfo, out_dir: Path) -> FinalArtifacts:
        """out_dir/slm: the device's own SLM and private adapter (the final device model);
        out_dir/dpm: the run's final proxy model and adapter."""
        proxy = super().finish(info, out_dir)
        own = self.own.finish(info, out_dir)
        info_path = out_dir / "adapter_info.json"
        described = json.loads(info_path.read_text())
        described["proxy"] = {"model_dir": str(proxy.model_dir), "adapter_sha256": proxy.adapter_sha256}
        info_path.write_text(json.dumps(described, indent=2))
        return own
