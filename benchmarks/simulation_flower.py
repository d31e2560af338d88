"""The Flower side of the simulation benchmark (benchmarks/simulation.py): the same FedAvg LoRA
job written as a Flower ClientApp and ServerApp, run by Flower's simulation engine
(`flwr.simulation.run_simulation`, on Ray).

Each device is a Flower SuperNode whose ClientApp reads its partition (`partition-id` ->
the N-th file of the data folder), loads the SLM, attaches LoRA, loads the global adapter
(a LoRA state dict carried as Flower's ArrayRecord), trains with the very function a cotune
device runs (common.ml.train.train_lora, seed `seed * 100003 + round` as cotune's strategies
seed a round) and replies with its adapter and its number of examples. The ServerApp runs
Flower's message-API FedAvg (every node, every round, no client-side evaluation) and times each
round from the callback Flower calls after it.

Run by benchmarks/simulation.py in the Python that has `flwr[simulation]` (its own venv when its
pins disagree with this project's), as `python -m benchmarks.simulation_flower CONFIG.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _round_seed(seed: int, round_number: int) -> int:
    # cloud/strategies/base.py Strategy.round_seed: what a cotune device trains round n with.
    return seed * 100_003 + round_number


def _device_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.suffix == ".jsonl")


def build_apps(cfg: dict[str, Any], log: dict[str, Any]) -> tuple[Any, Any]:
    """The ServerApp and the ClientApp for `cfg`; the server writes its figures into `log`."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from common.protocol import LoraSpec, TrainSpec

    lora, train = LoraSpec.model_validate(cfg["lora"]), TrainSpec.model_validate(cfg["train"])
    files = [str(p) for p in _device_files(Path(cfg["data_dir"]))]
    client_app = ClientApp()

    @client_app.train()
    def local_training(msg: Message, context: Context) -> Message:
        import torch

        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import adapter_state, attach_lora, load_adapter_state
        from common.ml.train import train_lora
        from common.records import read_jsonl

        torch.set_num_threads(max(1, int(cfg["num_cpus"])))
        records = read_jsonl(files[int(context.node_config["partition-id"])])
        seed = _round_seed(cfg["seed"], int(msg.content["config"]["server-round"]))
        model, tokenizer = load_checkpoint(cfg["slm"])
        model = attach_lora(model, lora, seed)
        load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
        report = train_lora(model, tokenizer, records, train, seed=seed)
        content = RecordDict({"arrays": ArrayRecord(adapter_state(model)),
                              "metrics": MetricRecord({"num-examples": len(records),
                                                       "train_loss": float(report["loss_mean"])})})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, noting how many replies each round aggregated."""

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            log["replies"].append(sum(not m.has_error() for m in replies))
            log["errors"] += [m.error.reason for m in replies if m.has_error()][:3]
            return super().aggregate_train(server_round, replies)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora

        model, _tok = load_checkpoint(cfg["slm"])
        initial = adapter_state(attach_lora(model, lora, cfg["seed"]))  # cotune's starting adapter too
        n = cfg["devices"]
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                               min_available_nodes=n)

        def after_round(server_round: int, _arrays: Any) -> None:
            log["round_ends"].append(time.perf_counter())
            return None

        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg["rounds"],
                                evaluate_fn=after_round)
        final = {k: v.float().contiguous() for k, v in result.arrays.to_torch_state_dict().items()}
        Path(cfg["adapter_out"]).write_bytes(adapter_to_bytes(final))

    return server_app, client_app


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    log: dict[str, Any] = {"round_ends": [], "replies": [], "errors": []}
    server_app, client_app = build_apps(cfg, log)
    backend = {"client_resources": {"num_cpus": cfg["num_cpus"], "num_gpus": 0.0},
               "init_args": {"num_cpus": cfg["local_cpus"], "include_dashboard": False}}
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg["devices"], backend_config=backend)
    ends = log["round_ends"]
    import flwr

    # evaluate_fn runs once before round 1 (the start) and after each round.
    return {"flwr": flwr.__version__, "total_s": time.perf_counter() - started,
            "setup_s": ends[0] - started if ends else None,
            "round_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
            "replies": log["replies"], "errors": log["errors"], "adapter": cfg["adapter_out"]}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m benchmarks.simulation_flower CONFIG.json RESULT.json")
    cfg = json.loads(Path(args[0]).read_text())
    try:
        Path(args[1]).write_text(json.dumps(run(cfg), indent=2))
    except BaseException:
        # A crashed simulation runtime leaves the ServerApp's thread waiting for nodes for ever:
        # report and leave without waiting for it.
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
