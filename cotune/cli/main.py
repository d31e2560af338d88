"""`cotune`: one command for the coordinator, the devices and the demo.

Errors print as one line (what went wrong, what to do); `--debug` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cotune.cli.admin import builds_app, devices_app, runs_app, watch
from cotune.cli.bench_quality import bench_quality
from cotune.cli.bench_quant import bench_quant
from cotune.cli.bench_train import bench_train
from cotune.cli.edge_doctor import edge_doctor
from cotune.cli.edge_export import edge_export
from cotune.cli.edge_runtime import bench_latency, edge_bench, edge_generate
from cotune.cli.edge_serve import edge_serve
from cotune.cli.export import export_command
from cotune.cli.simulate import simulate_command

app = typer.Typer(
    name="cotune",
    help="Federated co-tuning of a cloud LLM and on-device SLMs.\n\n"
    "Start a coordinator with `cotune serve`, join devices with `cotune edge join`, "
    "or see it all run on tiny models with `cotune demo`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
edge_app = typer.Typer(help="Device side: take part in a co-tuning run.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")
bench_app = typer.Typer(help="Benchmarks: each writes JSON, a markdown table and a PNG plot.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(runs_app, name="runs")
app.add_typer(devices_app, name="devices")
app.add_typer(builds_app, name="builds")
app.command("watch")(watch)

_state: dict[str, Any] = {"debug": False}

# Commands written beside this file; their heavy imports happen only when they run.
app.command("export")(export_command)
app.command("simulate")(simulate_command)
edge_app.command("generate")(edge_generate)
edge_app.command("bench")(edge_bench)
edge_app.command("export")(edge_export)
edge_app.command("serve")(edge_serve)
edge_app.command("doctor")(edge_doctor)
bench_app.command("latency")(bench_latency)
bench_app.command("quality")(bench_quality)
bench_app.command("train")(bench_train)
bench_app.command("quant")(bench_quant)


def _version(value: bool) -> None:
    if value:
        from common import __version__

        typer.echo(f"cotune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and debug logs")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _threads(n: int | None) -> None:
    """Cap torch's CPU threads before it loads: several cotune processes often share a box."""
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="TOML file: server keys and a [run] table")] = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port")] = None,
    state_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://...")
    ] = None,
    artifact_dir: Annotated[str | None, typer.Option(
        help="content-addressed blob store: a directory, or s3://bucket/prefix")] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="COTUNE_ADMIN_TOKEN", help="admin bearer token")] = None,
    run_name: Annotated[str | None, typer.Option(help="create this run at start-up (with --slm)")] = None,
    algorithm: Annotated[str | None, typer.Option(help="fedavg | fedcollm | co-plms | crosslm")] = None,
    slm: Annotated[str | None, typer.Option(help="SLM checkpoint directory")] = None,
    llm: Annotated[str | None, typer.Option(help="LLM checkpoint directory (fedcollm)")] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    min_clients: Annotated[int | None, typer.Option(help="quorum: updates needed to close a round")] = None,
    deadline: Annotated[float | None, typer.Option(help="seconds after which a round closes at quorum")] = None,
    aux_data: Annotated[str | None, typer.Option(help="public auxiliary JSONL (server side)")] = None,
    eval_data: Annotated[str | None, typer.Option(help="held-out JSONL the server scores on")] = None,
    enroll_token: Annotated[
        str | None, typer.Option(envvar="COTUNE_ENROLL_TOKEN", help="token devices enroll with")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve HTTPS")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    log_level: Annotated[str | None, typer.Option(help="critical | error | warning | info | debug")] = None,
    log_format: Annotated[str | None, typer.Option(help="text | json (one JSON object a line)")] = None,
) -> None:
    """Start the coordinator (FastAPI + the round driver).

    Flags win over COTUNE_* environment variables (COTUNE_RUN__ROUNDS for a field of the run),
    which win over --config, which wins over the defaults. With a
    run in the config (or --run-name and --slm) the run is created at start-up, or resumed
    if the state database already holds it with the same spec. Without an enroll token the
    run gets one, kept in a file beside the state (mode 0600) for later starts.
    """
    import uvicorn

    from cloud.app import create_app
    from cloud.auth import new_token
    from cloud.logs import configure_logging
    from cloud.settings import check_tls, load_settings
    from cloud.startup import admin_token_path, check_artifact_store, write_secret

    _threads(threads)
    run: dict[str, Any] = {k: v for k, v in {
        "name": run_name, "algorithm": algorithm, "slm": slm, "llm": llm, "rounds": rounds,
        "min_clients": min_clients, "round_deadline_s": deadline, "aux_data": aux_data,
        "eval_data": eval_data, "enroll_token": enroll_token,
    }.items() if v is not None}
    settings = load_settings(
        config, host=host, port=port, state_url=state_url, artifact_dir=artifact_dir,
        admin_token=admin_token, torch_threads=threads, run=run or None,
        tls_certfile=tls_cert, tls_keyfile=tls_key, log_level=log_level, log_format=log_format,
    )
    configure_logging(settings.log_level, settings.log_format)
    check_tls(settings)
    check_artifact_store(settings)
    from cloud.models import check_placement

    placement = check_placement(settings.model_device, settings.model_dtype, settings.model_device_map)
    typer.echo(f"held models load on {placement}", err=True)
    if settings.admin_token is None:
        settings.admin_token = new_token()
        token_file = admin_token_path(settings)
        write_secret(token_file, settings.admin_token)
        typer.echo(f"admin token written to {token_file}")
    if settings.run is not None:
        settings.run = _start_up_run(settings)
    # log_config=None: uvicorn's loggers (its access log, on at info) go through ours, in our format.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None,
                ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile)


def _start_up_run(settings: Any) -> Any:
    """The config's run with the enroll token it is created or resumed with (cloud.startup);
    a new token is printed once, when it is made."""
    from cloud.startup import enroll_token_path, prepare_start_up_run
    from cloud.state import SqlState

    state = SqlState(settings.state_url)
    try:
        prepared = prepare_start_up_run(settings.run, state, enroll_token_path(settings, settings.run.name))
    finally:
        state.close()
    name = prepared.spec.name
    if prepared.generated:
        typer.echo(f"run {name}: devices enroll with {prepared.spec.enroll_token} (kept in {prepared.token_file})")
    elif prepared.token_file is not None:
        typer.echo(f"run {name}: devices enroll with the token in {prepared.token_file}")
    return prepared.spec


@edge_app.command("join")
def edge_join(
    config: Annotated[Path | None, typer.Option(help="TOML file of these options (flags, COTUNE_EDGE_* win)")] = None,
    coordinator: Annotated[str | None, typer.Option(help="coordinator URL, e.g. http://10.0.0.2:8080")] = None,
    enroll_token: Annotated[
        str | None, typer.Option(envvar="COTUNE_ENROLL_TOKEN", help="the run's enroll token")] = None,
    data: Annotated[Path | None, typer.Option(
        help="private JSONL of {prompt, response}; never leaves the device")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="local held-out JSONL, scored each round")] = None,
    name: Annotated[str | None, typer.Option(help="a name for this device (default: device)")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        help="credentials, cache and pending updates (default: .cotune/edge)")] = None,
    out: Annotated[Path | None, typer.Option(help="where the final model and adapter go")] = None,
    poll: Annotated[float | None, typer.Option(help="seconds between polls while waiting (default: 1)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="show progress bars")] = None,
    ca_cert: Annotated[Path | None, typer.Option(help="PEM CA bundle to trust for an https coordinator")] = None,
    slm: Annotated[Path | None, typer.Option(
        help="this device's own SLM checkpoint (co-plms, crosslm); it never leaves the device")] = None,
    device: Annotated[str | None, typer.Option(
        help="where local training runs: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N")] = None,
) -> None:
    """Take part in a run until it ends: pull, train locally, upload, repeat.

    Flags win over COTUNE_EDGE_* environment variables (COTUNE_EDGE_COORDINATOR, ...), which
    win over --config, which wins over the defaults."""
    from edge_sdk.settings import load_device_settings

    settings = load_device_settings(
        config, coordinator=coordinator, enroll_token=enroll_token, data=data, eval_data=eval_data, name=name,
        state_dir=state_dir, out_dir=out, poll_s=poll, threads=threads, progress=progress, ca_cert=ca_cert,
        local_slm=slm, device=device)
    _threads(settings.threads)
    from edge_sdk.worker import EdgeWorker, JoinConfig

    name = settings.name
    cfg = JoinConfig(**settings.model_dump(exclude={"threads"}), device=settings.device)
    result = EdgeWorker(cfg, on_event=lambda msg: typer.echo(f"[{name}] {msg}")).run()
    if not result.stopped:
        typer.echo(f"[{name}] final adapter sha256 {result.final_adapter_sha256}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where data, models and state go")] = Path(".cotune/demo"),
    clients: Annotated[int, typer.Option(help="number of edge devices")] = 3,
    rounds: Annotated[int, typer.Option(help="co-tuning rounds")] = 3,
    algorithm: Annotated[str, typer.Option(help="fedcollm | fedavg")] = "fedcollm",
    seed: Annotated[int, typer.Option(help="seed for data and models")] = 0,
) -> None:
    """The quickstart: a coordinator and N devices as separate processes, on tiny models."""
    from cotune.demo.quickstart import run_quickstart

    run_quickstart(workdir=workdir, num_clients=clients, rounds=rounds, algorithm=algorithm, seed=seed)


@app.command()
def status(
    coordinator: Annotated[str, typer.Option(help="coordinator URL")] = "http://127.0.0.1:8080",
    admin_token: Annotated[str, typer.Option(envvar="COTUNE_ADMIN_TOKEN", help="admin bearer token")] = "",
    run: Annotated[str | None, typer.Option(help="a run id or name (default: every run)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status JSON")] = False,
) -> None:
    """Show runs and their per-round scores and bytes moved, as the admin sees them."""
    import json

    from common.retry import Backoff
    from cotune.demo.quickstart import run_table
    from edge_sdk.client import CoordinatorClient

    with CoordinatorClient(coordinator, token=admin_token or None, backoff=Backoff(max_tries=2)) as client:
        runs = client.list_runs()
    chosen = [r for r in runs if run in (None, r.run_id, r.name)]
    if run is not None and not chosen:
        raise ValueError(f"no run {run!r} on {coordinator}; it has {[r.name for r in runs]}")
    for r in chosen:
        if as_json:
            typer.echo(json.dumps(r.model_dump(mode="json"), indent=2))
            continue
        typer.echo(f"\n{r.name} ({r.run_id}): {r.algorithm}, {r.state.value}, round {r.current_round}/"
                   f"{r.rounds_total}, {r.num_clients} devices" + (f", error: {r.error}" if r.error else ""))
        typer.echo(run_table(r))


@bench_app.command("load")
def bench_load(
    clients: Annotated[str, typer.Option(help="comma-separated numbers of simulated devices")] = "10,100,1000",
    concurrency: Annotated[str, typer.Option(help="comma-separated: devices in flight at once")] = "32",
    replicas: Annotated[str, typer.Option(help="comma-separated: coordinator replicas behind HAProxy")] = "1",
    state_url: Annotated[str | None, typer.Option(
        help="a PostgreSQL server the benchmark may create databases on (needed for several replicas)")] = None,
    out: Annotated[Path, typer.Option(help="results directory")] = Path("results/load"),
    secure_aggregation: Annotated[bool, typer.Option(
        "--secure-aggregation", help="measure instead what secure aggregation costs: bytes and seconds per "
        "device and the coordinator's seconds per round, with and without it")] = False,
) -> None:
    """Load a live coordinator with N simulated devices (register, poll, download, upload 1 MiB).

    Reports throughput, p50/p99 latency per operation and the coordinator's memory while it
    aggregates, which must stay flat as N grows.
    """
    from cotune.cli.benchmarks_path import use_checkout_benchmarks

    use_checkout_benchmarks()
    ns = [int(x) for x in clients.split(",")]
    if secure_aggregation:
        from benchmarks.secagg_load import run_secagg_benchmark

        run_secagg_benchmark(ns, out)
        return
    from benchmarks.coordinator_load import run_load_benchmark

    run_load_benchmark(ns, out, [int(x) for x in concurrency.split(",")], [int(x) for x in replicas.split(",")],
                       state_url)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # one clear line unless --debug
        if _state["debug"]:
            raise
        typer.echo(f"error: {_describe(exc)}", err=True)
        sys.exit(2)


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return f"invalid settings: {problems}"
    name = type(exc).__name__
    if name in ("ConnectError", "ConnectTimeout"):
        return f"cannot reach the coordinator ({exc}); check the URL and that it is running"
    return str(exc) or name


if __name__ == "__main__":
    main()
