"""The co-tuning quality benchmark (`cotune bench quality`): every method on the same data,
models and local budget, for several seeds; Rouge-L / EM of the device SLMs and of the LLM
per round, bytes moved, wall time. Writes JSON, a markdown table and a PNG.

Methods (ARCHITECTURE.md, "Algorithms"):
- zero-shot: the models as they arrive (the demo world's pretrained LLM and weak SLMs);
- standalone / standalone-het: each device LoRA-tunes its SLM on its own data only
  (the shared llama SLM / each device's own architecture);
- fedavg, fedcollm: the shared llama SLM, through the strategies' real server steps and
  the `lora_sft` device handler;
- co-plms, crosslm: heterogeneous devices (llama / gpt2 / qwen2 SLMs), through the
  strategies and the `coplms` / `crosslm` device handlers; both reconstructed from their
  papers' abstracts (ARCHITECTURE.md, "Algorithms");
- centralized: the LLM LoRA-tuned on the pooled client data (the upper reference), and
  the shared SLM likewise.

Every device trains `train.epochs` epochs per round on its private data whatever the
method (Co-PLMs splits them between DST and SAML). Rounds run in process
(benchmarks.inprocess); the REST path is what the tests cover. Seeds vary LoRA init, data
order and sampling; the world (data, tokenizer, pretrained models) is the one of
`world_seed`, since pretraining the LLM anew per seed would dominate the budget.

SLM scores: each device's model on the global test split (every domain equally), mean over
devices, also per domain; "local" is each device's model on its own held-out split (its
own domain mix). LLM scores: the global test split.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cotuning_world import HET, NUM_CLIENTS, BenchWorld, build_bench_world
from common.cache import cache_root

METHODS = ("zero-shot", "standalone", "standalone-het", "fedavg", "fedcollm", "co-plms", "crosslm", "centralized")
STRATEGY_METHODS = {"fedavg", "fedcollm", "co-plms", "crosslm"}
HETEROGENEOUS = {"standalone-het", "co-plms", "crosslm"}
LORA = {"r": 16, "alpha": 32.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TRAIN = {"epochs": 4.0, "lr": 5e-3, "batch_size": 16, "max_len": 48}
# The LLM's LoRA is unstable at the SLMs' 5e-3 (checked: Rouge-L falls after a few epochs), so every
# update of the LLM, in any method, uses this lower rate.
DISTILL = {"epochs": 2.0, "lr": 2e-3, "batch_size": 16, "lambda_kd": 1.0, "temperature": 1.0}


@dataclass
class QualityConfig:
    out_dir: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 3
    scale: float = 1.0
    methods: tuple[str, ...] = METHODS
    world_seed: int = 0
    cache_dir: Path | None = None
    threads: int | None = None
    # Scores are geometric-mean token probabilities under weak tiny SLMs: a probe on the prompt pool
    # (not the test split) gave 80% exactly-right selections at 0.2 and next to none selected at 0.5.
    crosslm_threshold: float = 0.2
    progress: bool = True
    extra_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> RunSpec.params overrides


class Evaluator:
    """Scores models on the global test split and on each device's own held-out split."""

    def __init__(self, world: BenchWorld, max_new_tokens: int = 24) -> None:
        from common.records import read_jsonl

        self.test = read_jsonl(world.test)
        self.local = [read_jsonl(p) for p in world.client_tests]
        self.max_new_tokens = max_new_tokens
        self.seconds = 0.0  # time spent evaluating, kept out of the methods' wall time

    def _eval(self, model: Any, tok: Any, records: list) -> dict[str, Any]:
        from common.ml.evaluate import evaluate

        started = time.perf_counter()
        try:
            return evaluate(model, tok, records, max_new_tokens=self.max_new_tokens)
        finally:
            self.seconds += time.perf_counter() - started

    def llm(self, model: Any, tok: Any) -> dict[str, Any]:
        return self._eval(model, tok, self.test)

    def slms(self, models: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
        """`models`: one (model, tokenizer) per device, or a single one shared by all."""
        shared = len(models) == 1
        glob = [self._eval(*models[0], self.test)] if shared else [self._eval(m, t, self.test) for m, t in models]
        local = [self._eval(*models[0 if shared else k], self.local[k]) for k in range(len(self.local))]
        domains = sorted(glob[0]["per_domain"])
        return {
            "rougeL": statistics.fmean(g["rougeL"] for g in glob),
            "em": statistics.fmean(g["em"] for g in glob),
            "per_domain": {d: {m: statistics.fmean(g["per_domain"][d][m] for g in glob) for m in ("rougeL", "em")}
                           for d in domains},
            "local": {m: statistics.fmean(x[m] for x in local) for m in ("rougeL", "em")},
            "devices": [{"rougeL": g["rougeL"], "em": g["em"]} for g in glob],
        }


# -- one method, one seed ----------------------------------------------------------------


def _lora() -> Any:
    from common.protocol import LoraSpec

    return LoraSpec.model_validate(LORA)


def _train(**changes: Any) -> Any:
    from common.protocol import TrainSpec

    return TrainSpec.model_validate({**TRAIN, **changes})


def _records(world: BenchWorld) -> list[list]:
    from common.records import read_jsonl

    return [read_jsonl(p) for p in world.clients]


def _round_seed(seed: int, number: int) -> int:
    return seed * 100_003 + number  # as the strategies do


def zero_shot(world: BenchWorld, ev: Evaluator) -> dict[str, Any]:
    from common.ml.checkpoint import load_checkpoint

    shared = ev.slms([load_checkpoint(world.slm_dir)])
    het = ev.slms([load_checkpoint(d) for d in world.het_slms])
    return {"slm": shared, "slm_het": het, "llm": ev.llm(*load_checkpoint(world.llm_dir))}


def run_standalone(world: BenchWorld, ev: Evaluator, seed: int, rounds: int, het: bool) -> list[dict[str, Any]]:
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import attach_lora
    from common.ml.train import train_lora

    data = _records(world)
    models = [load_checkpoint(world.het_slms[k] if het else world.slm_dir) for k in range(NUM_CLIENTS)]
    # Initialised as the co-plms / crosslm devices initialise their own SLM's adapter.
    models = [(attach_lora(m, _lora(), _round_seed(seed, 1)), tok) for m, tok in models]
    out = []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        for (model, tok), records in zip(models, data, strict=True):
            train_lora(model, tok, records, _train(), seed=_round_seed(seed, number))
        out.append({"round": number, "slm": ev.slms(models), "llm": None, "bytes_up": 0, "bytes_down": 0,
                    "time_s": time.perf_counter() - started})
    return out


def run_centralized(world: BenchWorld, ev: Evaluator, seed: int, rounds: int) -> list[dict[str, Any]]:
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import attach_lora
    from common.ml.train import train_lora

    pooled = [r for records in _records(world) for r in records]
    llm, llm_tok = load_checkpoint(world.llm_dir)
    slm, slm_tok = load_checkpoint(world.slm_dir)
    llm, slm = attach_lora(llm, _lora(), seed), attach_lora(slm, _lora(), seed)
    out = []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        train_lora(llm, llm_tok, pooled, _train(lr=DISTILL["lr"]), seed=_round_seed(seed, number))
        train_lora(slm, slm_tok, pooled, _train(), seed=_round_seed(seed, number))
        elapsed = time.perf_counter() - started
        out.append({"round": number, "slm": ev.slms([(slm, slm_tok)]), "llm": ev.llm(llm, llm_tok),
                    "bytes_up": 0, "bytes_down": 0, "time_s": elapsed})
    return out


def _spec(method: str, world: BenchWorld, seed: int, rounds: int, cfg: QualityConfig) -> Any:
    from common.protocol import RunSpec

    params: dict[str, Any] = {}
    if method == "co-plms":
        # The same local budget as the other methods: SAML's epoch comes out of DST's.
        params = {"dst_epochs": TRAIN["epochs"] - 1.0, "saml_epochs": 1.0}
    elif method == "crosslm":
        params = {"prompt_data": str(world.prompt_pool), "prompts_per_domain": max(1, round(32 * cfg.scale)),
                  "threshold": cfg.crosslm_threshold, "weight_power": 2.0}
    params.update(cfg.extra_params.get(method, {}))
    return RunSpec.model_validate({
        "name": f"bench-{method}", "algorithm": method, "slm": str(world.slm_dir), "llm": str(world.llm_dir),
        "rounds": rounds, "min_clients": NUM_CLIENTS, "aux_data": str(world.aux), "seed": seed,
        "lora": LORA, "train": TRAIN, "distill": DISTILL, "params": params,
    })


def _selection_quality(store: Any, outputs: dict[str, str], truth: dict[str, str]) -> dict[str, Any]:
    """CrossLM only: how many selected / synthetic answers are exactly right (benchmark oracle)."""
    from common.methods.crosslm import SELECTED, samples_from_bytes
    from common.metrics import exact_match

    if SELECTED not in outputs:
        return {"selected": 0, "selected_correct": None}
    chosen = samples_from_bytes(store.read_bytes(outputs[SELECTED]))
    right = [exact_match(s.record.response, truth[s.record.prompt]) for s in chosen if s.record.prompt in truth]
    return {"selected": len(chosen), "selected_correct": statistics.fmean(right) if right else None}


def run_strategy(method: str, world: BenchWorld, ev: Evaluator, seed: int, rounds: int, cfg: QualityConfig,
                 work: Path) -> list[dict[str, Any]]:
    from benchmarks.inprocess import Device, RoundRecord, run_inprocess
    from cloud.store import BlobStore
    from cloud.strategies import ServedModel, strategy_class
    from common.methods import coplms

    spec = _spec(method, world, seed, rounds, cfg)
    cls = strategy_class(method)
    cls.check_spec(spec)
    strategy = cls(spec, BlobStore(work / "store"))
    data = _records(world)
    het = method in HETEROGENEOUS
    devices = [Device(f"device-{k}", data[k], work / f"device-{k}",
                      local_slm=world.het_slms[k] if het else None) for k in range(NUM_CLIENTS)]
    out: list[dict[str, Any]] = []

    def held(model: ServedModel) -> tuple[Any, Any]:
        return strategy.holder.with_adapter(model.checkpoint, model.lora, model.seed, model.adapter_digest)

    def after_round(record: RoundRecord, devs: Sequence[Device]) -> None:
        outputs = record.outputs
        extra: dict[str, Any] = {}
        shared = strategy.exportable_model(outputs)
        if het or shared is None:
            slm = ev.slms([d.handler.device_model(record.info) for d in devs])  # type: ignore[union-attr]
        else:
            slm = ev.slms([held(shared)])
        served = strategy.llm_adapter(outputs)
        llm = ev.llm(*held(served)) if served is not None else None
        if method == "co-plms":
            proxy = held(ServedModel(spec.slm, spec.lora, spec.seed, outputs[coplms.DPM_ADAPTER]))
            extra["dpm"] = {k: v for k, v in ev.llm(*proxy).items() if k in ("rougeL", "em")}
        if method == "crosslm":
            stats = record.metrics.get("crosslm", {})
            extra["crosslm"] = {**{k: stats.get(k) for k in ("samples", "selected", "score_mean")},
                                **_selection_quality(strategy.store, outputs, world.truth)}
        out.append({"round": record.round, "slm": slm, "llm": llm,
                    "bytes_up": statistics.fmean(record.bytes_up), "bytes_down": statistics.fmean(record.bytes_down),
                    "time_s": max(record.device_s) + record.server_s, "extra": extra})

    run_inprocess(strategy, devices, rounds, work, after_round=after_round)
    return out


# -- the whole benchmark -----------------------------------------------------------------


def _stat(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Final-round figures per method, mean and spread over seeds."""
    summary: dict[str, Any] = {}
    for method, by_seed in runs.items():
        finals = [run["rounds"][-1] for run in by_seed.values()]
        row: dict[str, Any] = {}
        for key, pick in (("slm_rougeL", lambda r: r["slm"]["rougeL"]), ("slm_em", lambda r: r["slm"]["em"]),
                          ("slm_local_rougeL", lambda r: r["slm"]["local"]["rougeL"]),
                          ("slm_local_em", lambda r: r["slm"]["local"]["em"])):
            row[key] = _stat([pick(r) for r in finals])
        if all(r["llm"] is not None for r in finals):
            row["llm_rougeL"] = _stat([r["llm"]["rougeL"] for r in finals])
            row["llm_em"] = _stat([r["llm"]["em"] for r in finals])
        row["per_domain_rougeL"] = {d: _stat([r["slm"]["per_domain"][d]["rougeL"] for r in finals])
                                    for d in finals[0]["slm"]["per_domain"]}
        rounds = [run["rounds"] for run in by_seed.values()]
        row["bytes_up_per_round"] = _stat([statistics.fmean(r["bytes_up"] for r in rs[1:]) for rs in rounds])
        row["bytes_down_first_round"] = _stat([rs[1]["bytes_down"] for rs in rounds])
        later = [[r["bytes_down"] for r in rs[2:]] for rs in rounds]
        row["bytes_down_later_rounds"] = _stat([statistics.fmean(x) if x else 0.0 for x in later])
        row["wall_s"] = _stat([run["wall_s"] for run in by_seed.values()])
        summary[method] = row
    return summary


def check_methods(methods: Sequence[str]) -> None:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or 'none given'}; choose from {', '.join(METHODS)}")


def run_quality_benchmark(cfg: QualityConfig, world: BenchWorld | None = None) -> dict[str, Any]:
    """Run every method x seed; write cotuning.json, cotuning.md and cotuning.png under cfg.out_dir.

    `world` replaces the demo-world setup (tests pass a tiny one).
    """
    import torch

    from benchmarks.cotuning_report import write_results

    check_methods(cfg.methods)
    if not cfg.seeds or cfg.rounds < 1 or cfg.scale <= 0:
        raise ValueError("need at least one seed, rounds >= 1 and scale > 0")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = max(1, round(cfg.rounds * cfg.scale)) if cfg.scale > 1 else cfg.rounds
    cache = cfg.cache_dir or cache_root()
    say = print if cfg.progress else (lambda *_a, **_k: None)
    if world is None:
        say(f"preparing the benchmark world in {out_dir} (models cached in {cache})")
        world = build_bench_world(out_dir / "world", seed=cfg.world_seed, scale=cfg.scale, cache_dir=cache,
                                  progress=cfg.progress)
    ev = Evaluator(world)
    zs = zero_shot(world, ev)
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for method in cfg.methods:
        runs[method] = {}
        for seed in cfg.seeds:
            t0, eval0 = time.perf_counter(), ev.seconds
            start = {"round": 0, "slm": zs["slm_het" if method in HETEROGENEOUS else "slm"],
                     "llm": zs["llm"] if method in ("zero-shot", "fedcollm", "co-plms", "crosslm", "centralized")
                     else None, "bytes_up": 0, "bytes_down": 0, "time_s": 0.0}
            if method == "zero-shot":
                later = [{**start, "round": n} for n in range(1, rounds + 1)]
            elif method in ("standalone", "standalone-het"):
                later = run_standalone(world, ev, seed, rounds, het=method == "standalone-het")
            elif method == "centralized":
                later = run_centralized(world, ev, seed, rounds)
            else:
                later = run_strategy(method, world, ev, seed, rounds, cfg, out_dir / "runs" / f"{method}-s{seed}")
            # Wall time of the method itself: evaluation by the benchmark is left out.
            wall = time.perf_counter() - t0 - (ev.seconds - eval0) if method != "zero-shot" else 0.0
            runs[method][str(seed)] = {"rounds": [start, *later], "wall_s": wall}
            final = later[-1]
            llm = f", LLM Rouge-L {100 * final['llm']['rougeL']:.1f}" if final["llm"] else ""
            say(f"{method:>15} seed {seed}: SLM Rouge-L {100 * final['slm']['rougeL']:.1f}{llm} "
                f"({wall:.0f} s training, {time.perf_counter() - t0:.0f} s with evaluation)")
    results = {
        "config": {"seeds": list(cfg.seeds), "rounds": rounds, "scale": cfg.scale, "world_seed": cfg.world_seed,
                   "methods": list(cfg.methods), "lora": LORA, "train": TRAIN, "distill": DISTILL,
                   "crosslm_threshold": cfg.crosslm_threshold, "extra_params": cfg.extra_params,
                   "heterogeneous_slms": [f"{a}-{s}" for a, s in HET], "threads": torch.get_num_threads()},
        "world": world.stats,
        "runs": runs,
        "summary": summarize(runs),
        "total_wall_s": time.perf_counter() - started,
    }
    say(write_results(results, out_dir))
    return results
