"""Tokenizer metadata for GGUF, so that llama.cpp splits text exactly as the HF tokenizer does.

Two families are understood, read from tokenizer.json:

- byte-level BPE (GPT-2 style, the project's own tokenizer, Qwen2, Llama 3): llama.cpp's
  "gpt2" vocabulary with the merges, and a pre-tokenizer name (`tokenizer.ggml.pre`) whose
  regex is the one the HF pre-tokenizer uses. An unknown regex is refused, never guessed.
- SentencePiece-style BPE with byte fallback (Gemma, Llama 2): llama.cpp's "llama"
  vocabulary, which merges by token score; scores are derived from the merge order.

`tokenizer_json_from_gguf` goes the other way for SentencePiece vocabularies (Gemma's GGUF),
building the BPE tokenizer.json that tokenizes as llama.cpp does.

The vocabulary also carries the chat template the model is trained and served with
(common.chat: the tokenizer's own, else the declared default), written as `tokenizer.chat_template`
so that llama.cpp, `cotune edge serve` and other GGUF runtimes format chats as training did.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import UnsupportedModelError

if TYPE_CHECKING:
    from gguf import GGUFWriter

# Token types (gguf.TokenType), repeated here so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# gguf-py's metadata key names (gguf.Keys.Tokenizer) this module writes by name.
GGUF_KEYS = {"chat_template": "tokenizer.chat_template"}

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF Split regexes of known byte-level tokenizers -> llama.cpp pre-tokenizer names.
SPLIT_REGEXES: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
     r"\s+(?!\S)|\s+"): "llama-bpe",
    GPT2_REGEX: "gpt-2",
}


@dataclass
class GGUFVocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None = None


def _byte_level_pre(pre: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer name for an HF byte-level pre-tokenizer config."""
    if pre is None:
        raise UnsupportedModelError("byte-level BPE tokenizer without a pre-tokenizer: llama.cpp has no match")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise UnsupportedModelError("ByteLevel(add_prefix_space=True) has no llama.cpp pre-tokenizer")
        if pre.get("use_regex", True):
            return "gpt-2"
        raise UnsupportedModelError("ByteLevel(use_regex=False) alone has no llama.cpp pre-tokenizer")
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex in SPLIT_REGEXES:
                return SPLIT_REGEXES[regex]
            raise UnsupportedModelError(
                f"the tokenizer splits text with regex {regex!r}, which matches no llama.cpp pre-tokenizer; "
                "llama.cpp would split text differently, so no GGUF is written")
    raise UnsupportedModelError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent")


def _spm_settings(tok: dict[str, Any]) -> bool:
    """add_space_prefix for a SentencePiece-style tokenizer.json; UnsupportedModelError when it is not one."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else ([norm] if norm else [])
    kinds = [s.get("type") for s in steps]
    replace_ok = any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " "
                     and s.get("content") == "\u2581" for s in steps)
    prepend = any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps)
    if replace_ok and set(kinds) <= {"Replace", "Prepend"}:
        # After the normalizer there are no spaces left: a Split on " " changes nothing.
        noop_split = (pre is None or (pre.get("type") == "Split" and pre.get("pattern", {}).get("String") == " "))
        if noop_split:
            return prepend
    if (norm is None and pre is not None and pre.get("type") == "Metaspace" and not pre.get("split", True)
            and pre.get("replacement") == "\u2581"):
        return pre.get("prepend_scheme", "always") != "never"
    raise UnsupportedModelError(
        "the tokenizer is a byte-fallback BPE but its normalizer/pre-tokenizer are not SentencePiece's "
        "(replace ' ' with U+2581, optional prefix); llama.cpp cannot reproduce it")


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _special_ids(hf_tokenizer: Any) -> tuple[int | None, int | None, int | None, int | None, bool, bool]:
    bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    unk, pad = hf_tokenizer.unk_token_id, hf_tokenizer.pad_token_id
    ids = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = hf_tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos
    add_eos = eos is not None and len(ids) > len(plain) and ids[-1] == eos
    if len(ids) - len(plain) != int(add_bos) + int(add_eos):
        raise UnsupportedModelError("the tokenizer adds special tokens other than bos/eos around a text; "
                                    "llama.cpp can only add bos and eos")
    return bos, eos, unk, pad, add_bos, add_eos


def vocab_from_tokenizer(tokenizer_file: Path, hf_tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary for a tokenizer.json, padded to the model's embedding rows, with the
    model's chat template (common.chat.chat_template_for)."""
    from common.chat import chat_template_for

    tok = json.loads(Path(tokenizer_file).read_text())
    model = tok.get("model", {})
    kind = model.get("type")
    if kind == "Unigram":
        raise UnsupportedModelError(
            f"{tokenizer_file}: a Unigram tokenizer; llama.cpp's SentencePiece vocabulary merges by score (BPE) and "
            "would split text differently. For a checkpoint converted from a GGUF (e.g. Gemma), rebuild its "
            "tokenizer.json with export.gguf_tokenizer.tokenizer_json_from_gguf")
    if kind != "BPE":
        raise UnsupportedModelError(f"{tokenizer_file}: {kind} tokenizers have no GGUF form here (BPE only)")
    vocab: dict[str, int] = model["vocab"]
    merges = _merge_strings(model.get("merges", []))
    added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    size = max([*vocab.values(), *added, -1]) + 1
    if size > vocab_size:
        raise UnsupportedModelError(f"{tokenizer_file}: the tokenizer has {size} tokens but the model only "
                                    f"{vocab_size} embedding rows; they do not belong together")
    tokens = [""] * vocab_size
    types = [UNUSED] * vocab_size
    for text, idx in vocab.items():
        tokens[idx], types[idx] = text, NORMAL
    for idx, t in added.items():
        tokens[idx] = t["content"]
        types[idx] = CONTROL if t.get("special") else USER_DEFINED
    for idx in range(vocab_size):
        if not tokens[idx]:
            tokens[idx] = f"[PAD{idx}]"  # embedding rows no token maps to
    bos, eos, unk, pad, add_bos, add_eos = _special_ids(hf_tokenizer)

    # A byte-level BPE has a token for every byte, so its byte_fallback flag (set on tokenizers that
    # transformers rebuilt from a GGUF, SmolLM2's among them) never fires: it stays a byte-level BPE.
    byte_level = (tok.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("byte_fallback") and not byte_level:
        add_space_prefix = _spm_settings(tok)
        for idx, text in enumerate(tokens):
            if types[idx] == NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[idx] = BYTE
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest:
        # scoring each token by minus the rank of the first merge that makes it keeps HF's merge order.
        scores = [0.0] * vocab_size
        made: set[str] = set()
        for rank, merge in enumerate(merges):
            left, _, right = merge.partition(" ")
            result = left + right
            if result in vocab and result not in made:
                made.add(result)
                scores[vocab[result]] = -float(rank + 1)
        return GGUFVocab("llama", "default", tokens, types, scores, None, bos, eos, unk, pad, add_bos, add_eos,
                         add_space_prefix, chat_template_for(hf_tokenizer).source)

    if not byte_level:
        raise UnsupportedModelError(f"{tokenizer_file}: a BPE tokenizer that is neither byte-level nor "
                                    "byte-fallback (SentencePiece); llama.cpp cannot reproduce it")
    norm = tok.get("normalizer")
    if norm is not None:
        if norm.get("type") != "NFC":
            raise UnsupportedModelError(f"{tokenizer_file}: normalizer {norm.get('type')} has no llama.cpp match")
        warnings.warn("the tokenizer NFC-normalizes text and llama.cpp does not: text that is not already NFC "
                      "may tokenize differently", stacklevel=2)
    if model.get("ignore_merges"):
        raise UnsupportedModelError(f"{tokenizer_file}: ignore_merges BPE has no llama.cpp match")
    pre = _byte_level_pre(tok.get("pre_tokenizer"))
    return GGUFVocab("gpt2", pre, tokens, types, None, merges, bos, eos, unk, pad, add_bos, add_eos, False,
                     chat_template_for(hf_tokenizer).source)


def add_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    """Write the tokenizer.ggml.* keys, and tokenizer.chat_template when the vocabulary has one."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for setter, value in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_unk_token_id, vocab.unk_id), (writer.add_pad_token_id, vocab.pad_id)):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_string(GGUF_KEYS["chat_template"], vocab.chat_template)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_json_from_gguf(gguf_path: Path) -> dict[str, Any]:
    """A BPE + byte-fallback tokenizer.json equal in behaviour to a GGUF's SentencePiece ("llama") vocabulary.

    SentencePiece BPE merges the adjacent pair whose merged piece has the highest score; the
    same order as an HF merge list makes HF's BPE split text identically. (transformers'
    own GGUF loader builds a Unigram model from these scores, which splits differently.)
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise UnsupportedModelError(f"{gguf_path}: only SentencePiece ('llama') GGUF vocabularies convert here")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    scores: list[float] = [float(s) for s in _field(reader, "tokenizer.ggml.scores")]
    types: list[int] = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    candidates: list[tuple[float, int, str, str]] = []
    for text, idx in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                candidates.append((-scores[idx], idx, left, right))
    candidates.sort()
    merges = [[left, right] for _, _, left, right in candidates]
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": types[i] == CONTROL}
        for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)
    ]
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    normalizers: list[dict[str, Any]] = [{"type": "Prepend", "prepend": "\u2581"}] if prefix else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    single: list[dict[str, Any]] = []
    specials: dict[str, Any] = {}
    for flag, idx in ((add_bos, bos), (add_eos, eos)):
        if flag and idx is not None:
            specials[tokens[idx]] = {"id": tokens[idx], "ids": [int(idx)], "tokens": [tokens[idx]]}
    if add_bos and bos is not None:
        single.append({"SpecialToken": {"id": tokens[bos], "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if add_eos and eos is not None:
        single.append({"SpecialToken": {"id": tokens[eos], "type_id": 0}})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": single,
                           "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": specials},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
