"""Helpers for the export tests (no tests here): tiny checkpoints, tokenizers and adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.",
    "To make a cup of tea, first boil the water, then pour it over the leaves and wait three minutes.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Translate to French: good morning -> bonjour; thank you -> merci; good night -> bonne nuit.",
    "I'm sure they'll say it's 3.14159 or 1e-9; won't they? We've seen 42 of them.",
    "A computer stores numbers in binary: each bit is zero or one, and eight bits make a byte.",
    "The river wound slowly through the valley, past fields of wheat and the old stone mill.",
    "Good morning! Could you tell me the way to the train station? Turn left at the bakery.",
    "Ünïcödé text — émojis 🙂 and 中文 appear now and then\tbetween tabs  and  double spaces.",
]


def train_bpe_tokenizer(vocab_size: int = 512) -> Any:
    """The project's byte-level BPE tokenizer (common.ml.tokenizer) trained on CORPUS."""
    from common.ml.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 20, vocab_size=vocab_size)


def tiny_checkpoint(root: Path, arch: str = "llama", *, vocab_size: int = 512, seed: int = 0,
                    config: dict[str, Any] | None = None, name: str | None = None) -> Path:
    """A random tiny causal LM + our tokenizer saved as an HF checkpoint; `config` builds a custom shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from common.ml.checkpoint import save_checkpoint
    from cotune.demo.tiny import build_tiny_model

    if config is None:
        model = build_tiny_model(arch, "tiny", vocab_size=vocab_size, seed=seed)
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        cfg = cls(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                  **config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tok = train_bpe_tokenizer(vocab_size)
    return save_checkpoint(model, tok, root / (name or f"{arch}-base"))


def tiny_adapter(checkpoint: Path, out: Path, *, r: int = 4, targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"), scale: float = 0.05, seed: int = 0) -> tuple[Path, Any]:
    """A cotune adapter file for `checkpoint` with non-zero B (so merging changes the model), and its LoraSpec."""
    import torch

    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
    from common.protocol import LoraSpec

    model, _ = load_checkpoint(checkpoint)
    spec = LoraSpec(r=r, alpha=2.0 * r, target_modules=list(targets))
    peft_model = attach_lora(model, spec, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(adapter_to_bytes(adapter_state(peft_model)))
    return out, spec


LOOSE_4BIT = {"min_top1_4bit": 0.0, "max_ppl_change_4bit": 10.0}
