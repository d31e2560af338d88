"""`crosslm`: a device's round following the CrossLM design (Deng et al., arXiv 2312.05842),
reconstructed from its abstract (ARCHITECTURE.md, "Methods"; the contract, with the upload's
two score tensors, is common.methods.crosslm).

The device trains its own SLM on its private data plus the synthetic samples the server
selected last round, then scores this round's synthetic samples with it and uploads only
the scores. Neither data nor weights leave the device. A device without its own SLM
(no `--slm`) uses the run's published `slm/` base.

Scores: s is the SLM's geometric-mean token probability of the sample's response; its weight
w is the share of the device's records in the sample's domain (1 when domains are unknown or
domain weighting is off). The coordinator's sample-weighted mean of w * s and of w gives, per
sample, sum_k n_k w_k s_k / sum_k n_k w_k: each device's opinion counts by how much data of
that domain it holds. The weights do tell the server each device's domain mix.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from common.methods.contract import SLM_PREFIX
from common.methods.crosslm import (
    CONTRACT,
    SCORE_TENSOR,
    SELECTED,
    SYNTHETIC,
    WEIGHT_TENSOR,
    CrossLmDeviceParams,
    samples_from_bytes,
)
from common.protocol import RoundInfo
from common.records import TaskRecord
from edge_sdk.handlers.base import FinalArtifacts, TaskHandler, UpdatePayload, artifact
from edge_sdk.handlers.own_slm import OwnSlm


def domain_weights(records: list[TaskRecord], samples: list[TaskRecord], enabled: bool) -> list[float]:
    """Per sample, the fraction of `records` in its domain (1.0 where that is unknown)."""
    counts = Counter(r.domain for r in records if r.domain is not None)
    if not enabled or not counts:
        return [1.0] * len(samples)
    total = len(records)
    return [1.0 if s.domain is None else counts.get(s.domain, 0) / total for s in samples]


class CrossLmHandler(TaskHandler):
    kind = CONTRACT.task_kind

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.own = OwnSlm(ctx, CONTRACT.task_kind, fallback_prefix=SLM_PREFIX)

    def device_model(self, info: RoundInfo) -> tuple[Any, Any]:
        """The device's own SLM with its latest private adapter (for local use and benchmarks)."""
        return self.own.load(info.model_copy(update={"round": info.round + 1}))

    def _samples(self, info: RoundInfo, name: str) -> list[TaskRecord]:
        if not any(r.name == name for r in info.artifacts):
            return []
        return [s.record for s in samples_from_bytes(self.ctx.cache.fetch(artifact(info, name)).read_bytes())]

    def run(self, info: RoundInfo) -> UpdatePayload:
        import numpy as np

        from common.ml.evaluate import evaluate
        from common.ml.scoring import plausibility
        from common.ml.train import train_lora

        params = CrossLmDeviceParams.model_validate(info.task.params)
        train, records = info.task.train, list(self.ctx.records)
        selected = self._samples(info, SELECTED) if params.train_on_selected else []
        synthetic = self._samples(info, SYNTHETIC)
        self.ctx.say(f"round {info.round}/{info.rounds_total}: crosslm on {len(records)} local records "
                     f"+ {len(selected)} selected; scoring {len(synthetic)} synthetic samples")
        slm, tokenizer = self.own.load(info)
        metrics: dict[str, Any] = {"slm_arch": getattr(slm.config, "model_type", "unknown"),
                                   "selected_used": len(selected), "synthetic": len(synthetic)}
        if self.ctx.eval_records:
            metrics["local_eval_before"] = evaluate(slm, tokenizer, self.ctx.eval_records)
        metrics["train"] = train_lora(slm, tokenizer, records + selected, train, seed=info.task.seed,
                                      progress=self.ctx.progress)
        self.own.save(info)
        if self.ctx.eval_records:
            metrics["local_eval_after"] = evaluate(slm, tokenizer, self.ctx.eval_records)
        scores = np.asarray(plausibility(slm, tokenizer, synthetic, max_len=train.max_len), dtype=np.float32)
        weights = np.asarray(domain_weights(records, synthetic, params.domain_weighting), dtype=np.float32)
        metrics["score_mean"] = float(scores.mean()) if len(scores) else None
        return UpdatePayload(arrays={SCORE_TENSOR: scores * weights, WEIGHT_TENSOR: weights},
                             num_samples=len(records), metrics=metrics)

    def finish(self, info: RoundInfo, out_dir: Path) -> FinalArtifacts:
        """out_dir/slm: the device's own SLM and private adapter."""
        return self.own.finish(info, out_dir)
