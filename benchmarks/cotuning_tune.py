"""Choosing the quality benchmark's settings on the validation split (`cotune bench quality --tune`).

A coordinate search from paper-like starting points (FedCoLLM/FedMKT: one local epoch, LoRA r=8 on
q/k/v/o, FT + 0.1..0.5 KD, one server epoch), each step scored on validation only, in a world of
its own seed (not one of the reported worlds) and one training seed:
1. devices' local training (learning rate, epochs) on Standalone;
2. LoRA rank and target modules on Standalone (synthetic track; the real track keeps r=8 on q/k/v/o);
3. the LLM's learning rate on the fedavg+aux ablation (the LLM tuned on the auxiliary data alone);
4. lambda_kd and temperature on FedCoLLM (mean of its SLM's and LLM's validation Rouge-L);
5. Co-PLMs' SAML weight and data, CrossLM's synthesis and selection threshold, on their own runs.
The test split is never read (the runner's final split is validation). The result, with the
search log, is frozen in benchmarks/settings/<track>.json, which the reported runs read.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TARGETS_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS_ALL = [*TARGETS_ATTN, "gate_proj", "up_proj", "down_proj"]
SEARCH_START: dict[str, dict[str, Any]] = {
    "synthetic": {
        "rounds": 5,
        "lora": {"r": 8, "alpha": 16.0, "target_modules": TARGETS_ATTN, "aggregation": "factors"},
        "train": {"epochs": 1.0, "lr": 3e-3, "batch_size": 8, "max_len": 64},
        "distill": {"epochs": 1.0, "lr": 1e-3, "batch_size": 8, "lambda_kd": 0.5, "temperature": 1.0},
        "coplms": {"saml_epochs": 1.0, "alpha": 0.5, "saml_data": "private"},
        "crosslm": {"synthesis": "answers", "threshold": 0.3, "prompts_per_domain": 16, "samples_per_prompt": 3,
                    "max_new_tokens": 20},
    },
    "real": {
        "rounds": 3,
        "lora": {"r": 8, "alpha": 16.0, "target_modules": TARGETS_ATTN, "aggregation": "factors"},
        # labelled_logits: Gemma's output head is 262k wide, and an answer is a few tokens of a
        # 48-token record; running the head only where a token is trained gives the same gradients.
        # max_len 64: SmolLM2's chat template (ChatML with its default system turn) puts ~35 tokens
        # around a prompt; the other models' records are padded only to their batch's longest.
        "train": {"epochs": 1.0, "lr": 3e-4, "batch_size": 8, "max_len": 64, "labelled_logits": True},
        "distill": {"epochs": 1.0, "lr": 3e-4, "batch_size": 8, "lambda_kd": 0.5, "temperature": 1.0},
        "coplms": {"saml_epochs": 1.0, "alpha": 0.5, "saml_data": "private"},
        "crosslm": {"synthesis": "answers", "threshold": 0.3, "prompts_per_domain": 8, "samples_per_prompt": 2,
                    "max_new_tokens": 12},
    },
}
# (step, method whose validation score decides, candidates as (path, value) changes)
Step = tuple[str, str, list[dict[str, Any]]]


def steps(track: str) -> list[Step]:
    if track == "real":
        # The devices' learning rate only, two candidates: the LLM's learning rate (3e-4), lambda_kd
        # (0.5), Co-PLMs' alpha (0.5) and LoRA (r=8 on q/k/v/o) stay at the search's paper-like
        # starting values. A run of the real models takes many minutes on two cores: this is what fits.
        return [("local training", "standalone", [{"train.lr": lr} for lr in (3e-4, 1e-3)])]
    lrs, llm_lrs = (3e-3, 1e-2), (1e-3, 3e-3)
    return [
        ("local training", "standalone",
         [{"train.lr": lr, "train.epochs": ep} for lr in lrs for ep in (2.0, 4.0)]),
        ("lora", "standalone",
         [{"lora.r": r, "lora.alpha": 2.0 * r, "lora.target_modules": t}
          for r in (8, 16) for t in (TARGETS_ATTN, TARGETS_ALL)]),
        ("llm learning rate", "fedavg+aux", [{"distill.lr": lr} for lr in llm_lrs]),
        ("distillation", "fedcollm",
         [{"distill.lambda_kd": lam, "distill.temperature": t} for lam in (0.1, 0.5) for t in (1.0, 2.0)]),
        # The two heaviest methods get the smallest grids (a run takes minutes on two cores).
        ("co-plms", "co-plms", [{"coplms.alpha": 0.1, "coplms.saml_data": d} for d in ("private", "private+prompts")]),
        ("crosslm", "crosslm", [{"crosslm.synthesis": "answers", "crosslm.threshold": 0.2},
                                {"crosslm.synthesis": "answers", "crosslm.threshold": 0.4},
                                {"crosslm.synthesis": "samples", "crosslm.threshold": 0.2}]),
    ]


def _apply(settings: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(settings)
    for path, value in changes.items():
        section, key = path.split(".", 1)
        out[section][key] = value
    return out


def _objective(method: str) -> Callable[[dict[str, Any]], float]:
    def score(final: dict[str, Any]) -> float:
        slm = final["slm"]["rougeL"]
        if method in ("fedavg+aux",):
            return final["llm"]["rougeL"]
        if final.get("llm") is not None and method not in ("standalone", "co-plms"):
            return (slm + final["llm"]["rougeL"]) / 2
        return final["slm"]["home"]["rougeL"] if method == "co-plms" else slm
    return score


def _save_progress(path: Path, settings: dict[str, Any], log: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "log": log}, indent=2), encoding="utf-8")
    tmp.replace(path)


def tune(track: str, out_dir: Path, world_seed: int = 100, seed: int = 0, scale: float = 1.0,
         cache_dir: Path | None = None, progress: bool = True, only: Sequence[str] = (),
         write_to: Path | None = None, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the search; write and return the frozen settings (with the search log). `resume`: the
    settings and log of an interrupted search (steps already in its log are not run again)."""
    from benchmarks.cotuning import SETTINGS_DIR, QualityConfig, Run, build_world
    from benchmarks.cotuning_eval import Evaluator
    from benchmarks.cotuning_methods import METHODS

    say = print if progress else (lambda *_a, **_k: None)
    out_dir = Path(out_dir)
    world = build_world(track, out_dir / "world", world_seed, scale, cache_dir, progress)
    ev = Evaluator(world)
    progress_file = out_dir / "search-progress.json"
    if resume is None and progress_file.is_file():  # an interrupted search goes on where it stopped
        resume = json.loads(progress_file.read_text(encoding="utf-8"))
        say(f"tune: resuming from {progress_file} ({len(resume['log'])} entries)")
    settings = copy.deepcopy(resume["settings"] if resume else SEARCH_START[track])
    log: list[dict[str, Any]] = list(resume["log"]) if resume else []
    finished = {entry["step"] for entry in log if entry.get("chosen")}
    started = time.perf_counter()
    for name, method, candidates in steps(track):
        if (only and name not in only) or name in finished:
            continue
        scored = []
        for i, changes in enumerate(candidates):
            earlier = [e["validation"] for e in log if e["step"] == name and e.get("changes") == changes
                       and "validation" in e]
            if earlier:  # scored before the search was interrupted
                scored.append((earlier[-1], i))
                continue
            trial = _apply(settings, changes)
            cfg = QualityConfig(out_dir=out_dir, track=track, settings=trial, final_split="validation",
                                progress=False)
            final = Run(METHODS[method], world, ev, seed, cfg, out_dir / "runs" / f"{name}-{i}").run()[-1]
            value = _objective(method)(final["validation"])
            scored.append((value, i))
            say(f"tune {name:>18}: {changes} -> validation {100 * value:.1f}")
            log.append({"step": name, "method": method, "changes": changes, "validation": value})
            _save_progress(progress_file, settings, log)
        best = max(scored)[1]
        settings = _apply(settings, candidates[best])
        log.append({"step": name, "method": method, "chosen": candidates[best]})
        _save_progress(progress_file, settings, log)
        say(f"tune {name:>18}: chose {candidates[best]}")
    if ev.test_reads:
        raise RuntimeError("the search read the test split")
    frozen = {**settings, "chosen_on": {"split": "validation", "track": track, "world_seed": world_seed,
                                        "seed": seed, "scale": scale, "seconds": round(time.perf_counter() - started),
                                        "search": log}}
    target = write_to or SETTINGS_DIR / f"{track}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(frozen, indent=2) + "\n", encoding="utf-8")
    return frozen
