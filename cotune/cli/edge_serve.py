"""`cotune edge serve`: the OpenAI-compatible API on this device (edge_sdk/serve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cotune.cli.edge_runtime import GPU_LAYERS_HELP, PROVIDERS_HELP, accel_options, placement

DEFAULT_CREDENTIALS = Path(".cotune/edge/credentials.json")


def read_client_token(path: Path, coordinator: str) -> str:
    """The bearer token `cotune edge join` saved for `coordinator`."""
    try:
        saved = json.loads(path.read_text())
        token = saved["credentials"]["token"]
    except FileNotFoundError:
        raise typer.BadParameter(f"no credentials file at {path}; enroll first with `cotune edge join`, "
                                 "or pass --token") from None
    except (ValueError, KeyError, TypeError):
        raise typer.BadParameter(f"{path} is not a credentials file written by `cotune edge join`") from None
    if str(saved.get("coordinator", "")).rstrip("/") != coordinator.rstrip("/"):
        raise typer.BadParameter(f"{path} holds credentials for another coordinator; pass the one this device "
                                 "enrolled with, or --token")
    if not isinstance(token, str) or not token:
        raise typer.BadParameter(f"{path} holds no client token; enroll again with `cotune edge join`")
    return token


def edge_serve(
    build: Annotated[Path, typer.Option("--build", help="build directory (with manifest.json), or a .gguf file")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    model_name: Annotated[str | None, typer.Option(help="model id clients ask for (default: the build's name)")] = None,
    adapter: Annotated[
        list[Path] | None, typer.Option("--adapter", help="GGUF LoRA build to offer as MODEL:NAME; repeatable")
    ] = None,
    n_ctx: Annotated[int | None, typer.Option(help="context window in tokens")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all usable cores)")] = None,
    verify: Annotated[str, typer.Option(help="check build files: size | sha256 | none")] = "size",
    flash_attn: Annotated[
        bool | None, typer.Option("--flash-attn/--no-flash-attn", help="llama.cpp flash attention (default: auto)")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option(help="coordinator URL: escalate to its LLM when the device is unsure")
    ] = None,
    credentials: Annotated[
        Path, typer.Option(help="credentials file from `cotune edge join` (used with --coordinator)")
    ] = DEFAULT_CREDENTIALS,
    token: Annotated[
        str | None, typer.Option(envvar="COTUNE_CLIENT_TOKEN", help="client token (instead of --credentials)")
    ] = None,
    signal: Annotated[str, typer.Option(help="unsureness signal: mean_entropy | max_entropy | mean_nll")] = (
        "mean_entropy"),
    threshold: Annotated[float, typer.Option(help="escalate when the signal is above this")] = 2.0,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body accepted")] = 1 << 20,
    max_queue: Annotated[int, typer.Option(help="requests that may wait for the model at once")] = 32,
    gpu_layers: Annotated[str, typer.Option(help=GPU_LAYERS_HELP)] = "auto",
    providers: Annotated[str, typer.Option(help=PROVIDERS_HELP)] = "auto",
) -> None:
    """Serve an edge build over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions)."""
    import uvicorn

    from edge_sdk.runtime import EdgeModel
    from edge_sdk.serve import Escalation, ServeEngine, create_app

    if verify not in ("size", "sha256", "none"):
        raise typer.BadParameter("--verify must be size, sha256 or none")
    if signal not in ("mean_entropy", "max_entropy", "mean_nll"):
        raise typer.BadParameter("--signal must be mean_entropy, max_entropy or mean_nll")
    escalation = None
    if coordinator is not None:
        escalation = Escalation(coordinator, token or read_client_token(credentials, coordinator), signal, threshold)
    accel = accel_options(gpu_layers, providers)
    options = {"flash_attn": flash_attn} if flash_attn is not None else None
    model = EdgeModel.load(build, n_ctx=n_ctx, threads=threads, verify=verify,  # type: ignore[arg-type]
                           engine_options=options, **accel)
    try:
        for extra in adapter or []:
            model.load_adapter(extra)
        name = model_name or (build.stem if build.suffix == ".gguf" else build.resolve().name)
        engine = ServeEngine(model, name, escalation)
        app = create_app(engine, max_body_bytes=max_body_bytes, max_queue=max_queue)
        typer.echo(f"serving {', '.join(engine.model_ids())} ({model.backend_name}, "
                   f"{placement(model.describe())}) on http://{host}:{port}/v1", err=True)
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        model.close()
