"""Output-level knowledge transfer between two models of any architecture: one-way
distillation (a frozen teacher) and mutual learning (each side teaches the other in turn).

Co-PLMs uses both: the server distils the LLM into the shared proxy model (DPM), and each
device runs mutual learning between its own SLM and its copy of the proxy. Only output
distributions meet, so the two models may differ in depth, width and family (llama, gpt2,
qwen2, ...). When their tokenizers differ, `common.ml.vocab_align.VocabAlignment`
carries the teacher's distributions onto the student's positions and vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.ml.batching import IGNORE_INDEX, _num_batches, _special_ids, collate, encode_sft, iterate_batches
from common.ml.device import model_device, rng_devices, to_device
from common.ml.kd import kd_loss, kd_loss_sparse
from common.ml.positions import kept_positions, next_labels, next_token_ce, position_logits
from common.ml.train import ProgressFn, _lora_only, _loss_summary, _Progress, optimizer_step

if TYPE_CHECKING:
    from common.protocol import DistillSpec
    from common.records import TaskRecord


class _Side:
    """One model with its tokenizer, its encoded records and (when it learns) its optimizer."""

    def __init__(self, name: str, model: Any, tokenizer: Any, encoded: list[dict[str, list[int]]]) -> None:
        self.name, self.model, self.tokenizer, self.encoded = name, model, tokenizer, encoded
        self.pad_id = _special_ids(tokenizer)[2]
        self.params: list[Any] = []
        self.optimizer: Any = None
        self.no_ce: list[bool] | None = None  # per record: KL only (its response is no label)

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        # On this side's model's device: the two sides may sit on different devices.
        return to_device(collate([self.encoded[i] for i in indices], self.pad_id), model_device(self.model))

    def ce_labels(self, labels: Any, indices: Sequence[int]) -> Any:
        """The labels CE learns from: those of KL-only records masked out."""
        if self.no_ce is None or not any(self.no_ce[i] for i in indices):
            return labels
        masked = labels.clone()
        for row, i in enumerate(indices):
            if self.no_ce[i]:
                masked[row] = IGNORE_INDEX
        return masked


def _encode_all(tokenizer: Any, records: Sequence[TaskRecord], max_len: int) -> list[dict[str, list[int]] | None]:
    # encode_sft drops records it cannot fit; keep positions so both sides index the same records.
    out: list[dict[str, list[int]] | None] = []
    for record in records:
        encoded = encode_sft(tokenizer, [record], max_len)
        out.append(encoded[0] if encoded else None)
    return out


def _sides(
    models: Sequence[tuple[str, Any, Any]], records: Sequence[TaskRecord], max_len: int,
    kl_only: Sequence[bool] | None = None,
) -> tuple[list[_Side], list[TaskRecord]]:
    """Encode the records for every side; keep only records every side can train on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_side = [_encode_all(tok, records, max_len) for _, _, tok in models]
    keep = [i for i in range(len(records)) if all(enc[i] is not None for enc in per_side)]
    if not keep:
        raise ValueError("no records to learn from: the list is empty or every prompt fills max_len")
    sides = [
        _Side(name, model, tok, [enc[i] for i in keep])  # type: ignore[misc]
        for (name, model, tok), enc in zip(models, per_side, strict=True)
    ]
    if kl_only is not None:
        for side in sides:
            side.no_ce = [bool(kl_only[i]) for i in keep]
    return sides, [records[i] for i in keep]


def _alignment(student: _Side, teacher: _Side, top_k: int | None, token_map: str) -> Any:
    """None when both sides share a tokenizer (positions and ids line up as they are)."""
    from common.ml.kd import _vocab_size
    from common.ml.vocab_align import VocabAlignment, same_vocabulary

    if same_vocabulary(student.tokenizer, teacher.tokenizer):
        return None
    return VocabAlignment.cached(teacher.tokenizer, student.tokenizer, top_k=top_k or 16,
                                 student_width=_vocab_size(student.model), method=token_map)


def _update(
    student: _Side,
    teacher: _Side,
    indices: Sequence[int],
    records: Sequence[TaskRecord],
    spec: DistillSpec,
    alignment: Any,
    history: dict[str, list[float]],
) -> None:
    import torch

    s_batch = student.batch(indices)
    t_batch = s_batch if alignment is None else teacher.batch(indices)
    keep = kept_positions(s_batch["labels"], spec.labelled_logits)
    labels = next_labels(s_batch["labels"], keep)
    mask = labels != IGNORE_INDEX
    teacher.model.eval()
    with torch.no_grad():
        t_keep = keep if alignment is None else kept_positions(t_batch["labels"], spec.labelled_logits)
        t_logits = position_logits(teacher.model, t_batch, t_keep)
    student.model.train()
    logits = position_logits(student.model, s_batch, keep)
    ce = next_token_ce(logits, next_labels(student.ce_labels(s_batch["labels"], indices), keep))
    if alignment is None:
        if logits.size(-1) != t_logits.size(-1):
            raise ValueError(
                f"{student.name} and {teacher.name} share a tokenizer but their output layers differ "
                f"({logits.size(-1)} vs {t_logits.size(-1)} ids); give both models the tokenizer's vocabulary size"
            )
        kd = kd_loss(logits, t_logits.to(mask.device), mask, spec.temperature, spec.top_k)
    else:
        # The teacher's top-k, carried onto the student's positions and ids (common.ml.vocab_align).
        top_p, top_i = alignment.teacher_top(t_logits, t_keep, t_batch["input_ids"].shape[1] - 1)
        ids, probs, aligned = alignment.targets(top_p, top_i, [records[i] for i in indices],
                                                s_batch["labels"][:, 1:] != IGNORE_INDEX,
                                                t_batch["attention_mask"].sum(dim=1).tolist())
        if keep is not None:
            ids, probs, aligned = ids[:, keep], probs[:, keep], aligned[:, keep]
        kd = kd_loss_sparse(logits, ids.to(logits.device), probs.to(logits.device), mask & aligned.to(mask.device),
                            spec.temperature)
    loss = optimizer_step(ce + spec.lambda_kd * kd, student.optimizer, student.params)
    student.model.eval()
    record_losses(history, student.name, loss, ce, kd)


def record_losses(history: dict[str, list[float]], side: str, loss: float, ce: Any, kd: Any) -> None:
    """Append one step's total, CE and KD losses of `side` to the history."""
    history[f"{side}_loss"].append(loss)
    history[f"{side}_ce"].append(float(ce.detach()))
    history[f"{side}_kd"].append(float(kd.detach()))


def loss_report(history: dict[str, list[float]], side: str) -> dict[str, float]:
    """`side`'s first/last/mean loss and its mean CE and KD, with keys prefixed by the side."""
    report = {f"{side}_{key}": value for key, value in _loss_summary(history[f"{side}_loss"]).items()}
    for kind in ("ce", "kd"):
        values = history[f"{side}_{kind}"]
        report[f"{side}_{kind}_mean"] = sum(values) / len(values) if values else float("nan")
    return report


def _run(
    learners: Sequence[tuple[_Side, _Side]],
    records: Sequence[TaskRecord],
    spec: DistillSpec,
    seed: int,
    progress: bool | ProgressFn,
    desc: str,
    token_map: str,
) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    alignments = [_alignment(student, teacher, spec.top_k, token_map) for student, teacher in learners]
    names = [student.name for student, _ in learners]
    history: dict[str, list[float]] = {f"{n}_{k}": [] for n in names for k in ("loss", "ce", "kd")}
    total = _num_batches(len(records), spec.batch_size, spec.epochs, spec.max_steps)
    cuda = sorted({i for student, _ in learners for i in rng_devices(model_device(student.model))})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for student, _ in learners:
            student.params = _lora_only(student.model)
            student.optimizer = torch.optim.AdamW(student.params, lr=spec.lr, weight_decay=0.0)
        bar = _Progress(progress, total, desc)
        try:
            batches = iterate_batches(list(range(len(records))), spec.batch_size, seed, spec.epochs, spec.max_steps)
            for step, indices in enumerate(batches):
                for (student, teacher), alignment in zip(learners, alignments, strict=True):
                    _update(student, teacher, indices, records, spec, alignment, history)
                bar.update(step + 1, history[f"{names[0]}_loss"][-1])
        finally:
            bar.close()
            for student, teacher in learners:
                student.model.eval()
                teacher.model.eval()
    report: dict[str, Any] = {
        "steps": len(history[f"{names[0]}_loss"]),
        "num_samples": len(records),
        "seconds": time.perf_counter() - started,
        "aligned_vocab": [a is not None for a in alignments],
    }
    for name in names:
        report.update(loss_report(history, name))
    return report


def distill_into(
    student: Any,
    student_tokenizer: Any,
    teacher: Any,
    teacher_tokenizer: Any,
    records: Sequence[TaskRecord],
    spec: DistillSpec,
    seed: int,
    *,
    max_len: int = 64,
    progress: bool | ProgressFn = False,
    token_map: str = "first_token",
) -> dict[str, Any]:
    """Train the student's LoRA on CE(response) + lambda_kd * KD(teacher -> student).

    The teacher never changes. Report keys are prefixed "student_". `token_map` picks how
    teacher ids become student ids when the tokenizers differ (common.ml.vocab_align).
    """
    sides, kept = _sides([("student", student, student_tokenizer), ("teacher", teacher, teacher_tokenizer)],
                         records, max_len)
    return _run([(sides[0], sides[1])], kept, spec, seed, progress, "distill", token_map)


def mutual_learning(
    first: Any,
    first_tokenizer: Any,
    second: Any,
    second_tokenizer: Any,
    records: Sequence[TaskRecord],
    spec: DistillSpec,
    seed: int,
    *,
    max_len: int = 64,
    progress: bool | ProgressFn = False,
    token_map: str = "first_token",
    kl_only: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Per batch, `first` learns from the frozen `second`, then `second` from the updated `first`.

    Each side's loss is CE(response) + lambda_kd * T^2 * KL(teacher || student) over the
    response positions; each has its own AdamW over its LoRA parameters. Report keys are
    prefixed "first_" and "second_".

    `kl_only` (one flag per record) marks records whose response is no label, e.g. a model's
    own answer to an unlabelled prompt: they add only the KL term, over their response
    positions. With it the report also counts them, as "kl_only" (of the records kept).
    """
    if kl_only is not None and len(kl_only) != len(records):
        raise ValueError(f"kl_only has {len(kl_only)} flags for {len(records)} records")
    sides, kept = _sides([("first", first, first_tokenizer), ("second", second, second_tokenizer)],
                         records, max_len, kl_only)
    report = _run([(sides[0], sides[1]), (sides[1], sides[0])], kept, spec, seed, progress, "mutual", token_map)
    if sides[0].no_ce is not None:
        report["kl_only"] = sum(sides[0].no_ce)
    return report
