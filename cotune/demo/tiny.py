"""Tiny causal LMs built from a config (no download), and the full-parameter pretraining
that makes a tiny "LLM" arrive already knowing something: the demo's and the tests' models.

No hub is reachable where the demo runs, so its models are made here; the device and the
server only ever load checkpoints (common.ml.checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.ml.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from common.records import TaskRecord

ARCHS = ("llama", "qwen2", "gpt2")
# hidden, layers, heads, intermediate (about 8/3 x hidden for gated MLPs, rounded to 16).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 176),
    "small": (128, 2, 4, 352),
    "base": (192, 4, 4, 512),
}


def build_tiny_model(
    arch: str = "llama",
    size: str = "small",
    vocab_size: int = 1024,
    seed: int = 0,
    max_positions: int = 128,
) -> PreTrainedModel:
    """A randomly initialised causal LM (seeded), pad/bos/eos ids 0/1/2, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    hidden, layers, heads, intermediate = SIZES[size]
    ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if arch == "gpt2":
        config: Any = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=4 * hidden,
            # No dropout: these models are tiny and training runs must be reproducible.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    else:
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = config_cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **ids,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def pretrain(
    model: PreTrainedModel,
    tokenizer: Any,
    records: Sequence[TaskRecord],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    max_len: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Full-parameter SFT for exactly `steps` batches (warmup + cosine learning rate).

    Same format and response-only loss as LoRA training. Returns {"steps", "loss_first",
    "loss_last", "loss_mean", "num_samples", "seconds"}; leaves the model in eval mode.
    """
    from common.ml.train import run_sft

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if hasattr(model, "peft_config"):
        raise ValueError("pretrain takes a base model, not a peft model")
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    return run_sft(
        model,
        tokenizer,
        records,
        params,
        lr=lr,
        batch_size=batch_size,
        max_len=max_len,
        seed=seed,
        epochs=None,
        max_steps=steps,
        progress=progress,
        warmup_cosine=True,
        desc="pretrain",
    )
