"""The co-tuning quality benchmark (`cotune bench quality`): every method on the same world, models
and local budget, for several world seeds x training seeds; the claims of the papers tested with
paired bootstrap intervals. Writes cotuning.json, cotuning.md and cotuning.png.

Protocol (ARCHITECTURE.md, "Quality benchmark"): settings come frozen from
benchmarks/settings/<track>.json, chosen on the validation split (benchmarks.cotuning_tune);
per-round curves are scored on validation; the test split is read once per reported run, after
its last round. The runner asserts that count.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cotuning_eval import Evaluator, Model
from benchmarks.cotuning_methods import METHODS, Method, check_methods
from benchmarks.worlds.base import AUX_MODES, World

SETTINGS_DIR = Path(__file__).parent / "settings"
TRACKS = ("synthetic", "real")


def load_settings(track: str, path: Path | None = None) -> dict[str, Any]:
    path = path or SETTINGS_DIR / f"{track}.json"
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no frozen settings at {path}: run `cotune bench quality --tune --track {track}` "
                         "first (it searches them on the validation split)") from None


@dataclass
class QualityConfig:
    out_dir: Path
    track: str = "synthetic"
    aux: str = "paper"
    world_seeds: tuple[int, ...] = (0, 1, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    settings: dict[str, Any] = field(default_factory=dict)  # empty: the track's frozen file
    scale: float = 1.0
    cache_dir: Path | None = None
    threads: int | None = None
    progress: bool = True
    final_split: str = "test"  # "validation" while searching settings: the test split is never read then
    curves: bool = False  # score validation after every round, not only the last (slower)
    workers: int = 1  # parallel processes: one job per method x world x training seed
    runs_dir: Path | None = None  # finished runs kept for reuse (default out_dir/runs); share one between
    #                               auxiliary modes and the runs that do not read the aux data are made once


def build_world(track: str, out_dir: Path, seed: int, scale: float, cache_dir: Path | None,
                progress: bool) -> World:
    if track == "synthetic":
        from benchmarks.worlds.synthetic import build_synthetic_world

        return build_synthetic_world(out_dir, seed=seed, scale=scale, cache_dir=cache_dir, progress=progress)
    if track == "real":
        from benchmarks.worlds.real import build_real_world

        return build_real_world(out_dir, seed=seed, scale=scale, cache_dir=cache_dir, progress=progress)
    raise ValueError(f"unknown track {track!r}; choose from {', '.join(TRACKS)}")


def _round_seed(seed: int, number: int) -> int:
    return seed * 100_003 + number  # as the strategies do


class Run:
    """One method x world x training seed."""

    def __init__(self, method: Method, world: World, ev: Evaluator, seed: int, cfg: QualityConfig,
                 work: Path) -> None:
        self.method, self.world, self.ev, self.seed, self.cfg, self.work = method, world, ev, seed, cfg, work
        self.s = cfg.settings
        self.rounds = int(self.s["rounds"])

    # -- shared pieces ---------------------------------------------------------------------

    def lora(self) -> dict[str, Any]:
        return {**self.s["lora"], **self.method.lora}

    def train(self, **changes: Any) -> Any:
        from common.protocol import TrainSpec

        return TrainSpec.model_validate({**self.s["train"], **changes})

    def device_records(self) -> list[list]:
        from common.records import read_jsonl

        return [read_jsonl(p) for p in self.world.devices]

    def aux_records(self) -> list:
        from common.records import read_jsonl

        return read_jsonl(self.world.aux[self.cfg.aux])

    def score(self, number: int, slms: Sequence[Model], llm: Model | None) -> dict[str, Any]:
        """Validation after the last round (with `curves`, after every round); the final split (test)
        once, after the last round."""
        last = number == self.rounds
        out: dict[str, Any] = {}
        if last or self.cfg.curves:
            out["validation"] = {"slm": self.ev.slms(slms), "llm": self.ev.llm(llm) if llm else None}
        split = self.cfg.final_split
        if last and split != "validation":
            out[split] = {"slm": self.ev.slms(slms, split), "llm": self.ev.llm(llm, split) if llm else None}
        return out

    # -- the kinds of method ---------------------------------------------------------------

    def zero_shot(self) -> list[dict[str, Any]]:
        from common.ml.checkpoint import load_checkpoint

        dirs = self.world.het_slms if self.method.het else [self.world.slm_dir]
        self.rounds = 1
        llm = load_checkpoint(self.world.llm_dir) if self.method.llm else None
        return [{"round": 1, **self.score(1, [load_checkpoint(d) for d in dirs], llm)}]

    def standalone(self) -> list[dict[str, Any]]:
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import attach_lora
        from common.protocol import LoraSpec

        spec = LoraSpec.model_validate({**self.lora(), "aggregation": "factors"})
        dirs = self.world.het_slms if self.method.het else [self.world.slm_dir] * len(self.world.devices)
        models = [(attach_lora(m, spec, _round_seed(self.seed, 1)), tok) for m, tok in map(load_checkpoint, dirs)]
        return self._local_rounds(models, self.device_records(), llm=None)

    def centralized(self) -> list[dict[str, Any]]:
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import attach_lora
        from common.protocol import LoraSpec

        pooled = [r for records in self.device_records() for r in records]
        aux = self.aux_records()
        if all(r.response for r in aux):
            pooled += aux
        spec = LoraSpec.model_validate({**self.lora(), "aggregation": "factors"})
        slm = [(attach_lora(m, spec, self.seed), tok) for m, tok in [load_checkpoint(self.world.slm_dir)]]
        llm_model, llm_tok = load_checkpoint(self.world.llm_dir)
        llm = (attach_lora(llm_model, spec, self.seed), llm_tok)
        return self._local_rounds(slm, [pooled], llm=llm, llm_records=pooled)

    def _local_rounds(self, slms: list[Model], data: list[list], llm: Model | None,
                      llm_records: list | None = None) -> list[dict[str, Any]]:
        from common.ml.train import train_lora

        out = []
        for number in range(1, self.rounds + 1):
            started = time.perf_counter()
            for (model, tok), records in zip(slms, data, strict=True):
                train_lora(model, tok, records, self.train(), seed=_round_seed(self.seed, number))
            if llm is not None:
                train_lora(llm[0], llm[1], llm_records, self.train(lr=self.s["distill"]["lr"]),
                           seed=_round_seed(self.seed, number))
            elapsed = time.perf_counter() - started
            out.append({"round": number, **self.score(number, slms, llm), "bytes_up": 0, "bytes_down": 0,
                        "time_s": elapsed})
        return out

    def strategy(self) -> list[dict[str, Any]]:
        from benchmarks.inprocess import Device, RoundRecord, run_inprocess
        from cloud.store import BlobStore
        from cloud.strategies import ServedModel, strategy_class

        spec = self.spec()
        cls = strategy_class(spec.algorithm)
        cls.check_spec(spec)
        strategy = cls(spec, BlobStore(self.work / "store"))
        het = self.method.het
        devices = [Device(f"device-{k}", records, self.work / f"device-{k}",
                          local_slm=self.world.het_slms[k] if het else None)
                   for k, records in enumerate(self.device_records())]
        out: list[dict[str, Any]] = []

        def held(model: ServedModel) -> Model:
            return strategy.holder.with_adapter(model.checkpoint, model.lora, model.seed, model.adapter_digest)

        def after_round(record: RoundRecord, devs: Sequence[Device]) -> None:
            shared = strategy.exportable_model(record.outputs)
            own = het or shared is None
            slms = [d.handler.device_model(record.info) for d in devs] if own else [held(shared)]  # type: ignore[union-attr]
            served = strategy.llm_adapter(record.outputs)
            llm = held(served) if served is not None and self.method.llm else None
            metrics = record.metrics or {}
            extra = {k: metrics[k] for k in ("aggregation", "crosslm", "distill") if k in metrics}
            out.append({"round": record.round, **self.score(record.round, slms, llm),
                        "bytes_up": sum(record.bytes_up) / len(record.bytes_up),
                        "bytes_down": sum(record.bytes_down) / len(record.bytes_down),
                        "time_s": max(record.device_s) + record.server_s, "extra": _jsonable(extra)})

        run_inprocess(strategy, devices, self.rounds, self.work, after_round=after_round)
        return out

    def spec(self) -> Any:
        from common.protocol import RunSpec

        m, s = self.method, self.s
        params: dict[str, Any] = {}
        if m.algorithm == "co-plms":
            params = dict(s.get("coplms", {}))
            if params.get("saml_data") == "private+prompts":
                params["saml_prompts"] = str(self.world.prompt_pool)
        elif m.algorithm == "crosslm":
            params = {**s.get("crosslm", {}), **m.params}
            samples = params.get("synthesis") == "samples"
            params["prompt_data"] = str(self.world.instructions if samples else self.world.prompt_pool)
        return RunSpec.model_validate({
            "name": "bench-" + m.name.replace("+", "-plus-"), "algorithm": m.algorithm, "slm": str(self.world.slm_dir),
            "llm": str(self.world.llm_dir), "rounds": self.rounds, "min_clients": len(self.world.devices),
            "aux_data": str(self.world.aux[self.cfg.aux]), "seed": self.seed, "lora": self.lora(),
            "train": s["train"], "distill": {**s["distill"], **m.distill}, "params": params,
            "eval_max_new_tokens": self.world.max_new_tokens, "update_encoding": m.encoding,
        })

    def run(self) -> list[dict[str, Any]]:
        kinds: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "zero-shot": self.zero_shot, "standalone": self.standalone, "centralized": self.centralized,
            "strategy": self.strategy}
        return kinds[self.method.kind]()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def applicable(method: Method, aux: str, world: World) -> bool:
    """fedavg+aux needs answers in the auxiliary data; every other method runs in every mode."""
    if not method.labelled_aux:
        return True
    from common.records import read_jsonl

    return all(r.response for r in read_jsonl(world.aux[aux]))


# The settings each kind of method depends on: a finished run is reused only while these are unchanged.
_DEPENDS = {"zero-shot": ("rounds",), "standalone": ("rounds", "lora", "train"),
            "centralized": ("rounds", "lora", "train", "distill.lr")}
_STRATEGY_DEPENDS = {"fedavg": ("rounds", "lora", "train"), "fedcollm": ("rounds", "lora", "train", "distill"),
                     "co-plms": ("rounds", "lora", "train", "distill", "coplms"),
                     "crosslm": ("rounds", "lora", "train", "distill", "crosslm")}


def run_key(method: Method, cfg: QualityConfig, ws: int, seed: int) -> str:
    """What a run's result depends on, hashed: method, world, seed, split, aux mode, the settings it reads."""
    import hashlib

    depends = _DEPENDS.get(method.kind) or _STRATEGY_DEPENDS[method.algorithm or ""]
    picked = {}
    for path in depends:
        section, _, key = path.partition(".")
        value = cfg.settings.get(section)
        picked[path] = value.get(key) if key and isinstance(value, dict) else value
    payload = {"method": method.name, "track": cfg.track, "aux": cfg.aux if method.reads_aux else "any",
               "world": ws, "seed": seed,
               "scale": cfg.scale, "split": cfg.final_split, "curves": cfg.curves, "settings": picked}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _finished(work: Path, key: str) -> dict[str, Any] | None:
    path = work / "result.json"
    if not path.is_file():
        return None
    kept = json.loads(path.read_text(encoding="utf-8"))
    return kept["run"] if kept.get("key") == key else None


def _keep(work: Path, key: str, run: dict[str, Any]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / "result.json.tmp"
    tmp.write_text(json.dumps({"key": key, "run": run}), encoding="utf-8")
    tmp.replace(work / "result.json")  # a crash never leaves half a result


def _world(cfg: QualityConfig, ws: int) -> World:
    return build_world(cfg.track, Path(cfg.out_dir) / "worlds" / str(ws), ws, cfg.scale, cfg.cache_dir, cfg.progress)


def run_world(cfg: QualityConfig, ws: int, world: World | None = None, seeds: Sequence[int] | None = None,
              methods: Sequence[str] | None = None) -> tuple[int, World, dict[str, Any]]:
    """Every method and training seed (or only `methods`, `seeds`) in the world of seed `ws`:
    (ws, world, method -> seed -> run). Zero-shot runs once per world, with the first of cfg.seeds."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *_a, **_k: None)
    world = world or _world(cfg, ws)
    ev = Evaluator(world)
    runs: dict[str, dict[str, Any]] = {}
    for name in methods or cfg.methods:
        method = METHODS[name]
        if not applicable(method, cfg.aux, world):
            say(f"{name}: skipped, the {cfg.aux!r} auxiliary data carries no answers")
            continue
        for seed in cfg.seeds if method.kind != "zero-shot" else cfg.seeds[:1]:
            if seeds is not None and seed not in seeds:
                continue
            aux = cfg.aux if method.reads_aux else "any"
            work = Path(cfg.runs_dir or Path(cfg.out_dir) / "runs") / f"{name}-{aux}-w{ws}-s{seed}"
            key = run_key(method, cfg, ws, seed)
            done = _finished(work, key)
            if done is not None:  # finished before (an interrupted benchmark resumes here)
                runs.setdefault(name, {})[str(seed)] = {**done, "kept": True}
                say(f"{name:>16} world {ws} seed {seed}: kept from {work}", flush=True)
                continue
            shutil.rmtree(work, ignore_errors=True)  # what an interrupted attempt left
            t0, eval0, reads0 = time.perf_counter(), ev.seconds, ev.test_reads
            rounds = Run(method, world, ev, seed, cfg, work).run()
            reads = ev.test_reads - reads0
            if cfg.final_split == "test" and reads != (2 if method.llm else 1):
                raise RuntimeError(f"{name}: the test split was read {reads} times")
            wall = time.perf_counter() - t0 - (ev.seconds - eval0)
            runs.setdefault(name, {})[str(seed)] = {"rounds": rounds, "wall_s": wall}
            _keep(work, key, runs[name][str(seed)])
            final = rounds[-1][cfg.final_split]
            llm = f", LLM Rouge-L {100 * final['llm']['rougeL']:.1f}" if final["llm"] else ""
            say(f"{name:>16} world {ws} seed {seed}: SLM Rouge-L {100 * final['slm']['rougeL']:.1f}{llm} "
                f"({wall:.0f} s training, {time.perf_counter() - t0:.0f} s with evaluation)", flush=True)
    return ws, world, runs


def run_quality_benchmark(cfg: QualityConfig, worlds: dict[int, World] | None = None) -> dict[str, Any]:
    """Run every method x world seed x training seed; write the report under cfg.out_dir.

    `worlds` replaces building the track's worlds (tests pass tiny ones).
    """
    import torch

    from benchmarks.cotuning_claims import claims, summarize
    from benchmarks.cotuning_report import write_results

    check_methods(cfg.methods)
    if cfg.aux not in AUX_MODES:
        raise ValueError(f"unknown auxiliary mode {cfg.aux!r}; choose from {', '.join(AUX_MODES)}")
    if not cfg.seeds or not cfg.world_seeds or cfg.scale <= 0:
        raise ValueError("need at least one world seed and one training seed, and scale > 0")
    cfg.settings = cfg.settings or load_settings(cfg.track)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = print if cfg.progress else (lambda *_a, **_k: None)
    runs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in cfg.methods}
    world_stats, built = {}, {}
    given = worlds or {}
    if cfg.workers > 1:  # even one world x one seed holds a job per method
        # Worlds are built first, one process each; then one job per method x world x training seed,
        # so the workers stay busy however few worlds and seeds there are (spawned: torch is not
        # fork-safe). A finished run is kept on disk either way, so the split changes no result.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            missing = [ws for ws in cfg.world_seeds if ws not in given]
            given = {**given, **dict(zip(missing, pool.map(_world, [cfg] * len(missing), missing), strict=True))}
            jobs = [(ws, seed, name) for seed in cfg.seeds for ws in cfg.world_seeds for name in cfg.methods
                    if METHODS[name].kind != "zero-shot" or seed == cfg.seeds[0]]
            # The longest first: the pool takes jobs in order, so the last to start are the short ones.
            jobs.sort(key=lambda job: -METHODS[job[2]].cost)
            parts = list(pool.map(run_world, [cfg] * len(jobs), [ws for ws, _, _ in jobs],
                                  [given[ws] for ws, _, _ in jobs], [(seed,) for _, seed, _ in jobs],
                                  [(name,) for _, _, name in jobs]))
        merged: dict[int, tuple[int, World, dict[str, Any]]] = {}
        for ws, world, by_method in parts:
            into = merged.setdefault(ws, (ws, world, {}))[2]
            for name, by_seed in by_method.items():
                into.setdefault(name, {}).update(by_seed)
        done = [merged[ws] for ws in cfg.world_seeds]
    else:
        done = [run_world(cfg, ws, given.get(ws)) for ws in cfg.world_seeds]
    for ws, world, by_method in done:
        world_stats[str(ws)], built[str(ws)] = world.stats, world
        for name, by_seed in by_method.items():
            runs[name][str(ws)] = by_seed
    runs = {m: r for m, r in runs.items() if r}
    results = {
        "config": {"track": cfg.track, "aux": cfg.aux, "world_seeds": list(cfg.world_seeds), "workers": cfg.workers,
                   "seeds": list(cfg.seeds), "methods": list(runs), "scale": cfg.scale,
                   "settings": cfg.settings, "final_split": cfg.final_split, "threads": torch.get_num_threads()},
        "worlds": world_stats,
        "runs": runs,
        "summary": summarize(runs, cfg.final_split),
        "total_wall_s": time.perf_counter() - started,
        "runs_kept": sum(bool(r.get("kept")) for by_ws in runs.values() for by_seed in by_ws.values()
                         for r in by_seed.values()),
        "runs_total": sum(len(by_seed) for by_ws in runs.values() for by_seed in by_ws.values()),
    }
    if cfg.final_split == "test":
        results["claims"] = claims(runs, built)
    say(write_results(results, out_dir))
    return results
