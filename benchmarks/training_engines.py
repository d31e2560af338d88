"""The engines the training benchmark compares, each run in its own process by `worker`.

- cotune: common.ml.train.train_lora on a model from common.ml.lora.attach_lora, as a device
  trains; with `options` (common.ml.train_options.TrainOptions) its opt-in optimizations.
- hf-trainer: transformers' Trainer on peft's get_peft_model, as its documentation shows it,
  with transformers' default AdamW; it is given cotune's batches in cotune's order (a sequential
  sampler over the seeded stream), so the two loss curves compare step by step.
- hf-trainer-grouped: the same with `group_by_length`, transformers' own length grouping over
  the same examples.

Every engine gets the same checkpoint, examples (encoded once by cotune's batching, so the same
token ids), LoRA config and init seed, lr with no warmup or decay, gradient clipping at 1.0,
batch size, steps and torch threads. Timing starts after the first step (allocations, lazy
initialisation) and counts real tokens only: a batch's padding is not a token trained.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENGINES = ("cotune", "cotune-fast", "hf-trainer", "hf-trainer-grouped")
# A worker's result line on stdout (the Trainer prints its own dicts there too).
RESULT_PREFIX = "@@training-result "
# What each cotune engine turns on (TrainOptions keyword arguments).
COTUNE_OPTIONS: dict[str, dict[str, Any]] = {
    "cotune": {},
    "cotune-fast": {"bucket_window": 8, "optimizer": "fused", "labelled_logits": True},
}
# The memory search's modes: cotune's trainer with these TrainOptions, in a process with this environment.
# glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, where they
# fragment and hold the peak up; a fixed 64 KiB threshold maps every large tensor on its own and
# returns it when freed (it costs page faults per step). Other C libraries ignore the variable.
RELEASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_CHUNKED = {"labelled_logits": True, "loss_chunk": 32}  # 32 positions x 262k words: 32 MiB of logits at a time
MEMORY_MODES: dict[str, dict[str, Any]] = {
    "default": {"options": {}, "env": {}},
    "checkpointing": {"options": {"gradient_checkpointing": True}, "env": {}},
    "chunked-loss": {"options": _CHUNKED, "env": {}},
    "chunked-loss+checkpointing": {"options": {**_CHUNKED, "gradient_checkpointing": True}, "env": {}},
    "chunked-loss+checkpointing+mmap": {"options": {**_CHUNKED, "gradient_checkpointing": True},
                                        "env": RELEASE_ENV},
}


# -- memory -----------------------------------------------------------------------------------


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Start a new peak RSS (Linux: writing 5 to clear_refs resets VmHWM); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _status_mib("VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the data every engine sees ----------------------------------------------------------------


def _epochs_for(steps: int, batch_size: int, n: int) -> float:
    """Enough epochs that `steps` full batches are drawn: max_steps, not the epoch budget, ends training."""
    return float(math.ceil(steps * batch_size / n) + 1)


def _records(spec: dict[str, Any], tokenizer: Any) -> list[Any]:
    from benchmarks.training_assets import long_records, train_records

    if spec.get("long"):
        return long_records(tokenizer, int(spec["max_len"]), count=max(8, int(spec["batch_size"]) * 2))
    return train_records()


def _batches(examples: Sequence[dict[str, list[int]]], spec: dict[str, Any], bucket_window: int | None
             ) -> list[list[dict[str, list[int]]]]:
    from common.ml.batching import training_batches

    epochs = _epochs_for(int(spec["steps"]), int(spec["batch_size"]), len(examples))
    return list(training_batches(examples, int(spec["batch_size"]), int(spec["seed"]), epochs, int(spec["steps"]),
                                 bucket_window))


# -- engines -----------------------------------------------------------------------------------


def _run_cotune(model: Any, tokenizer: Any, records: list[Any], examples: list[Any], spec: dict[str, Any],
                options: dict[str, Any]) -> dict[str, Any]:
    from common.ml.lora import attach_lora
    from common.ml.train import train_lora
    from common.ml.train_options import TrainOptions
    from common.protocol import LoraSpec, TrainSpec

    lora = spec["lora"]
    opts = TrainOptions(**options)
    peft_model = attach_lora(model, LoraSpec(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                             target_modules=list(lora["target_modules"])), seed=int(spec["seed"]))
    train = TrainSpec(epochs=_epochs_for(int(spec["steps"]), int(spec["batch_size"]), len(examples)),
                      lr=float(spec["lr"]), batch_size=int(spec["batch_size"]), max_len=int(spec["max_len"]),
                      max_steps=int(spec["steps"]))
    # The batches train_lora will take (the same function, arguments and seed): their real tokens.
    batches = _batches(examples, spec, opts.bucket_window)
    ready = _ready()
    stamps: list[float] = []
    losses: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        losses.append(loss)

    train_lora(peft_model, tokenizer, records, train, seed=int(spec["seed"]), progress=progress, options=opts)
    return {**ready, "model": peft_model, "stamps": stamps, "losses": losses,
            "tokens": [sum(len(ex["input_ids"]) for ex in b) for b in batches],
            "widths": [max(len(ex["input_ids"]) for ex in b) * len(b) for b in batches],
            "optimizer": f"torch.optim.AdamW ({opts.optimizer})", "options": opts.describe()}


def _run_hf_trainer(model: Any, tokenizer: Any, examples: list[Any], spec: dict[str, Any], grouped: bool
                    ) -> dict[str, Any]:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    lora = spec["lora"]
    torch.manual_seed(int(spec["seed"]))  # the same LoRA init as attach_lora's seed
    peft_model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                  lora_dropout=lora["dropout"],
                                                  target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    # The stream of examples cotune's batches are cut from, in order: the same batches, step by step.
    stream = [ex for batch in _batches(examples, spec, None) for ex in batch]
    tokenizer.padding_side = "right"  # causal LM training pads on the right (positions start at 0)
    stamps: list[float] = []
    recorded: list[tuple[Any, Any, Any]] = []

    class Stamps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    class BenchTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self.args.group_by_length:
                return super()._get_train_sampler(train_dataset)
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            # Kept as tensors: no extra synchronisation per step; read after training.
            mask = inputs["attention_mask"]
            recorded.append((loss.detach(), mask.sum(), mask.numel()))
            return out

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=int(spec["batch_size"]), max_steps=int(spec["steps"]),
            learning_rate=float(spec["lr"]), lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, seed=int(spec["seed"]), data_seed=int(spec["seed"]),
            remove_unused_columns=False, disable_tqdm=True, group_by_length=grouped)
        trainer = BenchTrainer(model=peft_model, args=args, train_dataset=stream,
                               data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest",
                                                                    label_pad_token_id=-100),
                               callbacks=[Stamps()])
        torch.set_num_threads(int(spec["threads"]))  # whatever accelerate set up, the same threads as cotune
        ready = _ready()
        trainer.train()
    return {**ready, "model": peft_model, "stamps": stamps, "losses": [float(loss) for loss, _, _ in recorded],
            "tokens": [int(n) for _, n, _ in recorded], "widths": [int(w) for _, _, w in recorded],
            "optimizer": f"transformers optim={args.optim.value if hasattr(args.optim, 'value') else args.optim}",
            "options": "group_by_length" if grouped else "defaults"}


def eval_loss(model: Any, tokenizer: Any, max_len: int, batch_size: int) -> float:
    """Mean next-token cross-entropy on the replies of the held-out records, the same code for every
    engine's trained model: a loss after N steps that does not depend on which batch came last."""
    import torch
    import torch.nn.functional as F

    from benchmarks.training_assets import eval_records
    from common.ml.batching import IGNORE_INDEX, _special_ids, collate, encode_records

    examples, _ = encode_records(tokenizer, eval_records(), max_len)
    _, _, pad_id = _special_ids(tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def _ready() -> dict[str, Any]:
    """Memory once the model, adapter and data are in place; the peak is then measured anew."""
    ready = {"ready_rss_mib": _status_mib("VmRSS:"), "setup_peak_rss_mib": _peak_mib()}
    ready["peak_reset"] = _reset_peak()
    return ready


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine trains one model for spec["steps"] steps; its timings, losses and memory."""
    import torch

    from common.ml.batching import encode_records
    from common.ml.checkpoint import load_checkpoint

    engine, threads = spec["engine"], int(spec["threads"])
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    load_before = os.getloadavg()[0]
    torch.set_num_threads(threads)
    logging.getLogger("cotune.train").setLevel(logging.ERROR)  # long records are cut on purpose
    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(Path(spec["model_dir"]))
    load_s = time.perf_counter() - t0
    records = _records(spec, tokenizer)
    examples, _ = encode_records(tokenizer, records, int(spec["max_len"]))
    if engine.startswith("hf-trainer"):
        figures = _run_hf_trainer(model, tokenizer, examples, spec, grouped=engine == "hf-trainer-grouped")
    else:
        options = spec.get("options")
        figures = _run_cotune(model, tokenizer, records, examples, spec,
                              COTUNE_OPTIONS[engine] if options is None else options)
    train_peak = _peak_mib()  # before scoring, which is no part of training
    trained = figures.pop("model")
    if not spec.get("long"):
        figures["eval_loss"] = eval_loss(trained, tokenizer, int(spec["max_len"]), int(spec["batch_size"]))
    figures.update({
        "engine": engine, "load_s": load_s, "threads": threads, "torch_threads_after": torch.get_num_threads(),
        "train_peak_rss_mib": train_peak if figures["peak_reset"] else None,
        "peak_rss_mib": max(train_peak, figures["setup_peak_rss_mib"]),
        "load_average": [load_before, os.getloadavg()[0]],
    })
    return summarize_run(figures)


def summarize_run(figures: dict[str, Any]) -> dict[str, Any]:
    """Step times from the stamps, and tokens/s over every step but the first (the warm-up)."""
    stamps, tokens = figures["stamps"], figures["tokens"]
    steps = len(figures["losses"])
    if steps < 2 or len(stamps) != steps or len(tokens) != steps:
        raise RuntimeError(f"{figures.get('engine')}: {steps} losses, {len(stamps)} step stamps and {len(tokens)} "
                           "token counts; need at least 2 steps, one stamp and count per step")
    durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    timed_tokens = sum(tokens[1:])
    figures.update({
        "steps": steps, "step_s": statistics.median(durations),
        "tokens_per_s": timed_tokens / (stamps[-1] - stamps[0]),
        "tokens_per_step": sum(tokens) / steps,
        "padding_fraction": 1 - sum(tokens) / sum(figures["widths"]),
    })
    return figures
