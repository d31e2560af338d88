"""Tiny causal LMs built from a config (no download), HF checkpoints on disk, and the
full-parameter pretraining that makes a tiny "LLM" arrive already knowing something.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.ml.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_hf_tokenizer, save_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from common.records import TaskRecord

ARCHS = ("llama", "qwen2", "gpt2")
# hidden, layers, heads, intermediate (about 8/3 x hidden for gated MLPs, rounded to 16).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 176),
    "small": (128, 2, 4, 352),
    "base": (192, 4, 4, 512),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer_dir_or_obj: Any,
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write an HF checkpoint dir (config.json, model.safetensors, tokenizer files).

    Written to a sibling temp dir then renamed into place, so `out_dir` is either the old
    checkpoint or the complete new one. `tokenizer_dir_or_obj` is a directory holding
    tokenizer files, a `tokenizers.Tokenizer` or a transformers tokenizer.
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            "save_checkpoint takes a base model; merge the adapter first "
            "(peft_model.merge_and_unload()) or save the adapter with common.ml.lora."
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if isinstance(tokenizer_dir_or_obj, (str, os.PathLike)):
            src = Path(tokenizer_dir_or_obj)
            if not (src / "tokenizer.json").is_file():
                raise ValueError(f"{src}: no tokenizer.json to copy into the checkpoint")
            for name in _TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        else:
            save_tokenizer(tokenizer_dir_or_obj, tmp)
        if out.exists():
            # Directories cannot be os.replace'd over a non-empty one: swap via a backup.
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            backup.rmdir()
            os.rename(out, backup)
            os.rename(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_checkpoint(dir: str | os.PathLike[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load (model in float32 eval mode, tokenizer) from an HF checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(dir)
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; is this an HF checkpoint directory?")
    if not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(
            f"{path}: no model.safetensors; only safetensors weights are loaded (never pickle). "
            "Re-save the model with save_pretrained(..., safe_serialization=True)."
        )
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: no tokenizer.json; save the tokenizer into the checkpoint")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    return model.eval(), load_hf_tokenizer(path)


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
    from common.ml.train import _run_sft

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if hasattr(model, "peft_config"):
        raise ValueError("pretrain takes a base model, not a peft model")
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    return _run_sft(
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
