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
    build: Annotated[Path | None, typer.Option("--build", help="build directory (with manifest.json), or a "
                                               ".gguf file")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML file of these settings (keys as the flags, with underscores; adapters = [...])")] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on (0.0.0.0: every interface) "
                                             "[default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [default: 8000]")] = None,
    model_name: Annotated[str | None, typer.Option(help="model id clients ask for (default: the build's name)")] = None,
    adapter: Annotated[
        list[Path] | None, typer.Option("--adapter", help="GGUF LoRA build to offer as MODEL:NAME; repeatable")
    ] = None,
    n_ctx: Annotated[int | None, typer.Option(help="context window in tokens")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all usable cores)")] = None,
    verify: Annotated[str | None, typer.Option(help="check build files: size | sha256 | none [default: size]")] = None,
    flash_attn: Annotated[
        bool | None, typer.Option("--flash-attn/--no-flash-attn", help="llama.cpp flash attention (default: auto)")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option(help="coordinator URL: escalate to its LLM when the device is unsure")
    ] = None,
    credentials: Annotated[
        Path | None, typer.Option(help="credentials file from `cotune edge join` (used with --coordinator) "
                                  f"[default: {DEFAULT_CREDENTIALS}]")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="COTUNE_CLIENT_TOKEN", help="client token (instead of --credentials)")
    ] = None,
    signal: Annotated[str | None, typer.Option(help="unsureness signal: mean_entropy | max_entropy | mean_nll "
                                               "[default: mean_entropy]")] = None,
    threshold: Annotated[float | None, typer.Option(help="escalate when the signal is above this [default: 2.0]")] = (
        None),
    max_body_bytes: Annotated[int | None, typer.Option(help="largest request body accepted [default: 1 MiB]")] = None,
    max_queue: Annotated[int | None, typer.Option(help="requests that may wait for the model at once "
                                                  "[default: 32]")] = None,
    gpu_layers: Annotated[str | None, typer.Option(help=GPU_LAYERS_HELP)] = None,
    providers: Annotated[str | None, typer.Option(help=PROVIDERS_HELP)] = None,
) -> None:
    """Serve an edge build over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions).

    Flags win over COTUNE_SERVE_* environment variables, which win over --config, which wins
    over the defaults. The client token comes from --token / COTUNE_CLIENT_TOKEN or --credentials."""
    import uvicorn
    from pydantic import ValidationError

    from edge_sdk.runtime import EdgeModel
    from edge_sdk.serve import Escalation, ServeEngine, create_app
    from edge_sdk.settings import load_serve_settings

    try:
        s = load_serve_settings(config, build=build, host=host, port=port, model_name=model_name,
                                adapters=adapter or None, n_ctx=n_ctx, threads=threads, verify=verify,
                                flash_attn=flash_attn, coordinator=coordinator, credentials=credentials,
                                signal=signal, threshold=threshold, max_body_bytes=max_body_bytes,
                                max_queue=max_queue, gpu_layers=gpu_layers, providers=providers)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(f"serve settings: {problems}") from None
    except ValueError as exc:  # a missing or broken --config file
        raise typer.BadParameter(str(exc)) from None
    escalation = None
    if s.coordinator is not None:
        escalation = Escalation(s.coordinator, token or read_client_token(s.credentials, s.coordinator), s.signal,
                                s.threshold)
    accel = accel_options(s.gpu_layers, s.providers)
    options = {"flash_attn": s.flash_attn} if s.flash_attn is not None else None
    model = EdgeModel.load(s.build, n_ctx=s.n_ctx, threads=s.threads, verify=s.verify, engine_options=options,
                           **accel)
    try:
        for extra in s.adapters:
            model.load_adapter(extra)
        name = s.model_name or (s.build.stem if s.build.suffix == ".gguf" else s.build.resolve().name)
        engine = ServeEngine(model, name, escalation)
        app = create_app(engine, max_body_bytes=s.max_body_bytes, max_queue=s.max_queue)
        typer.echo(f"serving {', '.join(engine.model_ids())} ({model.backend_name}, "
                   f"{placement(model.describe())}) on http://{s.host}:{s.port}/v1", err=True)
        uvicorn.run(app, host=s.host, port=s.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        model.close()
