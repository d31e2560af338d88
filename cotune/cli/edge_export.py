"""`cotune edge export`: edge builds of a device's final model, made by hand from its state
directory (e.g. after installing the export extras on a device that lacked them).

Registered in cotune/cli/main.py as `edge_app.command("export")(edge_export)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _report(builds: list[Any], state_dir: Path, ca_cert: Path | None) -> None:
    """Report each build's manifest with this device's saved credentials."""
    from edge_sdk.client import CoordinatorClient

    path = state_dir / "credentials.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: this state directory never enrolled, so there is no "
                                "coordinator to report to; drop --report")
    saved = json.loads(path.read_text())
    creds = saved["credentials"]
    with CoordinatorClient(saved["coordinator"], token=creds["token"],
                           verify=str(ca_cert) if ca_cert else True) as client:
        for build in builds:
            client.report_build(creds["run_id"], build.report())


def edge_export(
    target: Annotated[list[str], typer.Option(
        "--target", help="a build to make, e.g. gguf:q8_0, gguf:q4_k_m, onnx:int8 (repeat, or comma-separate)")],
    state_dir: Annotated[Path, typer.Option(help="the device's state directory (as for `edge join`)")] = Path(
        ".cotune/edge"),
    final: Annotated[Path | None, typer.Option(
        help="the finished run's output (`edge join --out`); default STATE_DIR/final")] = None,
    out: Annotated[Path | None, typer.Option(help="where the builds go; default FINAL/build")] = None,
    report: Annotated[bool, typer.Option(help="report each build's manifest to the run's coordinator")] = False,
    ca_cert: Annotated[Path | None, typer.Option(help="PEM CA bundle to trust for an https coordinator")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="print the builds as JSON")] = False,
) -> None:
    """Export this device's final SLM (its base + final adapter) to edge builds with parity checks."""
    from edge_sdk.builds import export_final, final_model

    final_dir = final or state_dir / "final"
    model, lora, described = final_model(final_dir)
    targets = [t.strip() for item in target for t in item.split(",") if t.strip()]
    builds = export_final(model, lora, targets, out or final_dir / "build", run_id=described.get("run_id"),
                          round=described.get("round"), progress=progress and not json_output)
    if report:
        _report(builds, state_dir, ca_cert)
    if json_output:
        typer.echo(json.dumps([{"name": b.name, "path": str(b.path), "reported": report,
                                "manifest": b.manifest.model_dump(mode="json")} for b in builds], indent=2))
        return
    for b in builds:
        parity = b.manifest.parity
        typer.echo(f"{b.name}: {b.manifest.size_bytes / 1e6:.1f} MB, top-1 agreement "
                   f"{parity.get('top1_agreement', float('nan')):.3f}, in {b.path}" + (" (reported)" if report else ""))
