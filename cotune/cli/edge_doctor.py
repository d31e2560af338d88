"""`cotune edge doctor`: what this device can do (engines, training, GPU, memory, which builds fit).

The checks are edge_sdk/doctor.py's; this module reads the options and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_CREDENTIALS = Path(".cotune/edge/credentials.json")
MAX_BUILDS_FILE = 16 << 20


def _builds_from_file(path: Path) -> list[Any]:
    from pydantic import TypeAdapter, ValidationError

    from common.protocol import BuildInfo

    try:
        if path.stat().st_size > MAX_BUILDS_FILE:
            raise typer.BadParameter(f"{path} is over {MAX_BUILDS_FILE >> 20} MiB; is it a build list?")
        data = json.loads(path.read_text())
        items = data.get("builds") if isinstance(data, dict) else data
        return TypeAdapter(list[BuildInfo]).validate_python(items)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path} ({exc.strerror})") from None
    except (ValueError, ValidationError):
        raise typer.BadParameter(f"{path} is not a build list: JSON of `cotune builds list --json`, "
                                 "a list of builds or an object with a `builds` list") from None


def _read_credentials(path: Path, coordinator: str) -> tuple[str, str]:
    """(client token, run id) that `cotune edge join` saved for `coordinator`."""
    try:
        saved = json.loads(path.read_text())
        token, run_id = saved["credentials"]["token"], saved["credentials"]["run_id"]
    except FileNotFoundError:
        raise typer.BadParameter(f"no credentials file at {path}; enroll first with `cotune edge join`") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise typer.BadParameter(f"{path} is not a credentials file written by `cotune edge join`") from None
    if str(saved.get("coordinator", "")).rstrip("/") != coordinator.rstrip("/"):
        raise typer.BadParameter(f"{path} holds credentials for another coordinator; pass the one this device "
                                 "enrolled with")
    if not (isinstance(token, str) and token and isinstance(run_id, str) and run_id):
        raise typer.BadParameter(f"{path} holds no client token or run; enroll again with `cotune edge join`")
    return token, run_id


def _builds_from_coordinator(coordinator: str, credentials: Path) -> list[Any]:
    from edge_sdk.client import CoordinatorClient

    token, run_id = _read_credentials(credentials, coordinator)
    with CoordinatorClient(coordinator) as client:
        client.token = token
        return list(client.builds(run_id).builds)


def _print(report: dict[str, Any]) -> None:
    def yes(flag: Any) -> str:
        return {True: "yes", False: "no", None: "unknown"}[flag if flag in (True, False) else None]

    llama, ort = report["backends"]["llama.cpp"], report["backends"]["onnxruntime"]
    gpu, prof, extras = report["gpu"], report["profile"], report["extras"]
    typer.echo(f"llama.cpp:    {'yes ' + str(llama['version']) if llama['available'] else 'no'}"
               + ("" if llama["available"] else f"  ({extras['edge-llama']['install']})"))
    typer.echo(f"ONNX Runtime: {'yes ' + str(ort['version']) if ort['available'] else 'no'}"
               + (f", providers {', '.join(ort['providers'])}" if ort["available"]
                  else f"  ({extras['edge-onnx']['install']})"))
    typer.echo(f"train:        {yes(report['can_train'])}"
               + ("" if report["can_train"] else f"  ({extras['train']['install']})"))
    typer.echo(f"build:        {yes(report['can_build'])}"
               + ("" if report["can_build"] else f"  ({extras['export']['install']})"))
    typer.echo(f"GPU:          torch CUDA {yes(gpu['torch_cuda']['available'])}"
               + (f" ({', '.join(gpu['torch_cuda']['devices'])})" if gpu["torch_cuda"]["devices"] else "")
               + f"; ONNX Runtime GPU providers {', '.join(gpu['onnxruntime_gpu_providers']) or 'none'}"
               + f"; llama.cpp GPU offload {yes(gpu['llama_cpp_gpu_offload'])}"
               + (f"; accelerator {gpu['accelerator']}" if gpu["accelerator"] else ""))
    auto = gpu["auto"]
    chosen = [f"llama.cpp {auto['llama.cpp']}" if auto["llama.cpp"] else "",
              f"ONNX Runtime {', '.join(auto['onnxruntime'])}" if auto["onnxruntime"] else ""]
    typer.echo(f"auto picks:   {'; '.join(c for c in chosen if c) or 'no engine installed'}")
    for hint in gpu["hints"]:
        typer.echo(f"  {hint}")
    typer.echo(f"machine:      {prof['arch']} {prof['os']}, {prof['cores']} cores, "
               f"{prof['ram_bytes'] / 2**30:.1f} GiB RAM")
    if report["builds"] is not None:
        typer.echo(f"builds:       {len(report['builds'])}" + ("" if report["builds"] else " (none published)"))
        for b in report["builds"]:
            mark = "best" if b["best"] else ("fits" if b["fits"] else "no")
            typer.echo(f"  {b['name']:<20} {mark:<5} {'; '.join(b['reasons'])}")


def edge_doctor(
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    builds: Annotated[Path | None, typer.Option(
        help="a build list (JSON of `cotune builds list --json`) to say which builds fit here")] = None,
    coordinator: Annotated[str | None, typer.Option(
        help="coordinator URL: check the builds of the run this device enrolled in")] = None,
    credentials: Annotated[Path, typer.Option(
        help="credentials `cotune edge join` saved (with --coordinator)")] = DEFAULT_CREDENTIALS,
) -> None:
    """Print what this device can do: engines, training, GPU, memory and cores, which builds fit."""
    from edge_sdk.doctor import diagnose

    if builds is not None and coordinator is not None:
        raise typer.BadParameter("pass --builds or --coordinator, not both")
    listed = None
    if builds is not None:
        listed = _builds_from_file(builds)
    elif coordinator is not None:
        listed = _builds_from_coordinator(coordinator, credentials)
    report = diagnose(listed)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)
