"""The knowledge-distillation loss both sides use: FedCoLLM's server-side distillation
and Co-PLMs' mutual learning on the device (ARCHITECTURE.md, "Methods")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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
    return _masked_mean(kl, mask, log_q) * (temperature**2)


def kd_loss_sparse(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """kd_loss against a teacher given by its support: (..., k) student ids and their probabilities
    (0 for unused slots), as common.ml.vocab_align maps a teacher of another vocabulary.

    The same value as kd_loss with the teacher's logits log(p) on those ids and none elsewhere:
    at temperature T the teacher is p^(1/T) renormalised over its support, the student its full
    softmax at T, and the loss T^2 * sum_k p_k * (log p_k - log q_k), masked mean over positions.
    """
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target_ids.shape != target_probs.shape or target_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"target ids {tuple(target_ids.shape)} and probabilities {tuple(target_probs.shape)} "
                         f"do not match the student's positions {tuple(student_logits.shape[:-1])}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    used = target_probs > 0
    p = torch.where(used, target_probs.float(), torch.zeros_like(target_probs, dtype=torch.float32))
    if temperature != 1.0:
        p = torch.where(used, p.clamp_min(1e-30).pow(1.0 / temperature), p)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    log_p = torch.where(used, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    kl = torch.where(used, p * (log_p - log_q.gather(-1, target_ids)), torch.zeros_like(p)).sum(dim=-1)
    return _masked_mean(kl, mask, log_q) * (temperature**2)


def _masked_mean(kl: torch.Tensor, mask: torch.Tensor | None, log_q: torch.Tensor) -> torch.Tensor:
    import torch

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
    return (kl * weights).sum() / count


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
