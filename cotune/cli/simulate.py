"""`cotune simulate`: N virtual devices through the real coordinator, their training as Ray tasks.

A typer command function; cotune/cli/main.py registers it. Bad options are typer.BadParameter
(naming the flag); what the engine refuses is one line through `main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def simulate_command(
    out: Annotated[Path, typer.Option(help="results folder: simulation.json, .md, .png and final/ adapters")],
    devices: Annotated[int | None, typer.Option(help="virtual devices (with --data-dir: its number of files)",
                                                min=1)] = None,
    rounds: Annotated[int | None, typer.Option(help="co-tuning rounds (default: the run config's, else 3)",
                                               min=1)] = None,
    data: Annotated[Path | None, typer.Option(
        help="one task JSONL split among the devices by --partition (default: the demo's synthetic task)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="a folder of one JSONL per device, in name order")] = None,
    partition: Annotated[str, typer.Option(
        help="iid | field:NAME | dirichlet:ALPHA[:FIELD] (FIELD defaults to domain)")] = "iid",
    algorithm: Annotated[str | None, typer.Option(
        help="fedavg | fedcollm | co-plms | crosslm (default: the run config's, else fedavg)")] = None,
    slm: Annotated[Path | None, typer.Option(help="the shared SLM checkpoint (default: tiny models built here)")
                   ] = None,
    llm: Annotated[Path | None, typer.Option(help="the LLM checkpoint (fedcollm, co-plms, crosslm)")] = None,
    aux_data: Annotated[Path | None, typer.Option(help="public auxiliary JSONL for the server step")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="held-out JSONL the coordinator scores each round")] = None,
    run_config: Annotated[Path | None, typer.Option(
        help="TOML run settings (a [run] table as in `cotune serve --config`: lora, train, distill, params, "
             "aggregation, privacy, ...); flags win")] = None,
    epochs: Annotated[float | None, typer.Option(help="local epochs per round", min=0.0)] = None,
    batch_size: Annotated[int | None, typer.Option(help="local batch size", min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="local learning rate", min=0.0)] = None,
    max_steps: Annotated[int | None, typer.Option(help="at most this many local steps per round", min=1)] = None,
    max_len: Annotated[int | None, typer.Option(help="tokens per training sequence", min=8)] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank", min=1)] = None,
    seed: Annotated[int | None, typer.Option(
        help="seed for the partition, the models and training (default: the run config's, else 0)")] = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="run every device in this process, one at a time "
                                                          "(the same tasks; no Ray needed)")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="a Ray cluster to run on (e.g. auto, or ray://head:10001); default: start a local Ray")] = None,
    local_cpus: Annotated[int | None, typer.Option(
        help="CPUs of the local Ray this command starts (default: every core)", min=1)] = None,
    num_cpus: Annotated[float, typer.Option(help="CPUs each device task asks Ray for (fractions allowed)",
                                            min=0.0)] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="GPUs each device task asks Ray for (e.g. 0.25)", min=0.0)] = 0.0,
    max_parallel: Annotated[int | None, typer.Option(help="at most this many devices training at once",
                                                     min=1)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
    keep_work: Annotated[bool, typer.Option(help="keep the coordinator's store and state folder (out/work)")
                         ] = False,
) -> None:
    """Simulate N devices, each with its own data, through the real strategies, device handlers and
    round state machine, with the devices' training as Ray tasks; write per-round figures."""
    import logging
    import shutil

    from cotune.simulation.engine import simulate
    from cotune.simulation.job import JobOptions, prepare_job
    from cotune.simulation.partition import PartitionError, parse_partition
    from cotune.simulation.report import write_report

    try:
        parse_partition(partition)
    except PartitionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--partition") from None
    if not no_ray and num_cpus == 0 and num_gpus == 0:
        raise typer.BadParameter("a device task needs some resource: give --num-cpus or --num-gpus above 0",
                                 param_hint="--num-cpus")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # one line a round instead, unless --debug
        for noisy in ("cotune.rounds", "cotune.updates"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides: dict[str, Any] = {}
    train = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "max_steps": max_steps,
                                "max_len": max_len}.items() if v is not None}
    if train:
        overrides["train"] = train
    if lora_r is not None:
        overrides["lora"] = {"r": lora_r, "alpha": 2.0 * lora_r}
    # Torch threads per device: the whole CPUs it asks for, at least one, with or without Ray, so
    # the two give the same bits.
    threads = max(1, int(num_cpus))
    job = prepare_job(JobOptions(out_dir=out, devices=devices, rounds=rounds, data=data, data_dir=data_dir,
                                 partition=partition, algorithm=algorithm, slm=slm, llm=llm, aux_data=aux_data,
                                 eval_data=eval_data, run_config=run_config, seed=seed, threads=threads,
                                 overrides=overrides), say=typer.echo)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    executor = _executor(no_ray, work / "node", ray_address, local_cpus, num_cpus, num_gpus, max_parallel)
    try:
        typer.echo(f"simulating {len(job.devices)} devices x {job.spec.rounds} rounds of {job.spec.algorithm} "
                   f"({executor.describe()['executor']})")
        result = simulate(job, executor, work, out / "final", progress=progress, say=typer.echo)
    finally:
        executor.close()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    paths = write_report(result, out)
    typer.echo(paths["md"].read_text(encoding="utf-8"))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


def _executor(no_ray: bool, scratch: Path, address: str | None, local_cpus: int | None, num_cpus: float,
              num_gpus: float, max_parallel: int | None) -> Any:
    from cotune.simulation.executors import LocalExecutor, RayExecutor, RayOptions

    if no_ray:
        return LocalExecutor(scratch)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise typer.BadParameter('Ray is not installed: pip install "cotune[simulate]", or pass --no-ray to run '
                                 "every device in this process") from None
    return RayExecutor(RayOptions(address=address, local_cpus=local_cpus, num_cpus=num_cpus, num_gpus=num_gpus,
                                  max_parallel=max_parallel), scratch)
