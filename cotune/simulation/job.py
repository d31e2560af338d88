"""From `cotune simulate`'s options to a SimulationJob: the devices' data (one file split by a
partitioner, or one file per device), the models (given, or tiny ones built here) and the run
spec (a TOML run table like `cotune serve`'s `[run]`, under the flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from common.protocol import RunSpec
from common.records import read_jsonl
from cotune.simulation.engine import DeviceData, SimulationJob
from cotune.simulation.partition import describe, parse_partition, partition, read_rows
from cotune.simulation.world import build_tiny_models, synthetic_data, texts_of

# Methods whose server step needs an LLM and the public auxiliary data.
_NEEDS_LLM = ("fedcollm", "co-plms", "crosslm")


@dataclass
class JobOptions:
    out_dir: Path
    devices: int | None = None
    rounds: int | None = None  # None: the run config's, else 3
    data: Path | None = None
    data_dir: Path | None = None
    partition: str = "iid"
    algorithm: str | None = None  # None: the run config's, else fedavg
    slm: Path | None = None
    llm: Path | None = None
    aux_data: Path | None = None
    eval_data: Path | None = None
    run_config: Path | None = None
    seed: int | None = None  # None: the run config's, else 0
    threads: int = 1
    # RunSpec fields from flags, e.g. {"train": {"epochs": 1.0}, "lora": {"r": 8}}; over run_config.
    overrides: dict[str, Any] = field(default_factory=dict)


def prepare_job(opts: JobOptions, say: Any = print) -> SimulationJob:
    """Read and split the data, build what is missing, check the spec; ValueError says what is wrong."""
    if opts.data is not None and opts.data_dir is not None:
        raise ValueError("give --data FILE (split by --partition) or --data-dir DIR (one file per device), not both")
    base: dict[str, Any] = _run_table(opts.run_config) if opts.run_config else {}
    seed = opts.seed if opts.seed is not None else int(base.get("seed", 0))
    algorithm = (opts.algorithm or str(base.get("algorithm", "fedavg"))).strip().lower()
    info: dict[str, Any] = {"seed": seed}
    aux, eval_data = opts.aux_data, opts.eval_data
    defaults: dict[str, Any] = {}
    if opts.data_dir is not None:
        devices = _per_device_files(opts.data_dir, opts.devices)
        info["data"] = {"data_dir": str(opts.data_dir), "sizes": [len(d.records) for d in devices]}
    else:
        if opts.devices is None:
            raise ValueError("--devices N is needed with --data (or without data); --data-dir counts its files")
        data = opts.data
        if data is None:
            made = synthetic_data(opts.out_dir / "data", opts.devices, seed)
            say(f"no --data: the demo's synthetic task, {made.pool} (evaluated on {made.test})")
            data, aux, eval_data = made.pool, aux or made.aux, eval_data or made.test
            defaults["eval_max_new_tokens"] = 24  # its answers are a few words
        rows = read_rows(data)
        spec = parse_partition(opts.partition)
        parts = partition(rows, spec, opts.devices, seed=seed)
        devices = [DeviceData(f"device-{k:04d}", [rows[i].record for i in part]) for k, part in enumerate(parts)]
        info["data"] = {"file": str(data), "partition": describe(rows, parts, spec)}
    slm, llm = opts.slm, opts.llm
    needs_llm = algorithm in _NEEDS_LLM
    if slm is None:
        texts = [t for d in devices for t in texts_of(d.records)]
        for extra in (aux, eval_data):
            if extra is not None:
                texts += texts_of(read_jsonl(extra))
        models = build_tiny_models(texts, opts.out_dir / "models", seed, with_llm=needs_llm and llm is None)
        say(f"no --slm: tiny untrained models built in {opts.out_dir / 'models'}")
        slm, llm = models.slm_dir, llm or models.llm_dir
    elif needs_llm and llm is None:
        raise ValueError(f"{algorithm} needs an LLM: pass --llm DIR (or leave out --slm to build tiny models)")
    info["models"] = {"slm": str(slm), "llm": str(llm) if llm else None, "built": opts.slm is None}
    flags = {"name": base.get("name", "simulation"), "algorithm": algorithm, "slm": str(slm),
             "rounds": opts.rounds or int(base.get("rounds", 3)), "seed": seed, **({"llm": str(llm)} if llm else {}),
             **({"aux_data": str(aux)} if aux else {}), **({"eval_data": str(eval_data)} if eval_data else {})}
    run = _merge({**defaults, **base}, flags)
    run = _merge(run, opts.overrides)
    from pydantic import ValidationError

    try:
        spec_model = RunSpec.model_validate({**run, "min_clients": len(devices),
                                             "max_devices": max(len(devices), int(run.get("max_devices", 1000)))})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(f"invalid run settings: {problems}") from None
    return SimulationJob(spec=spec_model, devices=devices, threads=opts.threads, info=info)


def _per_device_files(folder: Path, expected: int | None) -> list[DeviceData]:
    if not folder.is_dir():
        raise ValueError(f"--data-dir {folder}: no such folder; give a folder of one JSONL file per device")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jsonl" and p.is_file())
    if not files:
        raise ValueError(f"--data-dir {folder} holds no .jsonl files; write one file of records per device")
    if expected is not None and expected != len(files):
        raise ValueError(f"--devices {expected}, but --data-dir {folder} holds {len(files)} .jsonl files (one per "
                         "device); leave out --devices or make them agree")
    return [DeviceData(p.stem, read_jsonl(p)) for p in files]


def _run_table(path: Path) -> dict[str, Any]:
    """A TOML file's run settings: its `[run]` table (as in `cotune serve --config`), or the whole file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--run-config {path}: {exc}") from None
    table = data.get("run", data)
    if not isinstance(table, dict):
        raise ValueError(f"--run-config {path}: [run] must be a table of run settings")
    return table


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
