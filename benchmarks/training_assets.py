"""What the training benchmark trains: each model's checkpoint, its settings, and the records.

- tiny: the demo's device SLM (llama-shaped, "tiny" size, cotune.demo.tiny) with its random
  init, and a byte-level BPE tokenizer trained on the demo world's text, as the demo builds them;
  made once and cached under $COTUNE_CACHE/bench.
- gemma: Gemma 3 270M, the checkpoint export.gemma converts once from the packaged GGUF and
  caches (`gemma3-270m-hf`); several minutes the first time, then reused.

Records are the demo world's synthetic client records (cotune.demo.synthetic), rendered by each
model's chat template exactly as a device's training renders them (common.ml.batching).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cache import cache_root

if TYPE_CHECKING:
    from common.records import TaskRecord

# Bump when the tiny checkpoint's recipe changes, so a stale cache is not reused.
ASSET_VERSION = "1"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORLD_SEED = 0
WORLD_CLIENTS = 2


@dataclass(frozen=True)
class Preset:
    """One model's training settings: the same for every engine."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    lr: float
    batch_size: int
    max_len: int
    steps: int
    dropout: float = 0.0


PRESETS: dict[str, Preset] = {
    # The quickstart's device training (cotune/demo/quickstart.py): LoRA on every linear layer.
    "tiny": Preset(r=16, alpha=32.0, target_modules=ALL_LINEAR, lr=5e-3, batch_size=16, max_len=48, steps=50),
    "gemma": Preset(r=16, alpha=32.0, target_modules=ALL_LINEAR, lr=5e-4, batch_size=8, max_len=128, steps=20),
}


def tiny_train_checkpoint() -> Path:
    """The demo's device SLM shape with its seeded random init and the demo world's tokenizer."""
    out = cache_root() / "bench" / f"train-tiny-v{ASSET_VERSION}" / "hf"
    if (out / "model.safetensors").is_file():
        return out
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import train_tokenizer
    from cotune.demo.synthetic import all_text
    from cotune.demo.tiny import build_tiny_model
    from cotune.demo.world import SLM, VOCAB_SIZE

    tokenizer = train_tokenizer(all_text(_suite()), vocab_size=VOCAB_SIZE)
    # The demo's SLM seed (world seed + 1); room for the memory search's long sequences.
    model = build_tiny_model(SLM["arch"], SLM["size"], vocab_size=VOCAB_SIZE, seed=WORLD_SEED + 1, max_positions=2048)
    return save_checkpoint(model, tokenizer, out)


def checkpoint(key: str, log: Callable[[str], None] = print) -> Path:
    """The model's HF checkpoint directory, made once and cached."""
    if key == "tiny":
        return tiny_train_checkpoint()
    if key == "gemma":
        from export.gemma import gemma_checkpoint

        log("Gemma 3 270M checkpoint from export.gemma (converted once, then cached)")
        return gemma_checkpoint()
    raise ValueError(f"unknown model {key!r}; choose from {', '.join(PRESETS)}")


def _suite() -> Any:
    from cotune.demo.synthetic import make_suite

    return make_suite(num_clients=WORLD_CLIENTS, seed=WORLD_SEED)


def train_records() -> list[TaskRecord]:
    """Every client's training records of the demo world: what the devices train on."""
    return [record for client in _suite().clients for record in client]


def eval_records(count: int = 64) -> list[TaskRecord]:
    """Held-out records (the clients' test splits) every engine's adapter is scored on after training."""
    return [record for client in _suite().client_tests for record in client][:count]


def long_records(tokenizer: Any, max_len: int, count: int = 8) -> list[TaskRecord]:
    """Records whose rendered text is longer than `max_len` tokens, each cut to exactly max_len by
    encoding: one client prompt and, as its reply, many replies joined. For memory at a length."""
    from common.ml.batching import encode_record
    from common.records import TaskRecord

    base = train_records()
    out = []
    for i in range(count):
        n = 16
        while True:
            reply = " ".join(base[(i + k) % len(base)].response for k in range(n))
            record = TaskRecord(prompt=base[i].prompt, response=reply, domain=base[i].domain)
            example, cut = encode_record(tokenizer, record, max_len)
            if example is None:
                raise ValueError(f"max_len={max_len} leaves no room for a reply after the prompt; search longer "
                                 "sequence lengths")
            if cut:
                break
            n *= 2
        out.append(record)
    return out
