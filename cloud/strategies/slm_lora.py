"""What the built-in strategies share on the server: seeded LoRA adapters on held models,
the auxiliary and evaluation data, and the spec checks on checkpoints and data files."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from cloud.strategies.base import SpecError, Strategy
from common.checkpoint import checkpoint_files, tokenizer_digest
from common.protocol import RunSpec


def check_jsonl(path: str | None, what: str, required: bool) -> None:
    """SpecError unless `path` is a readable task JSONL (or absent, when not `required`)."""
    if path is None:
        if required:
            raise SpecError(f"{what} is required for this algorithm; set it to a JSONL file")
        return
    from common.records import read_jsonl

    try:
        read_jsonl(Path(path))
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what} {path!r} cannot be used: {exc}") from None


def check_checkpoint(path: str, what: str) -> None:
    try:
        checkpoint_files(Path(path))
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what}: {exc}") from None


def check_llm(spec: RunSpec, algorithm: str, needed_for: str = "") -> None:
    """SpecError unless the spec names a usable LLM checkpoint."""
    if spec.llm is None:
        raise SpecError(f"{algorithm} needs an LLM{needed_for}: set `llm` to its checkpoint directory")
    check_checkpoint(spec.llm, "llm")


def same_tokenizer(a: str, b: str) -> bool:
    return tokenizer_digest(Path(a)) == tokenizer_digest(Path(b))


class SlmLoraStrategy(Strategy):
    @classmethod
    def check_spec(cls, spec: RunSpec) -> None:
        check_checkpoint(spec.slm, "slm")
        check_jsonl(spec.eval_data, "eval_data", required=False)
        super().check_spec(spec)

    def fresh_adapter(self, ckpt_dir: str) -> str:
        """The seeded, untrained adapter a run starts from. Built on a fresh copy of the model:
        the held one carries whatever adapter another run on this checkpoint trained last."""
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora

        model, _tok = load_checkpoint(Path(ckpt_dir))
        return self.store.put_bytes(adapter_to_bytes(adapter_state(attach_lora(model, self.spec.lora, self.spec.seed))))

    @cached_property
    def eval_records(self) -> list:
        if self.spec.eval_data is None:
            return []
        from common.records import read_jsonl

        return read_jsonl(Path(self.spec.eval_data))

    @cached_property
    def aux_records(self) -> list:
        from common.records import read_jsonl

        return read_jsonl(Path(self.spec.aux_data))

    def aux_answered_by(self, model: Any, tokenizer: Any) -> list:
        """The auxiliary records, those without an answer answered by `model` (greedy): with prompts-only
        auxiliary data, distillation runs along that model's own answers (cloud/training/pseudo_labels.py)."""
        from cloud.training.pseudo_labels import label_with

        return label_with(model, tokenizer, self.aux_records, self.spec.eval_max_new_tokens)

    def mutual_distillation(self, llm: Any, slm: Any, tokenizer: Any, records: list, seed: int) -> dict[str, Any]:
        """FedCoLLM's server-side distillation on `records`; none (a round whose SLM answers no
        auxiliary prompt) leaves both adapters as they are rather than failing the run."""
        from cloud.training.distill import mutual_distillation

        if not records:
            return {"steps": 0, "num_samples": 0, "skipped": "no auxiliary record with an answer"}
        return mutual_distillation(llm, slm, tokenizer, records, self.spec.distill, seed=seed)

    def evaluate(self, ckpt_dir: str, adapter_digest: str) -> dict[str, Any]:
        if not self.eval_records:
            return {}
        from common.ml.evaluate import evaluate

        model, tok = self.holder.with_adapter(ckpt_dir, self.spec.lora, self.spec.seed, adapter_digest)
        return evaluate(model, tok, self.eval_records, max_new_tokens=self.spec.eval_max_new_tokens)
