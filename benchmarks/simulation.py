"""Side by side with Flower: the same FedAvg LoRA job simulated by `cotune simulate` and by
Flower's simulation engine, for N devices.

Same job on both: the demo world's pretrained tiny SLM (cotune/demo/world.py, cached), its
devices' pooled training records split among N devices by one Dirichlet(alpha) partition over
the domain (cotune.simulation.partition, written as one JSONL per device and read by both), the
same LoRA and local training settings, the same starting adapter and per-round training seeds,
the same training function on the device (common.ml.train.train_lora), and Ray underneath both
with one CPU per device task on a local Ray of the same size. cotune's side runs the real
coordinator (strategy, round state machine, upload checks) in process; Flower's runs a
ClientApp and a ServerApp written for this benchmark (benchmarks/simulation_flower.py) with its
message-API FedAvg.

Each side runs in its own process (Flower's in the Python that has `flwr[simulation]`, since its
pins may not fit this project's), sampled every 0.25 s for the RSS summed over its process
tree (Ray's processes and workers are its descendants; shared pages count once per process on
both sides alike). Reported per side and N, as medians of `--repeats` runs with the sides
alternating: seconds per round (from sending the round's work to holding its aggregate), the
process's total, peak RSS; Rouge-L / exact match of the final adapter on the world's test
split (common.ml.evaluate, scored here the same way for both); and the Flower/cotune ratios.
The two final adapters are also compared: they differ only by float rounding in aggregation
(cotune sums in float64, Flower in float32, in reply order).

    python -m benchmarks.simulation --devices 10 --flower-python /path/to/flower-env/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import Column, Panel, plot_bars, write_report

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.25


@dataclass
class BenchConfig:
    out_dir: Path = Path("results/simulation")
    work_dir: Path = Path(".cotune/bench-simulation")
    devices: tuple[int, ...] = (10, 100)
    rounds: int = 3
    flower_python: str | None = None
    local_cpus: int | None = None  # the local Ray's CPUs on both sides (default: usable cores)
    seed: int = 0
    partition: str = "dirichlet:0.5"
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 8, "alpha": 16.0})
    train: dict[str, Any] = field(default_factory=lambda: {"epochs": 1.0, "lr": 5e-3, "batch_size": 16,
                                                           "max_len": 48})
    eval_max_new_tokens: int = 24  # the synthetic answers are a few words
    repeats: int = 3
    timeout_s: float = 3600.0


class TreeMemory:
    """Peak RSS of a process and all its descendants, sampled from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total, count = 0, 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in tree:
                try:
                    total += proc.memory_info().rss
                    count += 1
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.processes = max(self.processes, count)
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def run_process(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[float, TreeMemory]:
    """Run `cmd` to its end, logging to `log_path`; its wall seconds and its tree's memory."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        with TreeMemory(proc.pid) as memory:
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"{cmd[:4]} ran past {timeout:.0f} s; see {log_path}") from None
        wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:5])} ... exited with {code}; the end of {log_path}:\n{tail}")
    return wall, memory


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", FLWR_TELEMETRY_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    return env


def find_flower_python(given: str | None) -> str:
    """The Python to run Flower's side: --flower-python, $COTUNE_FLOWER_PYTHON, or this one if it has flwr."""
    chosen = given or os.environ.get("COTUNE_FLOWER_PYTHON")
    if chosen is None:
        import importlib.util

        if importlib.util.find_spec("flwr") is None:
            raise SystemExit('Flower is not installed here: pip install "flwr[simulation]" (or "cotune[simulate]"), or '
                             "pass --flower-python with a Python that has it (a venv of its own when its pins clash "
                             "with this project's), torch, transformers and peft")
        return sys.executable
    probe = subprocess.run([chosen, "-c", "import flwr, ray, torch, peft, transformers; print(flwr.__version__)"],
                           capture_output=True, text=True, env=child_env())
    if probe.returncode != 0:
        raise SystemExit(f"{chosen} cannot import flwr, ray, torch, peft and transformers: {probe.stderr[-400:]}")
    return chosen


# -- the job --------------------------------------------------------------------------------


def prepare_world(cfg: BenchConfig) -> Any:
    from common.cache import cache_root
    from cotune.demo.world import prepare_world as demo_world

    return demo_world(cfg.work_dir / "world", num_clients=3, seed=cfg.seed, cache_dir=cache_root(), progress=False)


def split_data(world: Any, n: int, cfg: BenchConfig) -> Path:
    """One JSONL per device under work/data-N: the world's device records, split once for both sides."""
    from common.records import read_jsonl, write_jsonl
    from cotune.simulation.partition import parse_partition, partition, rows_of

    pool = [r for name, path in sorted(world.data.items()) if name.startswith("client_") and not name.endswith("_test")
            for r in read_jsonl(path)]
    rows = rows_of(pool)
    parts = partition(rows, parse_partition(cfg.partition), n, seed=cfg.seed)
    folder = cfg.work_dir / f"data-{n}"
    for old in folder.glob("*.jsonl"):
        old.unlink()
    for k, part in enumerate(parts):
        write_jsonl(folder / f"device-{k:04d}.jsonl", [rows[i].record for i in part])
    return folder


def run_cotune(world: Any, n: int, data_dir: Path, cfg: BenchConfig, cpus: int) -> dict[str, Any]:
    out = cfg.work_dir / f"cotune-{n}"
    config = cfg.work_dir / "run.toml"
    lines = ["[run]", f"seed = {cfg.seed}", "", "[run.lora]", *(f"{k} = {json.dumps(v)}" for k, v in cfg.lora.items()),
             "", "[run.train]", *(f"{k} = {json.dumps(v)}" for k, v in cfg.train.items())]
    config.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "cotune.cli.main", "simulate", "--data-dir", str(data_dir), "--slm",
           str(world.slm_dir), "--algorithm", "fedavg", "--rounds", str(cfg.rounds), "--run-config", str(config),
           "--local-cpus", str(cpus), "--num-cpus", "1", "--out", str(out), "--no-progress"]
    wall, memory = run_process(cmd, child_env(), out.with_suffix(".log"), cfg.timeout_s)
    report = json.loads((out / "simulation.json").read_text())
    rounds = report["rounds"]
    if [r["updates"] for r in rounds] != [n] * cfg.rounds:
        raise RuntimeError(f"cotune: rounds aggregated {[r['updates'] for r in rounds]} updates, not {n} each")
    return {"system": "cotune", "total_s": wall, "peak_rss": memory.peak, "processes": memory.processes,
            # From the round's work going out to its aggregate: round 1's opening (the starting
            # inputs published) is set-up, as Flower's before its first round is.
            "round_s": [r["wall_s"] - r["open_s"] for r in rounds],
            "adapter": report["final"]["slm_adapter"]["path"], "version": None}


def run_flower(world: Any, n: int, data_dir: Path, cfg: BenchConfig, cpus: int, python: str) -> dict[str, Any]:
    out = cfg.work_dir / f"flower-{n}"
    out.mkdir(parents=True, exist_ok=True)
    job = {"slm": str(world.slm_dir), "data_dir": str(data_dir), "devices": n, "rounds": cfg.rounds,
           "lora": cfg.lora, "train": cfg.train, "seed": cfg.seed, "local_cpus": cpus, "num_cpus": 1,
           "adapter_out": str(out / "adapter.safetensors")}
    (out / "job.json").write_text(json.dumps(job, indent=2))
    cmd = [python, "-m", "benchmarks.simulation_flower", str(out / "job.json"), str(out / "result.json")]
    wall, memory = run_process(cmd, child_env(), out / "flower.log", cfg.timeout_s)
    result = json.loads((out / "result.json").read_text())
    if result["replies"] != [n] * cfg.rounds:
        raise RuntimeError(f"flower: rounds aggregated {result['replies']} replies, not {n} each; errors: "
                           f"{result['errors']}")
    return {"system": "flower", "total_s": wall, "peak_rss": memory.peak, "processes": memory.processes,
            "round_s": result["round_s"], "adapter": result["adapter"], "version": result["flwr"]}


def score(world: Any, adapter: str, cfg: BenchConfig) -> dict[str, Any]:
    """Rouge-L and exact match of the SLM with `adapter` on the world's test split."""
    from common.ml.checkpoint import load_checkpoint
    from common.ml.evaluate import evaluate
    from common.ml.lora import adapter_from_bytes, attach_lora, load_adapter_state
    from common.protocol import LoraSpec
    from common.records import read_jsonl

    model, tokenizer = load_checkpoint(world.slm_dir)
    model = attach_lora(model, LoraSpec.model_validate(cfg.lora), cfg.seed)
    load_adapter_state(model, adapter_from_bytes(Path(adapter).read_bytes())[0])
    scores = evaluate(model, tokenizer, read_jsonl(world.data["test"]), max_new_tokens=cfg.eval_max_new_tokens)
    return {"rougeL": scores["rougeL"], "em": scores["em"], "n": scores["n"]}


def adapter_gap(a: str, b: str) -> dict[str, float]:
    """How far apart two adapters are: the largest difference and the relative L2 distance."""
    import numpy as np

    from common.tensorfile import load_arrays, read_header

    x, y = load_arrays(Path(a), read_header(Path(a))), load_arrays(Path(b), read_header(Path(b)))
    if set(x) != set(y):
        raise RuntimeError(f"the adapters hold different tensors: {sorted(set(x) ^ set(y))[:3]}")
    diff = sum(float(np.sum((np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64)) ** 2)) for k in x)
    norm = sum(float(np.sum(np.asarray(x[k], np.float64) ** 2)) for k in x)
    top = max(float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64)))) for k in x)
    return {"max_abs_diff": top, "relative_l2": (diff / norm) ** 0.5 if norm else 0.0}


def row(runs: list[dict[str, Any]], n: int, scores: dict[str, Any]) -> dict[str, Any]:
    """One side at one N: medians over its repeated runs (the machines are shared)."""
    from statistics import median

    side = runs[0]
    per_round = [median(r["round_s"][k] for r in runs) for k in range(len(side["round_s"]))]
    return {"label": f"{side['system']} N={n}", "system": side["system"], "devices": n, "repeats": len(runs),
            "round_s_mean": median(sum(r["round_s"]) / len(r["round_s"]) for r in runs),
            "round_s": [round(s, 3) for s in per_round], "total_s": median(r["total_s"] for r in runs),
            "peak_rss_mib": median(r["peak_rss"] for r in runs) / 2**20, "processes": side["processes"],
            "rougeL": scores["rougeL"], "em": scores["em"], "version": side["version"]}


def ratio_row(flower: dict[str, Any], cotune: dict[str, Any], n: int, gap: dict[str, float]) -> dict[str, Any]:
    return {"label": f"flower / cotune N={n}", "system": "ratio", "devices": n,
            "round_s_mean": flower["round_s_mean"] / cotune["round_s_mean"],
            "total_s": flower["total_s"] / cotune["total_s"],
            "peak_rss_mib": flower["peak_rss_mib"] / cotune["peak_rss_mib"],
            "rougeL": flower["rougeL"] / cotune["rougeL"] if cotune["rougeL"] else None,
            "adapter_max_abs_diff": gap["max_abs_diff"], "adapter_relative_l2": gap["relative_l2"]}


def _num(v: float) -> str:
    # Seconds and MiB, and ratios near 1, in one column.
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


COLUMNS = [Column("label", "run"), Column("round_s_mean", "s/round (mean)", _num),
           Column("round_s", "s per round", lambda v: " / ".join(f"{s:.1f}" for s in v)),
           Column("total_s", "process s", _num), Column("peak_rss_mib", "peak RSS MiB (tree)", _num),
           Column("rougeL", "test Rouge-L", "{:.3f}"), Column("em", "test EM", "{:.3f}"),
           Column("adapter_relative_l2", "adapter gap (rel. L2)", "{:.1e}")]
PANELS = [Panel("round_s_mean", "seconds per round (mean)"), Panel("peak_rss_mib", "peak RSS of the process tree, MiB"),
          Panel("rougeL", "final Rouge-L on the test split")]


def run_benchmark(cfg: BenchConfig) -> dict[str, Path]:
    python = find_flower_python(cfg.flower_python)
    cpus = cfg.local_cpus or len(os.sched_getaffinity(0))
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    world = prepare_world(cfg)
    rows: list[dict[str, Any]] = []
    for n in cfg.devices:
        data_dir = split_data(world, n, cfg)
        ours, theirs = [], []
        for k in range(cfg.repeats):  # alternating, so a change in the machine's load hits both sides
            print(f"N={n}, run {k + 1}/{cfg.repeats}: cotune simulate ...", flush=True)
            ours.append(run_cotune(world, n, data_dir, cfg, cpus))
            print(f"N={n}, run {k + 1}/{cfg.repeats}: Flower run_simulation ...", flush=True)
            theirs.append(run_flower(world, n, data_dir, cfg, cpus, python))
        # Scored once: every cotune run ends with the same bits, every Flower run within float rounding.
        ours_row = row(ours, n, score(world, ours[-1]["adapter"], cfg))
        theirs_row = row(theirs, n, score(world, theirs[-1]["adapter"], cfg))
        gap = adapter_gap(ours[-1]["adapter"], theirs[-1]["adapter"])
        rows += [ours_row, theirs_row, ratio_row(theirs_row, ours_row, n, gap)]
    flwr_version = next((r["version"] for r in rows if r["system"] == "flower"), None)
    notes = [
        f"FedAvg, LoRA {cfg.lora}, local training {cfg.train}, {cfg.rounds} rounds, data split {cfg.partition} "
        f"(seed {cfg.seed}); both on a local Ray of {cpus} CPUs, one CPU per device task; Flower {flwr_version}. "
        f"Times and memory are medians of {cfg.repeats} runs per side, alternating.",
        "s/round: from sending a round's work to holding its aggregate (cotune: the coordinator's round, less "
        "round 1's publishing of the starting inputs; Flower: between the ServerApp's per-round callbacks).",
        "Peak RSS sums every process of the side's tree (driver, Ray's daemons and workers), sampled every "
        f"{SAMPLE_S} s; pages shared between processes count in each, on both sides alike.",
        "Adapter gap: relative L2 distance between the two final adapters (float rounding in aggregation only).",
        "Ratios are Flower / cotune: above 1, Flower took more.",
    ]
    meta = {"rounds": cfg.rounds, "devices": list(cfg.devices), "lora": cfg.lora, "train": cfg.train,
            "partition": cfg.partition, "seed": cfg.seed, "local_cpus": cpus, "repeats": cfg.repeats,
            "flower_python": python}
    paths = write_report(cfg.out_dir, "simulation", "Simulating N devices: cotune simulate vs Flower", rows,
                         COLUMNS, meta=meta, notes=notes)
    # The plot shows the measured runs; the ratios are in the table.
    measured = [r for r in rows if r["system"] != "ratio"]
    paths["png"] = plot_bars(cfg.out_dir / "simulation.png", measured, PANELS, "label", "system",
                             "Simulating N devices: cotune simulate vs Flower")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10,100", help="comma-separated numbers of devices (default 10,100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/simulation"))
    parser.add_argument("--work", type=Path, default=Path(".cotune/bench-simulation"))
    parser.add_argument("--flower-python", default=None,
                        help="a Python with flwr[simulation], torch, transformers and peft (default: "
                             "$COTUNE_FLOWER_PYTHON, else this one)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of each side's local Ray (default: usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and N; times are their medians")
    args = parser.parse_args(argv)
    cfg = BenchConfig(out_dir=args.out, work_dir=args.work, devices=tuple(int(x) for x in args.devices.split(",")),
                      rounds=args.rounds, flower_python=args.flower_python, local_cpus=args.cpus, seed=args.seed,
                      repeats=args.repeats)
    paths = run_benchmark(cfg)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
