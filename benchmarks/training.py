"""On-device LoRA training: cotune's trainer against transformers' Trainer + peft, on the same
model, data, LoRA config, optimizer, threads and steps (benchmarks/training_engines.py says how
each engine is set up), for the tiny demo model and Gemma 3 270M.

Each engine trains in its own process, `repeats` times, alternating the order of the engines
from one pass to the next so that bursts of other work on a shared machine do not all land on
one engine; repeat i uses seed `seed + i` (data order and LoRA init) for every engine, so the
engines given the same batches can be compared step by step, and the spread over seeds says
how much a final loss moves by chance. Reported per model and engine: real tokens/s (padding
excluded, first step excluded), median step time, peak RSS in MiB, the loss after N steps and
the loss curve; medians over the repeats.

With `--memory-search`, also the largest LoRA rank and sequence length that train within a
memory budget (2 GiB peak RSS by default, a Raspberry Pi 4/5-class device), batch 1, with and
without gradient checkpointing (benchmarks/training_memory.py).

    python -m benchmarks.training --models tiny --steps 20 --repeats 5   (or: cotune bench train)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.training_assets import PRESETS, Preset, checkpoint
from benchmarks.training_engines import ENGINES, MEMORY_MODES, RESULT_PREFIX

Log = Callable[[str], None]
REFERENCE = "hf-trainer"
# Engines that train on exactly the reference's batches, in its order: their loss curves compare step by step.
SAME_BATCHES = ("cotune",)


@dataclass
class TrainBenchConfig:
    models: Sequence[str] = ("tiny", "gemma")
    engines: Sequence[str] = ENGINES
    steps: int | None = None  # None: each model's preset (benchmarks/training_assets.py)
    repeats: int = 5
    threads: int | None = None  # None: the cores this process may use
    seed: int = 0
    out_dir: Path = Path("results/train")
    timeout_s: float = 3600.0
    memory_search: bool = False
    search_model: str = "gemma"
    search_ranks: Sequence[int] = (8, 16, 32, 64)
    search_lens: Sequence[int] = (128, 256, 512, 1024)
    search_modes: Sequence[str] = tuple(MEMORY_MODES)
    budget_mib: float = 2048.0
    search_steps: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)  # Preset fields for every model (batch_size, ...)

    def check(self) -> None:
        unknown = [m for m in self.models if m not in PRESETS]
        if unknown or not self.models:
            raise ValueError(f"unknown models {unknown}; choose from {', '.join(PRESETS)}")
        bad = [e for e in self.engines if e not in ENGINES]
        if bad or not self.engines:
            raise ValueError(f"unknown engines {bad}; choose from {', '.join(ENGINES)}")
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be >= 2 (the first step is not timed), got {self.steps}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.memory_search:
            if self.search_model not in PRESETS:
                raise ValueError(f"unknown search model {self.search_model!r}; choose from {', '.join(PRESETS)}")
            modes = [m for m in self.search_modes if m not in MEMORY_MODES]
            if modes or not self.search_modes:
                raise ValueError(f"unknown memory modes {modes}; choose from {', '.join(MEMORY_MODES)}")
            if self.search_steps < 2:
                raise ValueError(f"search steps must be >= 2, got {self.search_steps}")
            if not self.search_ranks or not self.search_lens or min(*self.search_ranks, *self.search_lens) < 1:
                raise ValueError("search ranks and lengths must be positive integers")
        bad_keys = set(self.overrides) - set(Preset.__dataclass_fields__)
        if bad_keys:
            raise ValueError(f"unknown settings {sorted(bad_keys)}; "
                             f"choose from {', '.join(Preset.__dataclass_fields__)}")


def preset(cfg: TrainBenchConfig, key: str) -> Preset:
    values = {**PRESETS[key].__dict__, **cfg.overrides}
    if cfg.steps is not None:
        values["steps"] = cfg.steps
    return Preset(**values)


def job_spec(p: Preset, model_dir: Path, engine: str, seed: int, threads: int) -> dict[str, Any]:
    """What one worker process trains."""
    return {"engine": engine, "model_dir": str(model_dir), "threads": threads, "seed": seed, "steps": p.steps,
            "lr": p.lr, "batch_size": p.batch_size, "max_len": p.max_len,
            "lora": {"r": p.r, "alpha": p.alpha, "dropout": p.dropout, "target_modules": list(p.target_modules)}}


def run_worker(spec: dict[str, Any], out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """`spec` trained in a fresh process (python -m benchmarks.training --worker); its figures."""
    threads = int(spec["threads"])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
           **spec.get("env", {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file = out_dir / f".spec-{os.getpid()}.json"
    spec_file.write_text(json.dumps(spec))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--worker", str(spec_file)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    finally:
        spec_file.unlink(missing_ok=True)
    lines = [ln[len(RESULT_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


# -- pooling the repeats ---------------------------------------------------------------------


def _tail(losses: Sequence[float]) -> float:
    """The loss after N steps: the mean of the last few steps (a single batch's loss is noisy)."""
    k = max(1, min(5, len(losses) // 4))
    return sum(losses[-k:]) / k


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's repeats together: medians of the speed and memory, the loss after N steps
    (median over seeds), its spread over seeds, and the median loss curve."""
    med = statistics.median
    tails = [_tail(r["losses"]) for r in runs]
    evals = [r["eval_loss"] for r in runs if r.get("eval_loss") is not None]
    steps = min(len(r["losses"]) for r in runs)
    out: dict[str, Any] = {
        "repeats": len(runs), "steps": steps,
        "tokens_per_s": med(r["tokens_per_s"] for r in runs), "step_s": med(r["step_s"] for r in runs),
        "peak_rss_mib": med(r["peak_rss_mib"] for r in runs), "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
        "train_peak_rss_mib": (med(r["train_peak_rss_mib"] for r in runs)
                               if all(r.get("train_peak_rss_mib") for r in runs) else None),
        "ready_rss_mib": med(r["ready_rss_mib"] for r in runs if r.get("ready_rss_mib") is not None)
        if any(r.get("ready_rss_mib") is not None for r in runs) else None,
        "padding_fraction": med(r["padding_fraction"] for r in runs),
        "tokens_per_step": med(r["tokens_per_step"] for r in runs),
        "loss_first": med(r["losses"][0] for r in runs), "loss_final": med(tails),
        "loss_seed_sd": statistics.stdev(tails) if len(tails) > 1 else None,
        "eval_loss": med(evals) if evals else None,
        "eval_seed_sd": statistics.stdev(evals) if len(evals) > 1 else None,
        "loss_curve": [med(r["losses"][i] for r in runs) for i in range(steps)],
        "optimizer": runs[0]["optimizer"], "options": runs[0]["options"],
        "torch_threads": runs[0]["torch_threads_after"], "load_average_max": max(max(r["load_average"]) for r in runs),
        "per_repeat": [{k: r.get(k) for k in ("seed", "tokens_per_s", "step_s", "peak_rss_mib", "eval_loss", "losses")}
                       for r in runs],
    }
    return out


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """Each engine against the reference (HF Trainer) on its model; the issue's targets as notes."""
    notes = []
    by_key = {(r["model"], r["engine"]): r for r in rows if "tokens_per_s" in r}
    for r in rows:
        ref = by_key.get((r["model"], REFERENCE))
        if ref is None or r["engine"] == REFERENCE or "tokens_per_s" not in r:
            continue
        r["vs_hf_tokens"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["vs_hf_rss"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
        r["loss_delta"] = r["loss_final"] - ref["loss_final"]
        if r.get("eval_loss") is not None and ref.get("eval_loss") is not None:
            r["eval_delta"] = r["eval_loss"] - ref["eval_loss"]
        if r["engine"] in SAME_BATCHES:
            theirs = {run["seed"]: run["losses"] for run in ref["per_repeat"]}
            diffs = [abs(a - b) for run in r["per_repeat"] if run["seed"] in theirs
                     for a, b in zip(run["losses"], theirs[run["seed"]], strict=False)]
            r["max_step_delta"] = max(diffs) if diffs else None
        if not r["engine"].startswith("cotune"):
            continue
        speed_ok = r["vs_hf_tokens"] >= 1.0
        mem_ok = r["peak_rss_mib"] <= ref["peak_rss_mib"]
        noise = ref.get("eval_seed_sd")
        loss_ok: bool | None = None
        if "eval_delta" not in r:
            loss_text = "no held-out loss"
        elif noise is None:
            loss_text = (f"held-out loss {r['eval_loss']:.4f} vs {ref['eval_loss']:.4f} "
                         "(one repeat: no noise estimate)")
        else:
            loss_ok = abs(r["eval_delta"]) <= 2 * noise
            loss_text = (f"held-out loss {r['eval_loss']:.4f} vs {ref['eval_loss']:.4f}, |delta| "
                         f"{abs(r['eval_delta']):.4f} {'<=' if loss_ok else '>'} 2 x sd over seeds {2 * noise:.4f}")
        if not (speed_ok and mem_ok) or loss_ok is False:
            verdict = "missed"
        else:
            verdict = "met" if loss_ok else "speed and memory met, loss unsettled"
        notes.append(f"target {r['model']} {r['engine']} ({r['options']}) >= 1.0x HF Trainer tokens/s at <= its "
                     f"peak RSS, same loss within noise: {r['vs_hf_tokens']:.2f}x tokens/s, "
                     f"{r['peak_rss_mib']:.1f} vs {ref['peak_rss_mib']:.1f} MiB, {loss_text} -> {verdict}")
    return notes


# -- the run ---------------------------------------------------------------------------------


def measure_model(cfg: TrainBenchConfig, key: str, threads: int, log: Log) -> tuple[list[dict[str, Any]], list[str]]:
    """Every engine on one model, `repeats` passes in alternating order; one row per engine."""
    p = preset(cfg, key)
    model_dir = checkpoint(key, log)
    engines = list(cfg.engines)
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    failures: dict[str, str] = {}
    for rep in range(cfg.repeats):
        order = engines if rep % 2 == 0 else list(reversed(engines))
        for engine in order:
            if engine in failures:
                continue
            seed = cfg.seed + rep
            log(f"{key} {engine}: {p.steps} steps, seed {seed} (pass {rep + 1}/{cfg.repeats})")
            try:
                figures = run_worker(job_spec(p, model_dir, engine, seed, threads), cfg.out_dir, cfg.timeout_s)
            except Exception as exc:  # noqa: BLE001 - report the failure, keep measuring the rest
                failures[engine] = str(exc)[:300]
                log(f"  failed: {failures[engine]}")
                continue
            figures["seed"] = seed
            runs[engine].append(figures)
            log(f"  {figures['tokens_per_s']:.0f} tok/s, step {figures['step_s'] * 1000:.0f} ms, "
                f"peak {figures['peak_rss_mib']:.0f} MiB, "
                f"loss {figures['losses'][0]:.3f} -> {figures['losses'][-1]:.3f}")
    rows, notes = [], []
    for engine in engines:
        row: dict[str, Any] = {"model": key, "engine": engine, "label": f"{key} {engine}", "lora_r": p.r,
                               "batch_size": p.batch_size, "max_len": p.max_len}
        if runs[engine]:
            row.update(pool(runs[engine]))
        else:
            row["error"] = failures.get(engine, "not measured")
            notes.append(f"{key} {engine}: failed ({row['error']})")
        rows.append(row)
    return rows, notes


def run_training_benchmark(cfg: TrainBenchConfig, log: Log = print) -> dict[str, Path]:
    """Measure, then write results/train/training.{json,md,png} (and the memory search's table)."""
    from benchmarks.report import Column, write_report
    from benchmarks.training_memory import run_memory_search
    from benchmarks.training_report import memory_markdown, plot_training
    from edge_sdk.runtime.base import default_threads

    cfg.check()
    threads = cfg.threads or default_threads()
    started = time.time()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if cfg.repeats < 5:
        notes.append(f"only {cfg.repeats} repeat(s) per engine: a reduced run, not a result to quote")
    for key in cfg.models:
        model_rows, model_notes = measure_model(cfg, key, threads, log)
        rows.extend(model_rows)
        notes.extend(model_notes)
    notes.extend(compare(rows))
    search: dict[str, Any] | None = None
    if cfg.memory_search:
        search = run_memory_search(cfg, threads, log)
        notes.extend(search["summary"])
    presets = {key: preset(cfg, key).__dict__ for key in cfg.models}
    notes.insert(0, f"{threads} torch threads for every engine; medians of {cfg.repeats} processes per engine "
                    "(alternating order, seed + repeat for data order and LoRA init); tokens/s counts real "
                    "(non-padding) tokens after the first step; loss@N = mean of the last few steps' training losses; "
                    "held-out loss = each trained adapter scored on the same 64 held-out records; 'max step diff' "
                    "compares cotune's loss curve with the HF Trainer's on the same batches, step by step")
    columns = [
        Column("model", "model"), Column("engine", "engine"), Column("options", "options"),
        Column("tokens_per_s", "tokens/s", "{:.0f}"), Column("vs_hf_tokens", "vs HF", "{:.2f}x"),
        Column("step_s", "step ms", lambda v: f"{v * 1000:.0f}"),
        Column("peak_rss_mib", "peak RSS MiB", "{:.0f}"), Column("train_peak_rss_mib", "training peak MiB", "{:.0f}"),
        Column("padding_fraction", "padding", "{:.0%}"), Column("loss_first", "loss@1", "{:.3f}"),
        Column("loss_final", "loss@N", "{:.4f}"), Column("max_step_delta", "max step diff vs HF", "{:.1e}"),
        Column("eval_loss", "held-out loss", "{:.4f}"), Column("eval_delta", "vs HF", "{:+.4f}"),
    ]
    meta = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
            "threads": threads, "presets": presets, "reference": REFERENCE, "seconds": time.time() - started,
            "load_average_end": os.getloadavg()}
    top = {"memory_search": search} if search is not None else None
    paths = write_report(cfg.out_dir, "training", "On-device LoRA training: cotune vs transformers Trainer + peft",
                         rows, columns, meta=meta, notes=notes, top=top)
    if search is not None:
        with paths["md"].open("a") as fh:
            fh.write("\n" + memory_markdown(search) + "\n")
    if any("tokens_per_s" in r for r in rows) or search is not None:
        paths["png"] = plot_training(cfg.out_dir / "training.png", rows, search)
    log(paths["md"].read_text())
    return paths


def _csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="tiny,gemma", help="comma-separated: tiny, gemma")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES)}")
    parser.add_argument("--steps", type=int, help="training steps per run (default: each model's preset)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/train"))
    parser.add_argument("--memory-search", action="store_true")
    parser.add_argument("--search-model", default="gemma")
    parser.add_argument("--search-ranks", default="8,16,32,64")
    parser.add_argument("--search-lens", default="128,256,512,1024")
    parser.add_argument("--search-modes", default=",".join(MEMORY_MODES))
    parser.add_argument("--budget-mib", type=float, default=2048.0)
    args = parser.parse_args(argv)
    if args.worker:
        from benchmarks.training_engines import worker

        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker.read_text()))), flush=True)
        return
    run_training_benchmark(TrainBenchConfig(
        models=_csv(args.models), engines=_csv(args.engines), steps=args.steps, repeats=args.repeats,
        threads=args.threads, seed=args.seed, out_dir=args.out, memory_search=args.memory_search,
        search_model=args.search_model, search_ranks=_csv(args.search_ranks, int),
        search_lens=_csv(args.search_lens, int), search_modes=_csv(args.search_modes), budget_mib=args.budget_mib))


if __name__ == "__main__":
    main()
