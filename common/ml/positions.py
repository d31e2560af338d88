"""Logits at chosen positions, for the distillation losses (common.ml.mutual, cloud.training.distill).

By default a model's head runs at every position but the last, as `model(...).logits[:, :-1]`.
With `labelled_logits` it runs only at the positions whose next token is trained (the reply):
the CE and the KD terms are masked to those positions anyway, so the loss is the same function
of the weights, and for a 262k-word vocabulary (Gemma) the head at the other positions is most
of the forward pass and most of its memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.ml.batching import IGNORE_INDEX
from common.ml.train_options import decoder_and_head

if TYPE_CHECKING:
    import torch


def kept_positions(labels: torch.Tensor, labelled_only: bool) -> torch.Tensor | None:
    """Positions the head runs at: None for all but the last; else those whose next token is
    trained in any row of the batch."""
    if not labelled_only:
        return None
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def position_logits(model: Any, batch: dict[str, Any], keep: torch.Tensor | None) -> torch.Tensor:
    """(B, K, V) logits predicting the token after each kept position (K = len(keep), or T - 1)."""
    import torch

    if keep is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    decoder, head, softcap = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state[:, keep.to(batch["input_ids"].device), :]
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def next_labels(labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The label of the token each kept position predicts (IGNORE_INDEX where untrained)."""
    return labels[:, 1:] if keep is None else labels[:, keep.to(labels.device) + 1]


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, K, V) logits against (B, K) next-token labels, over trained ones;
    a graph-connected zero when none is trained (cross_entropy over no label would be NaN)."""
    import torch.nn.functional as F

    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
