"""Supervised fine-tuning loops: LoRA SFT on a device's records, and `run_sft`, the loop it
shares with the demo's full-parameter pretraining.

`TrainOptions` (common.ml.train_options) turns on speed and memory optimizations one by one;
without them the loops run exactly as they always have, result for result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from common.ml.batching import (
    IGNORE_INDEX,
    _num_batches,
    _special_ids,
    collate,
    encode_records,
    training_batches,
)
from common.ml.device import model_device, rng_devices, to_device
from common.ml.train_options import TrainOptions, adamw, batch_loss, gradient_checkpointing

if TYPE_CHECKING:
    import torch

    from common.protocol import TrainSpec
    from common.records import TaskRecord

# progress(step, total_steps, loss) when a callable is given instead of a bool.
ProgressFn = Callable[[int, int, float], None]


def _response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (response) positions."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


class _Progress:
    """A tqdm bar, a user callback, or nothing."""

    def __init__(self, progress: bool | ProgressFn, total: int, desc: str) -> None:
        self.callback: ProgressFn | None = None
        self.bar: Any = None
        if callable(progress):
            self.callback = progress
        elif progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)
        self.total = total

    def update(self, step: int, loss: float) -> None:
        if self.callback is not None:
            self.callback(step, self.total, loss)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _loss_summary(losses: Sequence[float]) -> dict[str, float]:
    return {
        "loss_first": float(losses[0]) if losses else math.nan,
        "loss_last": float(losses[-1]) if losses else math.nan,
        "loss_mean": float(sum(losses) / len(losses)) if losses else math.nan,
    }


def training_report(losses: Sequence[float], num_samples: int, started: float) -> dict[str, Any]:
    """What a training loop returns: steps, first/last/mean loss, samples, seconds since `started`."""
    return {"steps": len(losses), **_loss_summary(losses), "num_samples": num_samples,
            "seconds": time.perf_counter() - started}


def optimizer_step(loss: Any, optimizer: Any, params: Sequence[Any], max_grad_norm: float = 1.0,
                   foreach: bool | None = None) -> float:
    """One update from `loss` with its gradient norm clipped (every training loop here); the loss value.
    `foreach` picks torch's multi-tensor norm (None: torch's own choice, per-tensor on CPU)."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=foreach)
    optimizer.step()
    return float(loss.detach())


def run_sft(
    model: Any,
    tokenizer: Any,
    records: Sequence[TaskRecord],
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    batch_size: int,
    max_len: int,
    seed: int,
    epochs: float | None,
    max_steps: int | None,
    progress: bool | ProgressFn,
    warmup_cosine: bool,
    desc: str,
    options: TrainOptions | None = None,
) -> dict[str, Any]:
    """The SFT loop shared by LoRA training and full pretraining.

    `options` turns on opt-in optimizations (TrainOptions); None or the defaults change nothing.

    The report counts the records cut to `max_len` (`truncated_records`) and left out because the
    prompt alone filled it (`dropped_records`); either is also logged as a warning.
    """
    import torch

    started = time.perf_counter()
    examples, cut = encode_records(tokenizer, records, max_len)
    cut.warn(max_len, desc)
    if not examples:
        raise ValueError(f"no trainable records: the list is empty or every prompt fills max_len={max_len}; "
                         "raise max_len or shorten the prompts")
    _, _, pad_id = _special_ids(tokenizer)
    total = _num_batches(len(examples), batch_size, epochs, max_steps)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    # Batches go where the model is: a model loaded on CUDA trains on CUDA.
    device = model_device(model)
    # The fork keeps the caller's RNG state untouched; inside, the seed fixes dropout.
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        opts = options or TrainOptions()
        optimizer = adamw(params, lr, opts.optimizer)
        scheduler = None
        if warmup_cosine:
            # Short warmup then cosine decay: converges quickly from a random init.
            warmup = max(1, total // 20)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress_frac = (step - warmup) / max(1, total - warmup)
                return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress_frac))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        bar = _Progress(progress, total, desc)
        losses: list[float] = []
        # The multi-tensor gradient norm goes with the multi-tensor and fused optimizers.
        foreach = True if opts.optimizer != "default" else None
        model.train()
        try:
            batches = training_batches(examples, batch_size, seed, epochs, max_steps, opts.bucket_window)
            with gradient_checkpointing(model, opts.gradient_checkpointing):
                for step, batch in enumerate(batches):
                    tensors = to_device(collate(batch, pad_id), device)
                    if opts.default_loss:
                        logits = model(
                            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
                        ).logits
                        loss = _response_ce(logits, tensors["labels"])
                    else:
                        loss = batch_loss(model, tensors, opts)
                    losses.append(optimizer_step(loss, optimizer, params, foreach=foreach))
                    if scheduler is not None:
                        scheduler.step()
                    bar.update(step + 1, losses[-1])
        finally:
            bar.close()
            model.eval()
    return {**training_report(losses, len(examples), started), **cut.report()}


def _lora_only(model: Any) -> list[Any]:
    """Make exactly the LoRA parameters trainable (less those the run's LoRA aggregation keeps
    frozen, see common.ml.lora.lora_trainable); return them."""
    from common.ml.lora import lora_trainable

    trainable = []
    for name, param in model.named_parameters():
        is_lora = lora_trainable(model, name)
        param.requires_grad_(is_lora)
        if is_lora:
            trainable.append(param)
    if not trainable:
        raise ValueError(
            "the model has no LoRA parameters; call common.ml.lora.attach_lora first"
        )
    return trainable


def train_lora(
    model: Any,
    tokenizer: Any,
    records: Sequence[TaskRecord],
    spec: TrainSpec,
    seed: int,
    progress: bool | ProgressFn = False,
    options: TrainOptions | None = None,
) -> dict[str, Any]:
    """LoRA SFT of a peft model on `records` (loss on responses only); base weights frozen.

    Returns {"steps", "loss_first", "loss_last", "loss_mean", "num_samples", "seconds",
    "truncated_records", "dropped_records"}.
    The same model, records, spec and seed give the same adapter. Leaves the model in
    eval mode. `progress` is a bool (tqdm bar) or a callable(step, total, loss). `options`: opt-in
    speed and memory optimizations (common.ml.train_options.TrainOptions; by default those the
    spec asks for, none so far); without them the trainer is exactly the one every released
    result came from.
    """
    params = _lora_only(model)
    return run_sft(
        model,
        tokenizer,
        records,
        params,
        lr=spec.lr,
        batch_size=spec.batch_size,
        max_len=spec.max_len,
        seed=seed,
        epochs=spec.epochs,
        max_steps=spec.max_steps,
        progress=progress,
        warmup_cosine=False,
        desc="lora",
        options=options if options is not None else TrainOptions.from_spec(spec),
    )
