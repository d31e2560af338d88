"""CrossLM, following the CrossLM design (Deng et al., arXiv 2312.05842) as reconstructed from
its abstract (ARCHITECTURE.md, "Methods"): the LLM writes task data, the devices' SLMs judge it.

Per round:
- the server's LLM answers prompts drawn per domain from `params.prompt_data` (default: the
  auxiliary data's prompts; their responses are never used), a greedy answer and sampled
  ones per prompt, and publishes them as `crosslm/synthetic.jsonl`;
- each device trains its own SLM on its private data plus last round's selected samples,
  scores every synthetic sample with it and uploads only the scores (see
  common/methods/crosslm.py for the two score tensors);
- the server averages the scores, tunes the LLM's LoRA with a score-weighted likelihood on
  all samples, then SFT on the selected ones (per prompt the best-scored answer, if its score
  reaches `params.threshold`), and publishes the selection as `crosslm/selected.jsonl` for the
  devices' next round.

With `params.synthesis = "samples"` the LLM writes whole samples instead of answers: the
records of `params.prompt_data` are instructions (a prompt prefix per domain, e.g.
"Translate to Velish:"; their responses unused), and per round the LLM continues each drawn
instruction `samples_per_prompt` times (sampled, seeded by the round seed). A continuation
must hold a generated input, the "\n" that ends a prompt, and an answer: x = instruction +
input, y = the answer (cloud/training/synthesis.py). Malformed continuations are dropped and
identical (x, y) kept once; the round reports `generated`, `well_formed`, `unique` and
`selected`. A sample's group is its own x, so "best per prompt" picks among answers to one
generated input (grouping by instruction would keep one sample per instruction and round);
the threshold is the main filter. Scoring, selection and training are as for answers: the
LLM learns from the selection with the loss on y only. The LLM must already be able to write
task inputs (a language model trained on whole texts can; one tuned only with the loss on
responses continues an instruction with an answer and no separator: `well_formed` stays 0).
This is a reconstruction too: the paper has the LLM generate task inputs conditioned on a
label for classification-style tasks, judged by the SLMs for task/domain fit; here the
condition is a free-text instruction of a generative task and the judgement is the SLMs'
p(y | x), weighted by their share of the sample's domain.

Only text and scores cross the network, so device SLMs may differ in architecture and
tokenizer; a device that brings no SLM uses the run's `slm` checkpoint (published as `slm/`).
A device's SLM never leaves it: edge builds of it are made on the device.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from cloud.models import publish_checkpoint
from cloud.strategies.base import SpecError, StepResult
from cloud.strategies.device_slm import SlmJoinPolicy, check_device_slm
from cloud.strategies.slm_lora import SlmLoraStrategy, check_jsonl, check_llm
from common.methods import crosslm
from common.methods.contract import SLM_PREFIX
from common.methods.crosslm import (
    LLM_ADAPTER,
    SCORE_TENSOR,
    SELECTED,
    SYNTHESIS_REPORT,
    SYNTHETIC,
    WEIGHT_TENSOR,
    CrossLmDeviceParams,
    Sample,
    samples_from_bytes,
    samples_to_bytes,
)
from common.protocol import ClientRegistration, RunSpec, TrainSpec
from common.records import TaskRecord
from common.tensorfile import Schema


class CrossLmParams(CrossLmDeviceParams, SlmJoinPolicy):
    """`RunSpec.params` of a crosslm run (the device part is passed on in each round's task)."""

    model_config = ConfigDict(extra="forbid")

    synthesis: Literal["answers", "samples"] = Field(
        "answers", description="answers: the LLM answers pool prompts; samples: it writes inputs and answers "
        "from the instructions in prompt_data")
    prompt_data: str | None = Field(
        None, description="JSONL whose prompts the LLM answers (responses unused); default: aux_data. "
        "With synthesis = samples (then required): its prompts are instructions, one prefix per domain")
    prompts_per_domain: int = Field(16, ge=1, description="prompts (instructions) drawn per domain each round")
    samples_per_prompt: int = Field(
        4, ge=0, description="sampled answers per prompt, besides the greedy one (samples: continuations "
        "per instruction, at least 1)")
    include_greedy: bool = Field(True, description="answers: add each prompt's greedy answer (samples: unused)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(24, ge=1, le=512)
    threshold: float = Field(0.5, ge=0, le=1, description="selection: aggregated score (0..1) at least this")
    best_per_prompt: bool = Field(True, description="select at most one answer per prompt, the best-scored")
    weight_power: float = Field(1.0, ge=0, description="score-weighted likelihood: weight = score ** power")
    llm_weighted_epochs: float = Field(1.0, ge=0, description="epochs of score-weighted likelihood on all samples")
    llm_sft_epochs: float = Field(1.0, ge=0, description="epochs of SFT on the selected samples")
    llm_lr: float | None = Field(None, gt=0, description="the LLM's learning rate; default distill.lr")


def selection(groups: list[int], scores: list[float], threshold: float, best_per_prompt: bool) -> list[int]:
    """Indices of the selected samples (NaN scores, i.e. unscored samples, never qualify)."""
    ok = [i for i, s in enumerate(scores) if not math.isnan(s) and s >= threshold]
    if not best_per_prompt:
        return ok
    best: dict[int, int] = {}
    for i in ok:
        if groups[i] not in best or scores[i] > scores[best[groups[i]]]:
            best[groups[i]] = i
    return sorted(best.values())


def likelihood_weights(scores: list[float], power: float) -> list[float]:
    """score ** power, scaled to a mean of 1 over all samples (unscored samples weigh 0)."""
    raw = [0.0 if math.isnan(s) else max(s, 0.0) ** power for s in scores]
    mean = sum(raw) / len(raw) if raw else 0.0
    return [r / mean for r in raw] if mean > 0 else raw


class CrossLm(SlmLoraStrategy):
    contract = crosslm.CONTRACT
    params_model = CrossLmParams
    params: CrossLmParams

    def __init__(self, spec: RunSpec, store: Any, holder: Any = None) -> None:
        super().__init__(spec, store, holder)
        self._parsed: dict[str, list] = {}

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        super().check_spec(spec)
        params = CrossLmParams.model_validate(spec.params)
        if spec.privacy is not None:
            raise SpecError("crosslm devices upload per-sample scores, not weights; the local DP of `privacy` "
                            "(clip and noise a weight update) does not apply to them: remove `privacy`")
        check_llm(spec, cls.name, " to write synthetic data")
        if params.synthesis == "samples":
            if params.prompt_data is None:
                raise SpecError("params.synthesis = 'samples' needs params.prompt_data: a JSONL whose prompts are "
                                "the instructions the LLM writes samples from (e.g. 'Translate to Velish:')")
            if params.samples_per_prompt < 1:
                raise SpecError("params.synthesis = 'samples' needs params.samples_per_prompt >= 1: the "
                                "continuations sampled per instruction")
        if params.prompt_data is None:
            check_jsonl(spec.aux_data, "aux_data (the prompts the LLM answers, unless params.prompt_data)", True)
        else:
            check_jsonl(params.prompt_data, "params.prompt_data", True)

    def check_join(self, registration: ClientRegistration) -> None:
        super().check_join(registration)
        check_device_slm(registration, self.params, self.name)

    # -- synthetic data ------------------------------------------------------------------

    @cached_property
    def prompt_pool(self) -> dict[str, list]:
        from common.records import read_jsonl

        pool: dict[str, list] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for record in read_jsonl(Path(self.params.prompt_data or self.spec.aux_data)):
            key = (record.domain or "", record.prompt)
            if self.params.synthesis == "samples" and key in seen:
                continue  # an instruction listed twice would only be drawn twice
            seen.add(key)
            pool[record.domain or ""].append(record)
        return dict(sorted(pool.items()))

    def _samples(self, digest: str) -> list:
        # update_schema runs on every upload: parse each set once.
        if digest not in self._parsed:
            self._parsed = {digest: samples_from_bytes(self.store.read_bytes(digest))}
        return self._parsed[digest]

    def _generate(self, llm: Any, tokenizer: Any, round_number: int) -> tuple[str, dict[str, Any]]:
        """Write the synthetic set devices score in `round_number`; return its digest and stats."""
        from cloud.training.sampling import sample_answers

        rng = random.Random(f"crosslm:{self.spec.seed}:{round_number}")
        prompts = []
        for records in self.prompt_pool.values():
            prompts.extend(rng.sample(records, min(self.params.prompts_per_domain, len(records))))
        p = self.params
        if p.synthesis == "samples":
            return self._generate_samples(llm, tokenizer, prompts, round_number)
        answers = sample_answers(llm, tokenizer, [r.prompt for r in prompts], p.samples_per_prompt,
                                 seed=self.round_seed(round_number), temperature=p.temperature, top_p=p.top_p,
                                 max_new_tokens=p.max_new_tokens, include_greedy=p.include_greedy)
        samples = [Sample(TaskRecord(r.prompt, text, r.domain), group=g)
                   for g, (r, texts) in enumerate(zip(prompts, answers, strict=True)) for text in texts]
        digest = self.store.put_bytes(samples_to_bytes(samples))
        return digest, {"prompts": len(prompts), "samples": len(samples)}

    def _generate_samples(
        self, llm: Any, tokenizer: Any, instructions: list, round_number: int
    ) -> tuple[str, dict[str, Any]]:
        from cloud.training.synthesis import build_samples, sample_continuations

        p = self.params
        texts = sample_continuations(llm, tokenizer, [r.prompt for r in instructions], p.samples_per_prompt,
                                     seed=self.round_seed(round_number), temperature=p.temperature, top_p=p.top_p,
                                     max_new_tokens=p.max_new_tokens)
        samples, stats = build_samples(instructions, texts)
        return self.store.put_bytes(samples_to_bytes(samples)), {**stats, "samples": len(samples)}

    def _publish_set(self, outputs: dict[str, str], llm: Any, tokenizer: Any, round_number: int) -> dict[str, Any]:
        """Put the set for `round_number` into `outputs`; with samples, its counts too (server-only),
        so that the round scoring it reports them."""
        outputs[SYNTHETIC], stats = self._generate(llm, tokenizer, round_number)
        if self.params.synthesis == "samples":
            outputs[SYNTHESIS_REPORT] = self.store.put_bytes(json.dumps(stats, sort_keys=True).encode())
        return stats

    def update_schema(self, inputs: dict[str, str]) -> Schema:
        # One float32 per sample of the set the round published, in every tensor of the upload.
        n = len(self._samples(inputs[SYNTHETIC]))
        return {name: ((n,), "F32") for name in self.contract.update_tensors}

    # -- rounds --------------------------------------------------------------------------

    def initial_inputs(self) -> dict[str, str]:
        # Devices that bring no SLM of their own train a private copy of the run's.
        inputs = publish_checkpoint(self.store, Path(self.spec.slm), SLM_PREFIX)
        inputs[LLM_ADAPTER] = self.fresh_adapter(self.spec.llm)
        llm, tok = self.holder.with_adapter(self.spec.llm, self.spec.lora, self.spec.seed, inputs[LLM_ADAPTER])
        self._publish_set(inputs, llm, tok, 1)
        return inputs

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        return {"llm": self.evaluate(self.spec.llm, inputs[LLM_ADAPTER])}

    def server_step(self, round_number: int, inputs: dict[str, str], aggregate_digest: str) -> StepResult:
        import numpy as np

        from cloud.training.weighted import train_lora_weighted
        from common.ml.train import train_lora
        from common.tensorfile import load_arrays

        p = self.params
        samples = self._samples(inputs[SYNTHETIC])
        agg = load_arrays(self.store.path(aggregate_digest))
        weighted, weight = np.asarray(agg[SCORE_TENSOR], np.float64), np.asarray(agg[WEIGHT_TENSOR], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = [float(s) for s in np.where(weight > 0, weighted / weight, np.nan)]
        records = [s.record for s in samples]
        chosen = selection([s.group for s in samples], scores, p.threshold, p.best_per_prompt)
        llm, tok = self.holder.with_adapter(self.spec.llm, self.spec.lora, self.spec.seed, inputs[LLM_ADAPTER])
        seed = self.round_seed(round_number)
        train = TrainSpec(epochs=1.0, lr=p.llm_lr or self.spec.distill.lr, batch_size=self.spec.distill.batch_size,
                          max_len=self.spec.train.max_len)
        scored = [s for s in scores if not math.isnan(s)]
        stats: dict[str, Any] = {
            "samples": len(samples), "scored": len(scored), "selected": len(chosen), "threshold": p.threshold,
            "score_mean": sum(scored) / len(scored) if scored else None,
        }
        if SYNTHESIS_REPORT in inputs:  # how this round's set was written: generated, well_formed, unique
            report = json.loads(self.store.read_bytes(inputs[SYNTHESIS_REPORT]))
            stats.update({k: report[k] for k in ("instructions", "generated", "well_formed", "unique")})
        weights = likelihood_weights(scores, p.weight_power)
        if p.llm_weighted_epochs > 0 and any(w > 0 for w in weights):
            stats["llm_weighted"] = train_lora_weighted(
                llm, tok, records, weights, train.model_copy(update={"epochs": p.llm_weighted_epochs}), seed=seed)
        if p.llm_sft_epochs > 0 and chosen:
            stats["llm_sft"] = train_lora(llm, tok, [records[i] for i in chosen],
                                          train.model_copy(update={"epochs": p.llm_sft_epochs}), seed=seed + 1)
        outputs = {k: v for k, v in inputs.items() if k not in (SELECTED, SYNTHESIS_REPORT)}
        outputs[LLM_ADAPTER] = self.holder.save_adapter(llm)
        if chosen:
            outputs[SELECTED] = self.store.put_bytes(samples_to_bytes(
                [Sample(records[i], samples[i].group, scores[i]) for i in chosen]))
        if round_number < self.spec.rounds:  # the last round has no next one to write for
            stats["next"] = self._publish_set(outputs, llm, tok, round_number + 1)
        return StepResult(outputs, {"crosslm": stats, "llm": self.evaluate(self.spec.llm, outputs[LLM_ADAPTER])})
