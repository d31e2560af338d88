"""llama.cpp must split text exactly as the HF tokenizer does, for every tokenizer family we write."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.test_export_support import CORPUS, train_bpe_tokenizer

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def sample_texts() -> list[str]:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 \t\n.,;:!?'\"()-_/#é中🙂"
    texts = [*CORPUS, "Hello world", "", " ", "  two leading", "trailing  ", "a\n\n\nb", "x" * 200,
             "it's they're I'LL WE'VE", "12345678901234567890", "tab\tseparated\tvalues\n", "emoji 🙂🚀🙂",
             "\u00a0non-breaking\u200bzero-width", "mixed 中文 and English words", "<bos> inside text"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(150)]
    return texts


def gguf_for(tok_dir: Path, out: Path) -> Path:
    """A tiny llama GGUF carrying the tokenizer in `tok_dir` (only its vocabulary matters here)."""
    from common.ml.tokenizer import load_hf_tokenizer
    from cotune.demo.tiny import build_tiny_model
    from export.gguf_tokenizer import vocab_from_tokenizer
    from export.gguf_writer import write_gguf

    hf = load_hf_tokenizer(tok_dir)
    model = build_tiny_model("llama", "tiny", vocab_size=len(hf))
    vocab = vocab_from_tokenizer(tok_dir / "tokenizer.json", hf, len(hf))
    return write_gguf(model, vocab, out, dtype="f32")


def mismatches(tok_dir: Path, gguf_path: Path) -> list[tuple[str, list[int], list[int]]]:
    import llama_cpp

    from common.ml.tokenizer import load_hf_tokenizer

    hf = load_hf_tokenizer(tok_dir)
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    bad = []
    for text in sample_texts():
        want = hf(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if got != want:
            bad.append((text, want, got))
    llm.close()
    return bad


def save(tok: Any, tok_dir: Path) -> Path:
    from common.ml.tokenizer import save_tokenizer

    save_tokenizer(tok, tok_dir)
    return tok_dir


def test_project_bpe_tokenizer_splits_like_hf(tmp_path: Path) -> None:
    tok_dir = save(train_bpe_tokenizer(512), tmp_path / "tok")
    path = gguf_for(tok_dir, tmp_path / "m.gguf")
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert mismatches(tok_dir, path) == []


def test_byte_level_bpe_flagged_byte_fallback_stays_byte_level(tmp_path: Path) -> None:
    # transformers sets byte_fallback on the byte-level tokenizers it rebuilds from a GGUF (SmolLM2's).
    tok_dir = save(train_bpe_tokenizer(512), tmp_path / "tok")
    raw = json.loads((tok_dir / "tokenizer.json").read_text())
    raw["model"]["byte_fallback"] = True
    (tok_dir / "tokenizer.json").write_text(json.dumps(raw))
    path = gguf_for(tok_dir, tmp_path / "m.gguf")
    from gguf import GGUFReader

    assert GGUFReader(str(path)).fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert mismatches(tok_dir, path) == []


def test_qwen2_style_split_regex_maps_to_llama_cpp_qwen2(tmp_path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok_dir = save(tok, tmp_path / "tok")
    path = gguf_for(tok_dir, tmp_path / "m.gguf")
    from gguf import GGUFReader

    assert GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert mismatches(tok_dir, path) == []


def sentencepiece_style_tokenizer() -> Any:
    """A Gemma/Llama-2-style BPE: spaces become U+2581, no pre-splitting, byte fallback to <0xXX> tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer_tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], show_progress=False))
    data = json.loads(trainer_tok.to_str())
    vocab: dict[str, int] = {}
    for token in ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[token] = len(vocab)
    for token, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tok


def test_sentencepiece_style_bpe_maps_to_llama_cpp_spm(tmp_path: Path) -> None:
    tok_dir = save(sentencepiece_style_tokenizer(), tmp_path / "tok")
    path = gguf_for(tok_dir, tmp_path / "m.gguf")
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert mismatches(tok_dir, path) == []


def test_unknown_regex_and_unigram_are_refused(tmp_path: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from common.ml.tokenizer import load_hf_tokenizer
    from export.errors import UnsupportedModelError
    from export.gguf_tokenizer import vocab_from_tokenizer

    tok = train_bpe_tokenizer(300)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|\W"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok_dir = save(tok, tmp_path / "regex")
    with pytest.raises(UnsupportedModelError, match="regex"):
        vocab_from_tokenizer(tok_dir / "tokenizer.json", load_hf_tokenizer(tok_dir), 512)

    uni = Tokenizer(models.Unigram([("<pad>", 0.0), ("<bos>", 0.0), ("<eos>", 0.0), ("<unk>", 0.0), ("a", -1.0)],
                                   unk_id=3))
    uni_dir = save(uni, tmp_path / "unigram")
    with pytest.raises(UnsupportedModelError, match="Unigram"):
        vocab_from_tokenizer(uni_dir / "tokenizer.json", load_hf_tokenizer(uni_dir), 512)


def test_vocab_is_padded_to_the_embedding_rows(tmp_path: Path) -> None:
    from common.ml.tokenizer import load_hf_tokenizer
    from export.errors import UnsupportedModelError
    from export.gguf_tokenizer import UNUSED, vocab_from_tokenizer

    tok_dir = save(train_bpe_tokenizer(300), tmp_path / "tok")
    hf = load_hf_tokenizer(tok_dir)
    vocab = vocab_from_tokenizer(tok_dir / "tokenizer.json", hf, len(hf) + 7)
    assert len(vocab.tokens) == len(hf) + 7
    assert vocab.token_types[-7:] == [UNUSED] * 7
    assert vocab.add_bos and not vocab.add_eos and vocab.bos_id == 1
    with pytest.raises(UnsupportedModelError, match="embedding rows"):
        vocab_from_tokenizer(tok_dir / "tokenizer.json", hf, len(hf) - 1)
