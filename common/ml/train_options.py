"""Opt-in speed and memory optimizations of the SFT loop (common.ml.train.run_sft).

Each is off by default, and with all of them off the loop computes exactly what it always has
(same batches, same optimizer, same loss), so released adapters and digests do not move. Turned
on, each one keeps the loss the same function of the weights but may round differently:

- `bucket_window`: length bucketing (common.ml.batching.bucket_batches), less padding per batch;
  the batches hold the same examples, in a different grouping and order.
- `optimizer`: torch's multi-tensor ("foreach") or fused AdamW instead of its per-tensor loop,
  and the multi-tensor gradient norm; the same update rule, fewer kernel launches.
- `labelled_logits`: the output head runs only at positions whose next token is trained (the
  reply), not at every prompt and padding position; for a 262k-word vocabulary (Gemma) that is
  most of the forward pass and most of its memory.
- `loss_chunk`: the head and the cross-entropy run over that many positions at a time and are
  recomputed in the backward pass, so one chunk's logits are in memory instead of all of them.
- `gradient_checkpointing`: each decoder layer's activations are recomputed in the backward pass
  instead of kept (transformers' own), trading about a third more compute for memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from common.ml.batching import IGNORE_INDEX

Optimizer = Literal["default", "foreach", "fused"]
OPTIMIZERS: tuple[str, ...] = ("default", "foreach", "fused")

# Families whose causal-LM head is `lm_head(decoder(...).last_hidden_state)`, optionally followed
# by Gemma's final logit soft-capping: the loss may then run the head itself, on chosen positions.
_HEAD_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gpt2",
                            "smollm3", "phi3", "olmo2"})


@dataclass(frozen=True)
class TrainOptions:
    """Opt-in optimizations of the SFT loop; the defaults are the loop as it always ran."""

    bucket_window: int | None = None  # batches pooled and sorted by length at a time
    optimizer: Optimizer = "default"  # AdamW implementation: default (torch's per-tensor loop), foreach, fused
    labelled_logits: bool = False  # the head only where the next token is trained
    loss_chunk: int | None = None  # head + loss over this many positions at a time, recomputed in backward
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward

    def __post_init__(self) -> None:
        if self.bucket_window is not None and self.bucket_window < 1:
            raise ValueError(f"bucket_window must be >= 1 batch (or None for no bucketing), got {self.bucket_window}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 position (or None for one piece), got {self.loss_chunk}")

    @classmethod
    def from_spec(cls, spec: Any) -> TrainOptions:
        """The options a TrainSpec asks for: its fields of these names where it has them (a spec
        without them, as every spec so far, gives the defaults)."""
        return cls(**{name: getattr(spec, name) for name in cls.__dataclass_fields__ if hasattr(spec, name)})

    @property
    def default_loss(self) -> bool:
        """Whether the loss is computed the original way (full logits, then cross-entropy)."""
        return not self.labelled_logits and self.loss_chunk is None

    def describe(self) -> str:
        """A short label of what is on, e.g. 'bucket 8, fused AdamW, labelled logits'."""
        parts = []
        if self.bucket_window is not None:
            parts.append(f"bucket {self.bucket_window}")
        if self.optimizer != "default":
            parts.append(f"{self.optimizer} AdamW")
        if self.labelled_logits:
            parts.append("labelled logits")
        if self.loss_chunk is not None:
            parts.append(f"loss chunks of {self.loss_chunk}")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        return ", ".join(parts) or "defaults"


def adamw(params: Sequence[Any], lr: float, implementation: str = "default") -> Any:
    """AdamW without weight decay; `implementation` 'default' is torch's own choice, as always."""
    import torch

    if implementation == "default":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if implementation not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {implementation!r}")
    flag = {"foreach": True} if implementation == "foreach" else {"fused": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **flag)


@contextlib.contextmanager
def gradient_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """transformers' gradient checkpointing on `model` (a peft or HF model) for the block, off after."""
    if not enabled:
        yield
        return
    base = _base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; "
                         "leave gradient_checkpointing off for this model")
    # Non-reentrant: no need for the inputs to require grad, and LoRA weights inside a layer get theirs.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        base.gradient_checkpointing_disable()


def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder body, output head, final logit soft-cap) of a causal LM the loss can run the head of."""
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in _HEAD_FAMILIES:
        raise ValueError(f"labelled_logits and loss_chunk run the output head themselves, which is known to be "
                         f"right for {', '.join(sorted(_HEAD_FAMILIES))}, not for {model_type!r}; "
                         "leave them off for this model")
    decoder = base.transformer if model_type == "gpt2" else base.model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return decoder, base.get_output_embeddings(), softcap


def _head_ce_sum(hidden: Any, targets: Any, head: Any, softcap: float | None) -> Any:
    """Summed cross-entropy of the head's logits at these positions (ignored targets add 0)."""
    import torch
    import torch.nn.functional as F

    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def batch_loss(model: Any, tensors: dict[str, Any], options: TrainOptions) -> Any:
    """The mean next-token cross-entropy over trained positions, as common.ml.train._response_ce,
    with the head run only where needed and, with `loss_chunk`, a chunk of positions at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    decoder, head, softcap = decoder_and_head(model)
    labels = tensors["labels"]
    # The logits at position t predict token t+1: keep the positions whose next token is trained in any row.
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    targets = labels[:, keep + 1]
    hidden = decoder(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                     use_cache=False).last_hidden_state[:, keep, :]
    count = (targets != IGNORE_INDEX).sum()
    if options.loss_chunk is None:
        total = _head_ce_sum(hidden, targets, head, softcap)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, keep.numel(), options.loss_chunk):
            end = start + options.loss_chunk
            # Recomputed in backward: only one chunk's logits live at a time.
            total = total + checkpoint(_head_ce_sum, hidden[:, start:end], targets[:, start:end], head, softcap,
                                       use_reentrant=False)
    return total / count
