"""The demo world: synthetic data, a tokenizer, a pretrained tiny "LLM" and a weaker SLM.

ARCHITECTURE.md, "Demo world": the LLM must arrive the way a real one does, already knowing things the
SLMs do not. So the LLM (llama "base") is pretrained on the public pool until it knows
the public words; the SLM (llama "tiny") only briefly, so it knows the answer format but
little of the lexicon. Private words appear only in clients' data, so each client's
domains are partly unknown to the LLM too.

Pretraining takes tens of seconds; with `cache_dir`, the result is kept under a key that
covers everything it depends on, and later calls copy it in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.dirs import staged_dir, staging_dir
from cotune.demo.synthetic import SyntheticSuite, all_text, make_suite, write_suite

# Bump when anything below changes what the pretrained checkpoints would be.
CODE_VERSION = "demo-world-1"
VOCAB_SIZE = 1024
LLM = {"arch": "llama", "size": "base", "steps": 400, "lr": 3e-3, "batch_size": 32}
SLM = {"arch": "llama", "size": "tiny", "steps": 150, "lr": 3e-3, "batch_size": 32}
MAX_LEN = 64
_STATS = "world.json"


@dataclass
class DemoWorld:
    out_dir: Path
    data: dict[str, Path]  # write_suite's names: public, aux, test, client_k, client_k_test
    tokenizer_dir: Path
    llm_dir: Path
    slm_dir: Path
    suite: SyntheticSuite | None = None
    # Pretraining reports, the models' scores on the test split, and whether cached.
    stats: dict[str, Any] = field(default_factory=dict)


def _configure_threads() -> None:
    """Never run more torch threads than cores; leave any explicit setting alone."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if torch.get_num_threads() > cores:
        torch.set_num_threads(max(1, cores))


def _cache_key(suite: SyntheticSuite, seed: int, num_clients: int) -> str:
    text_digest = hashlib.sha256("\n".join(all_text(suite)).encode("utf-8")).hexdigest()
    payload = {
        "version": CODE_VERSION,
        "seed": seed,
        "num_clients": num_clients,
        "text": text_digest,
        "vocab": VOCAB_SIZE,
        "max_len": MAX_LEN,
        "llm": LLM,
        "slm": SLM,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy `src` over `dst` via a sibling staging dir, so `dst` is never half-written."""
    with staged_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _build_models(suite: SyntheticSuite, root: Path, seed: int, progress: bool) -> dict[str, Any]:
    """Train the tokenizer, pretrain both models, save all three under `root`."""
    from common.ml.checkpoint import save_checkpoint
    from common.ml.evaluate import evaluate
    from common.ml.tokenizer import load_hf_tokenizer, save_tokenizer, train_tokenizer
    from cotune.demo.tiny import build_tiny_model, pretrain

    tok_dir = save_tokenizer(train_tokenizer(all_text(suite), VOCAB_SIZE), root / "tokenizer")
    tokenizer = load_hf_tokenizer(tok_dir)
    stats: dict[str, Any] = {}
    for name, cfg, model_seed in (("llm", LLM, seed), ("slm", SLM, seed + 1)):
        model = build_tiny_model(cfg["arch"], cfg["size"], VOCAB_SIZE, seed=model_seed)
        report = pretrain(
            model,
            tokenizer,
            suite.public,
            steps=cfg["steps"],
            lr=cfg["lr"],
            batch_size=cfg["batch_size"],
            max_len=MAX_LEN,
            seed=model_seed,
            progress=progress,
        )
        save_checkpoint(model, tok_dir, root / name)
        # Recorded so a user (and the cache) can see what each model knows on arrival.
        stats[name] = {
            "arch": cfg["arch"],
            "size": cfg["size"],
            "params": sum(p.numel() for p in model.parameters()),
            "pretrain": report,
            "test": evaluate(model, tokenizer, suite.test),
            "aux": {
                k: v for k, v in evaluate(model, tokenizer, suite.aux).items() if k != "per_domain"
            },
        }
    (root / _STATS).write_text(json.dumps(stats, indent=2, sort_keys=True), encoding="utf-8")
    return stats


def prepare_world(
    out_dir: Path,
    num_clients: int = 3,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> DemoWorld:
    """Write the suite under out_dir/data and the tokenizer, LLM and SLM checkpoints under
    out_dir/{tokenizer,llm,slm}; reuse pretrained checkpoints from `cache_dir` when there.
    """
    _configure_threads()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = make_suite(num_clients=num_clients, seed=seed)
    data = write_suite(suite, out_dir / "data")
    parts = ("tokenizer", "llm", "slm")

    if cache_dir is None:
        build_root = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
        try:
            stats = _build_models(suite, build_root, seed, progress)
            for part in (*parts, _STATS):
                src, dst = build_root / part, out_dir / part
                if src.is_dir():
                    _replace_dir(src, dst)
                else:
                    shutil.copy2(src, dst)
        finally:
            shutil.rmtree(build_root, ignore_errors=True)
        stats["cached"] = False
    else:
        cache_dir = Path(cache_dir)
        entry = cache_dir / _cache_key(suite, seed, num_clients)
        cached = (entry / _STATS).is_file() and all((entry / p).is_dir() for p in parts)
        if not cached:
            build_root = staging_dir(entry)
            try:
                _build_models(suite, build_root, seed, progress)
                try:
                    os.rename(build_root, entry)  # complete entries only ever appear
                except OSError:
                    if not (entry / _STATS).is_file():  # not a concurrent builder's entry
                        raise
            finally:
                shutil.rmtree(build_root, ignore_errors=True)
        for part in parts:
            _replace_dir(entry / part, out_dir / part)
        shutil.copy2(entry / _STATS, out_dir / _STATS)
        stats = json.loads((entry / _STATS).read_text(encoding="utf-8"))
        stats["cached"] = cached
        stats["cache_entry"] = str(entry)

    return DemoWorld(
        out_dir=out_dir,
        data=data,
        tokenizer_dir=out_dir / "tokenizer",
        llm_dir=out_dir / "llm",
        slm_dir=out_dir / "slm",
        suite=suite,
        stats=stats,
    )
