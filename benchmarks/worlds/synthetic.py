"""The synthetic track's world: the data of benchmarks.worlds.synthetic_data written as JSONL, two
tokenizers trained on everything but the test split, a pretrained tiny LLM that knows most of
every domain's words in dictionary form, and SLMs that know the task's format in a public
language only (ARCHITECTURE.md, "Quality benchmark").

Devices' own SLMs (heterogeneous methods), one per device: llama-tiny (the shared SLM),
gpt2-tiny with a tokenizer of its own (so Co-PLMs' vocabulary alignment runs), qwen2-small and
llama-small. Every model is pretrained once per world seed and recipe and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from benchmarks.worlds.base import N_DEVICES, World
from benchmarks.worlds.synthetic_data import DOMAINS, SyntheticData, make_data, tokenizer_text
from common.dirs import staging_dir
from common.records import TaskRecord, write_jsonl

VERSION = "synthetic-world-3"
VOCAB, OTHER_VOCAB = 1024, 800
MAX_LEN = 64
LLM = {"arch": "llama", "size": "base", "steps": 600, "lr": 3e-3, "batch_size": 32}
SLM = {"steps": 150, "lr": 3e-3, "batch_size": 32}
# Per device: (arch, size, own tokenizer?). Device 0's is the shared SLM itself.
HET = (("llama", "tiny", False), ("gpt2", "tiny", True), ("qwen2", "small", False), ("llama", "small", False))
MAX_NEW_TOKENS = 20


def _key(seed: int, scale: float, steps_scale: float) -> str:
    payload = {"v": VERSION, "seed": seed, "scale": scale, "llm": LLM, "slm": SLM, "het": HET,
               "vocab": [VOCAB, OTHER_VOCAB], "max_len": MAX_LEN}
    if steps_scale != 1.0:
        payload["steps"] = steps_scale
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _pretrained(arch: str, size: str, tok_dir: Path, records: list[TaskRecord], recipe: dict[str, Any], seed: int,
                out: Path, progress: bool, steps_scale: float) -> dict[str, Any]:
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import load_hf_tokenizer
    from cotune.demo.tiny import build_tiny_model, pretrain

    tok = load_hf_tokenizer(tok_dir)
    model = build_tiny_model(arch, size, len(tok), seed=seed)
    report = pretrain(model, tok, records, steps=max(1, round(recipe["steps"] * steps_scale)), lr=recipe["lr"],
                      batch_size=recipe["batch_size"], max_len=MAX_LEN, seed=seed, progress=progress)
    save_checkpoint(model, tok_dir, out)
    return {"arch": arch, "size": size, "params": sum(p.numel() for p in model.parameters()),
            "loss_last": report.get("loss_last"), "seconds": report.get("seconds")}


def _build_models(data: SyntheticData, root: Path, seed: int, progress: bool, steps_scale: float) -> dict[str, Any]:
    from common.ml.tokenizer import save_tokenizer, train_tokenizer

    text = tokenizer_text(data)
    tok = save_tokenizer(train_tokenizer(text, VOCAB), root / "tokenizer")
    # A second vocabulary: smaller and trained on the text in another order, so its merges differ.
    other = save_tokenizer(train_tokenizer(sorted(text, key=lambda t: hashlib.md5(t.encode()).hexdigest()),
                                           OTHER_VOCAB), root / "tokenizer-other")
    stats = {"llm": _pretrained(LLM["arch"], LLM["size"], tok, data.llm_corpus, LLM, seed, root / "llm", progress,
                                steps_scale)}
    for k, (arch, size, own) in enumerate(HET):
        stats[f"slm-{k}"] = _pretrained(arch, size, other if own else tok, data.slm_corpus, SLM, seed + 1 + k,
                                        root / f"slm-{k}", progress, steps_scale)
    (root / "models.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return stats


def _models(data: SyntheticData, seed: int, scale: float, cache_dir: Path | None, out_dir: Path,
            progress: bool, steps_scale: float) -> tuple[Path, dict[str, Any]]:
    entry = (Path(cache_dir) if cache_dir else out_dir) / f"bench-synthetic-{_key(seed, scale, steps_scale)}"
    if (entry / "models.json").is_file():
        return entry, {**json.loads((entry / "models.json").read_text()), "cached": True}
    build = staging_dir(entry)
    try:
        stats = _build_models(data, build, seed, progress, steps_scale)
        try:
            os.rename(build, entry)  # complete entries only ever appear
        except OSError:
            if not (entry / "models.json").is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return entry, {**stats, "cached": False}


def build_synthetic_world(out_dir: Path, seed: int = 0, scale: float = 1.0, cache_dir: Path | None = None,
                          progress: bool = False, steps_scale: float = 1.0) -> World:
    """Write the world's data under out_dir/data; pretrain (or take from the cache) its models.
    `steps_scale` shortens pretraining (tests use a world whose models learn next to nothing)."""
    out_dir = Path(out_dir)
    data = make_data(seed, scale=scale, devices=N_DEVICES)
    files = out_dir / "data"
    splits = {"aux-paper": data.aux, "aux-prompts": [TaskRecord(r.prompt, "", r.domain) for r in data.aux],
              "aux-public-only": data.public_aux, "validation": data.validation, "test": data.test,
              "general": data.general_heldout,
              "instructions": [TaskRecord(t, "", d) for d in DOMAINS
                               for t in (f"Translate to {d.capitalize()}:", f"{d.capitalize()} for:")]}
    splits.update({f"device-{k}": records for k, records in enumerate(data.devices)})
    paths = {}
    for name, records in splits.items():
        paths[name] = files / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    models, stats = _models(data, seed, scale, cache_dir, out_dir, progress, steps_scale)
    return World(
        track="synthetic", root=out_dir, llm_dir=models / "llm", slm_dir=models / "slm-0",
        het_slms=[models / f"slm-{k}" for k in range(N_DEVICES)],
        devices=[paths[f"device-{k}"] for k in range(N_DEVICES)],
        aux={"paper": paths["aux-paper"], "prompts": paths["aux-prompts"], "public-only": paths["aux-public-only"]},
        validation=paths["validation"], test=paths["test"], general=paths["general"],
        prompt_pool=paths["aux-prompts"], instructions=paths["instructions"],
        test_tags={p: t for p, t in data.tags.items()}, device_domains=data.device_domains,
        truth={r.prompt: r.response for r in data.aux}, max_new_tokens=MAX_NEW_TOKENS,
        stats={"models": stats, "devices": [len(d) for d in data.devices], "aux": len(data.aux),
               "validation": len(data.validation), "test": len(data.test),
               "grammars": {d: vars(g) for d, g in data.grammars.items()},
               "het": [f"{a}-{s}{' (own tokenizer)' if own else ''}" for a, s, own in HET]},
    )
