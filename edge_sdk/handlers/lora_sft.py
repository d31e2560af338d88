"""`lora_sft`: train the shared SLM's LoRA adapter on local data (FedAvg, FedCoLLM; the
contracts in common.methods say which artifacts that is)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.methods.contract import ADAPTER_FILE, SLM_PREFIX, adapter_artifact
from common.methods.fedavg import LORA_SFT
from common.protocol import RoundInfo
from edge_sdk.handlers.base import FinalArtifacts, TaskHandler, UpdatePayload, artifact, keep_peft_dir
from edge_sdk.paths import check_name


def private_payload(ctx: Any, info: RoundInfo, start: dict[str, Any], trained: dict[str, Any]) -> UpdatePayload:
    """The update as it may leave the device under local DP (edge_sdk.privacy): the change
    clipped and noised, the DP block as its only metrics and a fixed sample count. Nothing
    else about the local data (loss, scores, norms, the sample count) goes with it.

    Every call is a release, counted in the device's ledger for the run (kept in its state
    directory) before the update can leave: the epsilon reported covers this release too.
    """
    from common.ml.lora import frozen_factor
    from edge_sdk.privacy import DECLARED_SAMPLES, local_epsilon, privatize

    spec = info.task.privacy
    run_id = check_name(info.run_id, what="run id", source=getattr(ctx, "coordinator", "(unknown)"))
    ledger_path = Path(ctx.state_dir) / f"privacy-{run_id}.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"rounds": []}
    ledger["rounds"].append(info.round)
    # Factors the run keeps frozen (FFA-LoRA's A) are public and unchanged: they go as they are,
    # outside the clipping and the noise, which the coordinator would otherwise refuse.
    frozen = {k for k in start if frozen_factor(k, info.task.lora.aggregation)}
    result = privatize({k: v for k, v in start.items() if k not in frozen},
                       {k: v for k, v in trained.items() if k not in frozen}, spec.clip_norm, spec.noise_multiplier)
    tmp = ledger_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger))
    tmp.replace(ledger_path)
    releases = len(ledger["rounds"])
    epsilon = local_epsilon(spec.noise_multiplier, releases, spec.delta)
    block = {"epsilon": epsilon if epsilon != float("inf") else None, "delta": spec.delta, "releases": releases,
             "clip_norm": spec.clip_norm, "noise_multiplier": spec.noise_multiplier}
    arrays = {**{k: trained[k] for k in frozen}, **result.arrays}
    return UpdatePayload(arrays=arrays, num_samples=DECLARED_SAMPLES, metrics={"privacy": block})


class LoraSftHandler(TaskHandler):
    kind = LORA_SFT
    prefix = SLM_PREFIX  # the published checkpoint whose adapter is trained and uploaded

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._model: tuple[Any, Any] | None = None
        self._model_key: tuple[str, ...] | None = None

    def load(self, info: RoundInfo) -> tuple[Any, Any]:
        """The SLM with the round's adapter; the base is fetched and loaded once, then kept."""
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import adapter_from_bytes, attach_lora, load_adapter_state

        adapter_name = adapter_artifact(self.prefix)
        base_refs = [r for r in info.artifacts if r.name.startswith(self.prefix + "/") and r.name != adapter_name]
        key = tuple(sorted(r.sha256 for r in base_refs)) + (info.task.lora.model_dump_json(),)
        if self._model_key != key:
            model_dir = self.ctx.cache.materialize(base_refs, self.prefix, self.ctx.state_dir / "model" / self.prefix)
            model, tokenizer = load_checkpoint(model_dir, device=self.ctx.device)
            self._model = (attach_lora(model, info.task.lora, info.task.seed), tokenizer)
            self._model_key = key
        tensors, _ = adapter_from_bytes(self.ctx.cache.fetch(artifact(info, adapter_name)).read_bytes())
        load_adapter_state(self._model[0], tensors)
        return self._model

    def run(self, info: RoundInfo) -> UpdatePayload:
        from common.ml.evaluate import evaluate
        from common.ml.lora import adapter_state
        from common.ml.train import train_lora

        self.ctx.say(f"round {info.round}/{info.rounds_total}: training on {len(self.ctx.records)} local records")
        model, tokenizer = self.load(info)
        metrics: dict[str, Any] = {}
        if self.ctx.eval_records:
            # How the model this round started from does on this device's held-out data.
            metrics["local_eval_before"] = evaluate(model, tokenizer, self.ctx.eval_records)
        start = {name: t.numpy().copy() for name, t in adapter_state(model).items()}
        metrics["train"] = train_lora(model, tokenizer, self.ctx.records, info.task.train, seed=info.task.seed,
                                      progress=self.ctx.progress)
        arrays = {name: t.numpy() for name, t in adapter_state(model).items()}
        if info.task.privacy is not None:  # the metrics above stay here: they are the private data's
            return private_payload(self.ctx, info, start, arrays)
        return UpdatePayload(arrays=arrays, num_samples=len(self.ctx.records), metrics=metrics)

    def finish(self, info: RoundInfo, out_dir: Path) -> FinalArtifacts:
        ref = artifact(info, adapter_artifact(self.prefix))
        model_dir = self.ctx.cache.materialize(
            [r for r in info.artifacts if r.name.startswith(self.prefix + "/")], self.prefix, out_dir / self.prefix
        )
        (out_dir / "adapter_info.json").write_text(json.dumps({"lora": info.task.lora.model_dump()}, indent=2))
        adapter = model_dir / ADAPTER_FILE
        peft_dir = keep_peft_dir(adapter, info.task.lora, model_dir,
                                 out_dir / ("adapter" if self.prefix == SLM_PREFIX else f"{self.prefix}-adapter"))
        return FinalArtifacts(model_dir=model_dir, adapter=adapter, adapter_sha256=ref.sha256, peft_dir=peft_dir)
