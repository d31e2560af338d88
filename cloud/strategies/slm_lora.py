"""What FedAvg and FedCoLLM share: one SLM whose LoRA adapter the devices train."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from cloud.models import ModelHolder, checkpoint_files, publish_checkpoint
from cloud.strategies.base import SpecError, Strategy
from common.protocol import ClientTask, RunSpec

SLM_ADAPTER = "slm/adapter.safetensors"


def _check_jsonl(path: str | None, what: str, required: bool) -> None:
    if path is None:
        if required:
            raise SpecError(f"{what} is required for this algorithm; set it to a JSONL file")
        return
    from common.records import read_jsonl

    try:
        read_jsonl(Path(path))
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what} {path!r} cannot be used: {exc}") from None


class SlmLoraStrategy(Strategy):
    def __init__(self, spec: RunSpec, store, holder: ModelHolder | None = None) -> None:
        super().__init__(spec, store)
        self.holder = holder or ModelHolder(store)

    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        try:
            checkpoint_files(Path(spec.slm))
        except (OSError, ValueError) as exc:
            raise SpecError(f"slm: {exc}") from None
        _check_jsonl(spec.eval_data, "eval_data", required=False)

    def round_seed(self, round_number: int) -> int:
        return self.spec.seed * 100_003 + round_number

    def client_task(self, round_number: int) -> ClientTask:
        return ClientTask(lora=self.spec.lora, train=self.spec.train, seed=self.round_seed(round_number),
                          privacy=self.spec.privacy)

    def initial_inputs(self) -> dict[str, str]:
        inputs = publish_checkpoint(self.store, Path(self.spec.slm), "slm")
        inputs[SLM_ADAPTER] = self.fresh_adapter(self.spec.slm)
        return inputs

    def fresh_adapter(self, ckpt_dir: str) -> str:
        """The seeded, untrained adapter a run starts from. Built on a fresh copy of the model:
        the held one carries whatever adapter another run on this checkpoint trained last."""
        from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
        from common.ml.tiny import load_checkpoint

        model, _tok = load_checkpoint(Path(ckpt_dir))
        return self.store.put_bytes(adapter_to_bytes(adapter_state(attach_lora(model, self.spec.lora, self.spec.seed))))

    @cached_property
    def eval_records(self) -> list:
        if self.spec.eval_data is None:
            return []
        from common.records import read_jsonl

        return read_jsonl(Path(self.spec.eval_data))

    def evaluate(self, ckpt_dir: str, adapter_digest: str) -> dict[str, Any]:
        if not self.eval_records:
            return {}
        from common.ml.evaluate import evaluate

        model, tok = self.holder.with_adapter(ckpt_dir, self.spec.lora, self.spec.seed, adapter_digest)
        return evaluate(model, tok, self.eval_records, max_new_tokens=self.spec.eval_max_new_tokens)

    def initial_metrics(self, inputs: dict[str, str]) -> dict[str, Any]:
        return {"slm": self.evaluate(self.spec.slm, inputs[SLM_ADAPTER])}
