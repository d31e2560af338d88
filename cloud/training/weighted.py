"""LoRA SFT with a weight per record: the likelihood of good samples counts more.

CrossLM's server tunes the LLM this way on its own synthetic samples, each weighted by
how plausible the devices' SLMs found it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.ml.batching import IGNORE_INDEX, _num_batches, _special_ids, collate, encode_sft, iterate_batches
from common.ml.device import model_device, rng_devices, to_device
from common.ml.train import ProgressFn, _lora_only, _Progress, optimizer_step, training_report

if TYPE_CHECKING:
    from common.protocol import TrainSpec
    from common.records import TaskRecord


def train_lora_weighted(
    model: Any,
    tokenizer: Any,
    records: Sequence[TaskRecord],
    weights: Sequence[float],
    spec: TrainSpec,
    seed: int,
    progress: bool | ProgressFn = False,
) -> dict[str, Any]:
    """LoRA SFT where record i's response tokens count `weights[i]` times.

    Batch loss = sum_i w_i * sum_t nll_it / sum_i n_i (n_i: response tokens of record i),
    i.e. the usual token-mean cross-entropy when every weight is 1. Weights must be >= 0;
    records of weight 0 are skipped. Scale weights to a mean of about 1 to keep the
    learning rate's meaning. Returns the same report as `train_lora`, plus "weight_mean".
    """
    import torch
    import torch.nn.functional as F

    if len(weights) != len(records):
        raise ValueError(f"got {len(weights)} weights for {len(records)} records")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    started = time.perf_counter()
    chosen = [(r, float(w)) for r, w in zip(records, weights, strict=True) if w > 0]
    if not chosen:
        raise ValueError("every weight is 0: nothing to train on")
    params = _lora_only(model)
    examples: list[dict[str, Any]] = []
    for record, weight in chosen:
        encoded = encode_sft(tokenizer, [record], spec.max_len)
        if encoded:
            examples.append({**encoded[0], "weight": weight})
    if not examples:
        raise ValueError("no trainable records: every prompt fills max_len")
    _, _, pad_id = _special_ids(tokenizer)
    total = _num_batches(len(examples), spec.batch_size, spec.epochs, spec.max_steps)
    losses: list[float] = []
    device = model_device(model)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        bar = _Progress(progress, total, "weighted")
        model.train()
        try:
            for step, batch in enumerate(iterate_batches(examples, spec.batch_size, seed, spec.epochs, spec.max_steps)):
                tensors = to_device(collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in batch],
                                            pad_id), device)
                w = torch.tensor([e["weight"] for e in batch], dtype=torch.float32, device=device)
                logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
                labels = tensors["labels"][:, 1:]
                nll = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="none",
                ).view(labels.shape)
                count = (labels != IGNORE_INDEX).sum().clamp(min=1)
                losses.append(optimizer_step((nll.sum(dim=1) * w).sum() / count, optimizer, params))
                bar.update(step + 1, losses[-1])
        finally:
            bar.close()
            model.eval()
    return {**training_report(losses, len(examples), started),
            "weight_mean": sum(e["weight"] for e in examples) / len(examples)}
