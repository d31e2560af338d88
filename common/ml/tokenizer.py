"""A byte-level BPE tokenizer trained on the project's own text (no hub download).

Special tokens have fixed ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, matching the tiny
model configs. The saved tokenizer.json adds <bos> in front of every encoded text, so a
device that only has the `tokenizers` library encodes prompts exactly as training did.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer; every byte is in the alphabet, so any text encodes.

    The vocabulary may end up smaller than `vocab_size` when the text has too few merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID, UNK_ID), strict=True):
        if tok.token_to_id(token) != expected:  # pragma: no cover - guards a library change
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, expected {expected}")
    # trim_offsets=False keeps byte offsets exact; the template adds <bos> like training.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def _wrap(tok: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        # Causal LMs take no token_type_ids; returning them breaks `model(**batch)`.
        model_input_names=["input_ids", "attention_mask"],
    )
    return hf


def save_tokenizer(
    tok: tokenizers.Tokenizer | PreTrainedTokenizerFast, dir: str | os.PathLike[str],
    chat_template: str | None = None,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `dir`.

    `transformers.AutoTokenizer.from_pretrained(dir)` then loads it with pad/bos/eos set.
    A chat template (given here, or the tokenizer's own) is kept in tokenizer_config.json rather
    than in a chat_template.jinja beside it, so that every copy of the tokenizer files carries it.
    """
    from transformers import PreTrainedTokenizerBase

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = tok if isinstance(tok, PreTrainedTokenizerBase) else _wrap(tok)
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(str(out), save_jinja_files=False)
    return out


def load_hf_tokenizer(dir: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer for batched generation: pad/bos/eos set, left padding."""
    from transformers import PreTrainedTokenizerFast

    path = Path(dir)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(
            f"{path}: no tokenizer.json; save one with common.ml.tokenizer.save_tokenizer "
            "or pass the directory of an HF checkpoint that includes its tokenizer."
        )
    hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    # A checkpoint saved by other tools may lack some specials: fall back to ours.
    vocab = hf.get_vocab()
    if hf.eos_token is None and EOS in vocab:
        hf.eos_token = EOS
    if hf.bos_token is None and BOS in vocab:
        hf.bos_token = BOS
    if hf.pad_token is None:
        hf.pad_token = PAD if PAD in vocab else hf.eos_token
    if hf.pad_token is None or hf.eos_token is None:
        raise ValueError(f"{path}: the tokenizer defines no eos/pad token; cannot generate")
    hf.padding_side = "left"
    return hf
