"""Knowledge distillation: the KD loss and FedCoLLM's server-side mutual distillation
between the LLM and the aggregated SLM (DESIGN.md §5).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edge_sdk.ml.batching import _num_batches, _special_ids, collate, encode_sft, iterate_batches
from edge_sdk.ml.train import ProgressFn, _lora_only, _loss_summary, _Progress, _response_ce

if TYPE_CHECKING:
    import torch

    from edge_sdk.protocol import DistillSpec
    from edge_sdk.tasks.records import TaskRecord


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(teacher/T) || softmax(student/T)).

    Logits are (..., vocab) and `mask` has the leading shape (True/1 = counted; None =
    every position). The teacher is detached here, so no gradient ever reaches it.

    With `top_k`, the teacher keeps its k largest logits, renormalised over those k
    (p_k), and the loss is sum_k p_k * (log p_k - log q_k) where log q_k are the
    student's log-probabilities at those ids from its *full* softmax. We do not
    renormalise the student over the k ids: that would leave the student free to put
    mass outside the teacher's top-k. The value is still >= 0, and 0 exactly when the
    student matches p_k on those ids (and so has no mass elsewhere).
    """
    import torch
    import torch.nn.functional as F

    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the models must share a vocabulary"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = teacher_logits.detach().float() / temperature
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    vocab = t.size(-1)
    if top_k is None or top_k >= vocab:
        log_p = F.log_softmax(t, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    else:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        values, index = t.topk(top_k, dim=-1)
        log_p = F.log_softmax(values, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(-1, index))).sum(dim=-1)
    if mask is None:
        weights = torch.ones_like(kl)
    else:
        if tuple(mask.shape) != tuple(kl.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape {tuple(kl.shape)}")
        weights = mask.to(kl.dtype)
    count = weights.sum()
    if count.item() == 0:
        # Nothing to distil in this batch: a zero that keeps the graph connected.
        return log_q.sum() * 0.0
    return (kl * weights).sum() / count * (temperature**2)


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


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
    `progress` gets (step, total, SLM loss).
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
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits[:, :-1]
        student.train()
        logits = student(**inputs).logits
        if logits.size(-1) != teacher_logits.size(-1):
            raise ValueError(
                f"logits widths differ ({logits.size(-1)} vs {teacher_logits.size(-1)})"
            )
        ce = _response_ce(logits, batch["labels"])
        kd = kd_loss(logits[:, :-1], teacher_logits, batch["labels"][:, 1:] != -100, temp, top_k)
        loss = ce + lam * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        student.eval()
        history[f"{side}_loss"].append(float(loss.detach()))
        history[f"{side}_ce"].append(float(ce.detach()))
        history[f"{side}_kd"].append(float(kd.detach()))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt_slm = torch.optim.AdamW(slm_params, lr=spec.lr, weight_decay=0.0)
        opt_llm = torch.optim.AdamW(llm_params, lr=spec.lr, weight_decay=0.0)
        bar = _Progress(progress, total, "distill")
        try:
            batches = iterate_batches(examples, spec.batch_size, seed, spec.epochs, spec.max_steps)
            for step, examples_batch in enumerate(batches):
                batch = collate(examples_batch, pad_id)
                update(slm, llm, slm_params, opt_slm, "slm", batch)  # (a) LLM teaches SLM
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
    for side in ("slm", "llm"):
        for key, value in _loss_summary(history[f"{side}_loss"]).items():
            report[f"{side}_{key}"] = value
        for kind in ("ce", "kd"):
            values = history[f"{side}_{kind}"]
            report[f"{side}_{kind}_mean"] = sum(values) / len(values) if values else float("nan")
    return report
