"""Knowledge distillation: FedCoLLM's server-side mutual distillation
between the LLM and the aggregated SLM (ARCHITECTURE.md, "Algorithms").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.ml.batching import IGNORE_INDEX, _num_batches, _special_ids, collate, encode_sft, iterate_batches
from common.ml.device import model_device, rng_devices, to_device
from common.ml.kd import _vocab_size, kd_loss
from common.ml.mutual import loss_report, record_losses
from common.ml.positions import kept_positions, next_labels, next_token_ce, position_logits
from common.ml.train import ProgressFn, _lora_only, _Progress, optimizer_step

if TYPE_CHECKING:
    from common.protocol import DistillSpec
    from common.records import TaskRecord


def mutual_distillation(
    llm: Any,
    slm: Any,
    tokenizer: Any,
    records: Sequence[TaskRecord],
    spec: DistillSpec,
    seed: int,
    progress: bool | ProgressFn = False,
    *,
    max_len: int = 64,
) -> dict[str, Any]:
    """FedCoLLM mutual distillation on `records` (the auxiliary public data).

    Per batch: (a) the LLM is the frozen teacher (no_grad, eval) and the SLM's LoRA is
    updated with CE(response) + lambda_kd * kd_loss; (b) the updated SLM is the frozen
    teacher and the LLM's LoRA is updated likewise. Each side has its own AdamW over its
    LoRA parameters only; base weights never change. Both models are peft models sharing
    `tokenizer`. Returns step count, sample count, seconds and per side
    ("slm_"/"llm_") loss_first, loss_last, loss_mean, ce_mean, kd_mean. A callable
    `progress` gets (step, total, SLM loss). With `spec.direction` "llm_to_slm" step (b) is skipped:
    the LLM only teaches and its adapter does not change.
    """
    import torch

    started = time.perf_counter()
    llm_vocab, slm_vocab = _vocab_size(llm), _vocab_size(slm)
    if llm_vocab != slm_vocab:
        raise ValueError(
            f"LLM and SLM vocabularies differ ({llm_vocab} vs {slm_vocab}); FedCoLLM's "
            "token-level distillation needs one shared tokenizer and vocabulary size"
        )
    llm_params, slm_params = _lora_only(llm), _lora_only(slm)
    # Each model gets the batch on its own device (the LLM may sit on another GPU than the SLM);
    # the teacher's logits move to the student's (kd_loss compares them on one device).
    devices = {"slm": model_device(slm), "llm": model_device(llm)}
    examples = encode_sft(tokenizer, records, max_len)
    if not examples:
        raise ValueError("no distillation records: the list is empty or every prompt is too long")
    _, _, pad_id = _special_ids(tokenizer)
    total = _num_batches(len(examples), spec.batch_size, spec.epochs, spec.max_steps)
    lam, temp, top_k = spec.lambda_kd, spec.temperature, spec.top_k
    history: dict[str, list[float]] = {
        f"{side}_{kind}": [] for side in ("slm", "llm") for kind in ("loss", "ce", "kd")
    }

    def update(
        student: Any, teacher: Any, params: list[Any], opt: Any, side: str, batch: Any
    ) -> None:
        teacher_side = "llm" if side == "slm" else "slm"
        batch = to_device(batch, devices[side])
        keep = kept_positions(batch["labels"], spec.labelled_logits)
        teacher.eval()
        with torch.no_grad():
            teacher_logits = position_logits(teacher, to_device(batch, devices[teacher_side]), keep).to(devices[side])
        student.train()
        logits = position_logits(student, batch, keep)
        if logits.size(-1) != teacher_logits.size(-1):
            raise ValueError(
                f"logits widths differ ({logits.size(-1)} vs {teacher_logits.size(-1)})"
            )
        labels = next_labels(batch["labels"], keep)
        ce = next_token_ce(logits, labels)
        kd = kd_loss(logits, teacher_logits, labels != IGNORE_INDEX, temp, top_k)
        loss = optimizer_step(ce + lam * kd, opt, params)
        student.eval()
        record_losses(history, side, loss, ce, kd)

    with torch.random.fork_rng(devices=sorted(set(rng_devices(devices["slm"]) + rng_devices(devices["llm"])))):
        torch.manual_seed(seed)
        opt_slm = torch.optim.AdamW(slm_params, lr=spec.lr, weight_decay=0.0)
        opt_llm = torch.optim.AdamW(llm_params, lr=spec.lr, weight_decay=0.0)
        bar = _Progress(progress, total, "distill")
        try:
            batches = iterate_batches(examples, spec.batch_size, seed, spec.epochs, spec.max_steps)
            for step, examples_batch in enumerate(batches):
                batch = collate(examples_batch, pad_id)
                update(slm, llm, slm_params, opt_slm, "slm", batch)  # (a) LLM teaches SLM
                if spec.direction == "mutual":
                    update(llm, slm, llm_params, opt_llm, "llm", batch)  # (b) SLM teaches LLM
                bar.update(step + 1, history["slm_loss"][-1])
        finally:
            bar.close()
            llm.eval()
            slm.eval()

    report: dict[str, Any] = {
        "steps": len(history["slm_loss"]),
        "num_samples": len(examples),
        "seconds": time.perf_counter() - started,
    }
    for side in ("slm", "llm") if spec.direction == "mutual" else ("slm",):
        report.update(loss_report(history, side))
    return report
