"""The admin's verbs: `cotune runs|devices|builds ...` and `cotune watch`, all over the public
`CoordinatorClient` API (ARCHITECTURE.md, "Wire protocol").

Each takes `--coordinator` and the admin token from COTUNE_ADMIN_TOKEN or `--token-file`
(never a flag: a flag shows in the process list), and `--json` for other tools. Errors are
raised as exceptions and printed as one line by `cotune.cli.main`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from common.protocol import DeviceInfo, RunStatus
    from edge_sdk.client import CoordinatorClient

runs_app = typer.Typer(help="Runs: list, show, create from a TOML file, stop, pull adapters.", no_args_is_help=True)
devices_app = typer.Typer(help="A run's devices: list, revoke.", no_args_is_help=True)
builds_app = typer.Typer(help="A run's edge builds: list, publish.", no_args_is_help=True)

Coordinator = Annotated[str, typer.Option("--coordinator", envvar="COTUNE_COORDINATOR", help="coordinator URL")]
TokenFile = Annotated[Path | None, typer.Option(
    "--token-file", help="file holding the admin token (default: the COTUNE_ADMIN_TOKEN environment variable)")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON for other tools")]
DEFAULT_URL = "http://127.0.0.1:8080"


def admin_token(token_file: Path | None) -> str:
    """The admin token: from `--token-file` if given, else COTUNE_ADMIN_TOKEN."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the admin token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"the admin token file {token_file} is empty")
        return token
    token = os.environ.get("COTUNE_ADMIN_TOKEN", "").strip()
    if not token:
        raise ValueError("no admin token: set COTUNE_ADMIN_TOKEN or pass --token-file "
                         "(`cotune serve` writes one beside its state when it makes it)")
    return token


def admin_client(coordinator: str, token_file: Path | None, timeout: float = 30.0) -> CoordinatorClient:
    """A client with the admin token that gives up quickly: an operator is waiting."""
    from common.retry import Backoff
    from edge_sdk.client import CoordinatorClient

    return CoordinatorClient(coordinator, token=admin_token(token_file), timeout=timeout,
                             backoff=Backoff(max_tries=2, base_s=0.2, max_total_s=10.0))


def find_run(client: CoordinatorClient, run: str) -> RunStatus:
    """A run by id or name."""
    runs = client.list_runs()
    for status in runs:
        if run in (status.run_id, status.name):
            return status
    names = ", ".join(r.name for r in runs[:20]) or "none"
    raise ValueError(f"no run {run[:80]!r} on {client.base_url} (its runs: {names}); see `cotune runs list`")


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def dump(models: Any) -> Any:
    if isinstance(models, list):
        return [m.model_dump(mode="json") for m in models]
    return models.model_dump(mode="json")


def _ago(at: datetime | None) -> str:
    if at is None:
        return "never"
    seconds = max(0, int((datetime.now(timezone.utc) - at).total_seconds()))
    if seconds < 90:
        return f"{seconds}s ago"
    return f"{seconds // 60}m ago" if seconds < 5400 else f"{seconds // 3600}h ago"


def _pct(metrics: dict[str, Any], model: str, key: str) -> str:
    value = (metrics.get(model) or {}).get(key)
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def _print(*renderables: Any) -> None:
    from rich.console import Console

    Console(soft_wrap=True).print(*renderables)


# -- tables (rich) ------------------------------------------------------------------------------


def runs_table(runs: list[RunStatus]) -> Any:
    from rich.table import Table

    table = Table(title="runs")
    for column in ("name", "run id", "algorithm", "state", "round", "devices", "error"):
        table.add_column(column)
    for r in runs:
        table.add_row(r.name, r.run_id, r.algorithm, r.state.value, f"{r.current_round}/{r.rounds_total}",
                      str(r.num_clients), (r.error or "")[:80])
    return table


def rounds_table(status: RunStatus) -> Any:
    from rich.table import Table

    table = Table(title=f"{status.name}: {status.state.value}, round {status.current_round}/{status.rounds_total}")
    for column in ("round", "state", "updates", "samples", "SLM Rouge-L", "SLM EM", "LLM Rouge-L", "LLM EM",
                   "KiB up", "KiB down"):
        table.add_column(column, justify="right")
    for s in status.rounds:
        clients = (s.metrics.get("clients") or {}).values()
        up = sum(c.get("bytes_up", 0) for c in clients) / 1024
        down = sum(c.get("bytes_down", 0) for c in clients) / 1024
        table.add_row(str(s.round) if s.round else "0 (start)", s.state.value, str(s.num_updates),
                      str(s.num_samples), _pct(s.metrics, "slm", "rougeL"), _pct(s.metrics, "slm", "em"),
                      _pct(s.metrics, "llm", "rougeL"), _pct(s.metrics, "llm", "em"), f"{up:.1f}", f"{down:.1f}")
    return table


def devices_table(devices: list[DeviceInfo]) -> Any:
    from rich.table import Table

    table = Table(title="devices")
    for column in ("client id", "name", "arch", "cores", "last seen", "updates", "revoked"):
        table.add_column(column)
    for d in devices:
        table.add_row(d.client_id, d.name, str(d.profile.get("arch", "?")), str(d.profile.get("cores", "?")),
                      _ago(d.last_seen), str(d.updates_sent), "yes" if d.revoked else "")
    return table


# -- runs ---------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(coordinator: Coordinator = DEFAULT_URL, token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """Every run: state, algorithm, round, devices, error."""
    with admin_client(coordinator, token_file) as client:
        runs = client.list_runs()
    if as_json:
        emit_json(dump(runs))
    else:
        _print(runs_table(runs))


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="run id or name")], coordinator: Coordinator = DEFAULT_URL,
              token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """One run: its rounds with scores and bytes moved, and its devices."""
    with admin_client(coordinator, token_file) as client:
        status = find_run(client, run)
        devices = client.list_devices(status.run_id)
    if as_json:
        emit_json({**dump(status), "devices": dump(devices)})
        return
    header = f"{status.name} ({status.run_id}): {status.algorithm}, {status.num_clients} devices"
    _print(header + (f"\nerror: {status.error}" if status.error else ""), rounds_table(status),
           devices_table(devices))


@runs_app.command("pull")
def runs_pull(run: Annotated[str, typer.Argument(help="run id or name")],
              out: Annotated[Path, typer.Option(help="directory to write the adapters and checkpoints into")],
              coordinator: Coordinator = DEFAULT_URL, token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """A run's latest adapters (the SLM's, and the LLM's where the method holds one), each with the
    checkpoint the coordinator publishes for it and as a stock peft directory (`<prefix>-adapter/`:
    adapter_config.json + adapter_model.safetensors) that `PeftModel.from_pretrained` loads."""
    from common.ml.peft_dir import write_peft_dir
    from common.protocol import RunSpec
    from edge_sdk.paths import safe_join

    with admin_client(coordinator, token_file) as client:
        status = find_run(client, run)
        spec = RunSpec.model_validate(status.spec)
        done = [r for r in status.rounds if r.round > 0 and r.artifacts]
        if not done:
            raise RuntimeError(f"run {status.name!r} has no closed round yet: nothing to pull")
        refs = {a.name: a for a in done[-1].artifacts}
        written = []
        for name in sorted(n for n in refs if n.endswith("/adapter.safetensors")):
            prefix = name.split("/", 1)[0]
            target = out / prefix
            for ref in (r for n, r in refs.items() if n.startswith(prefix + "/")):
                client.download(ref, safe_join(target, ref.name[len(prefix) + 1:], what="artifact",
                                               source=coordinator, full_name=ref.name))
            # The base: the checkpoint published with the adapter, else the one the spec names on
            # the coordinator's disk (the LLM's never leaves the server).
            base = target if (target / "config.json").is_file() else {"slm": spec.slm, "llm": spec.llm}.get(prefix)
            if base is None:
                continue
            peft = write_peft_dir(target / "adapter.safetensors", spec.lora, base, out / f"{prefix}-adapter")
            written.append({"adapter": name, "round": done[-1].round, "peft_dir": str(peft), "base": str(base)})
    if as_json:
        emit_json(written)
        return
    for item in written:
        typer.echo(f"{item['adapter']} (round {item['round']}): peft directory {item['peft_dir']} on {item['base']}")


@runs_app.command("create")
def runs_create(spec_file: Annotated[Path, typer.Argument(help="TOML: a run spec, at top level or as a [run] table")],
                coordinator: Coordinator = DEFAULT_URL, token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """Create a run from a TOML file; prints the enroll token devices join with (shown once)."""
    spec = read_run_spec(spec_file)
    with admin_client(coordinator, token_file) as client:
        created = client.create_run(spec)
    if as_json:
        emit_json(dump(created))
        return
    verb = "created" if created.created else "already existed:"
    typer.echo(f"run {created.name} {verb} {created.run_id}\ndevices enroll with: {created.enroll_token}")


def read_run_spec(path: Path) -> Any:
    import tomllib
    from pydantic import ValidationError

    from common.protocol import RunSpec

    try:
        values = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the run file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    values = values.get("run", values) if isinstance(values.get("run"), dict) else values
    try:
        return RunSpec.model_validate(values)
    except ValidationError as exc:  # field names and reasons only: the values may be secrets
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'run'}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(f"{path} is not a valid run spec: {problems}") from None


@runs_app.command("stop")
def runs_stop(run: Annotated[str, typer.Argument(help="run id or name")], coordinator: Coordinator = DEFAULT_URL,
              token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """Stop a running run now: its rounds stop advancing and its devices leave."""
    with admin_client(coordinator, token_file) as client:
        stopped = client.stop_run(find_run(client, run).run_id)
    if as_json:
        emit_json(dump(stopped))
    else:
        typer.echo(f"run {stopped.name} stopped in round {stopped.current_round}/{stopped.rounds_total}")


# -- devices ------------------------------------------------------------------------------------


@devices_app.command("list")
def devices_list(run: Annotated[str, typer.Argument(help="run id or name")], coordinator: Coordinator = DEFAULT_URL,
                 token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """A run's devices: profile, last seen, updates sent, revoked."""
    with admin_client(coordinator, token_file) as client:
        devices = client.list_devices(find_run(client, run).run_id)
    if as_json:
        emit_json(dump(devices))
    else:
        _print(devices_table(devices))


@devices_app.command("revoke")
def devices_revoke(client_id: Annotated[str, typer.Argument(help="the device's client id (see `devices list`)")],
                   coordinator: Coordinator = DEFAULT_URL, token_file: TokenFile = None,
                   as_json: AsJson = False) -> None:
    """Revoke a device: its token is refused from now on."""
    with admin_client(coordinator, token_file) as client:
        client.revoke_device(client_id)
    if as_json:
        emit_json({"client_id": client_id, "revoked": True})
    else:
        typer.echo(f"device {client_id} revoked")


# -- builds -------------------------------------------------------------------------------------


@builds_app.command("list")
def builds_list(run: Annotated[str, typer.Argument(help="run id or name")], coordinator: Coordinator = DEFAULT_URL,
                token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """A run's edge builds with their sizes."""
    with admin_client(coordinator, token_file) as client:
        builds = client.list_builds(find_run(client, run).run_id)
    _show_builds(builds, as_json)


@builds_app.command("publish")
def builds_publish(run: Annotated[str, typer.Argument(help="run id or name")],
                   target: Annotated[list[str], typer.Option("--target", help="e.g. gguf:q8_0, onnx:int8; repeat")],
                   coordinator: Coordinator = DEFAULT_URL, token_file: TokenFile = None,
                   as_json: AsJson = False) -> None:
    """Export the run's SLM to edge builds now (parity-checked); may take minutes."""
    with admin_client(coordinator, token_file, timeout=1800.0) as client:  # an export takes minutes
        builds = client.publish_builds(find_run(client, run).run_id, target)
    _show_builds(builds, as_json)


def _show_builds(builds: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json(dump(builds))
        return
    from rich.table import Table

    table = Table(title="builds")
    for column in ("name", "round", "files", "MiB"):
        table.add_column(column)
    for b in builds:
        table.add_row(b.name, str(b.round), str(len(b.files)), f"{sum(f.size for f in b.files) / 2**20:.1f}")
    _print(table)


# -- watch --------------------------------------------------------------------------------------


def watch(run: Annotated[str, typer.Argument(help="run id or name")], coordinator: Coordinator = DEFAULT_URL,
          token_file: TokenFile = None, as_json: AsJson = False,
          interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 2.0,
          once: Annotated[bool, typer.Option(help="show the run once and exit")] = False) -> None:
    """A live view of a run (rounds, scores, devices) until it ends; --json: a JSON line per refresh."""
    with admin_client(coordinator, token_file) as client:
        run_id = find_run(client, run).run_id

        def poll() -> tuple[RunStatus, list[DeviceInfo]]:
            return client.run_status(run_id), client.list_devices(run_id)

        if as_json:
            _watch_json(poll, interval, once)
        else:
            _watch_live(poll, interval, once)


def _watch_json(poll: Callable[[], tuple[RunStatus, list[DeviceInfo]]], interval: float, once: bool) -> None:
    from common.protocol import RunState

    while True:
        status, devices = poll()
        typer.echo(json.dumps({**dump(status), "devices": dump(devices)}, default=str))
        if once or status.state != RunState.running:
            return
        time.sleep(interval)


def _watch_live(poll: Callable[[], tuple[RunStatus, list[DeviceInfo]]], interval: float, once: bool) -> None:
    from rich.console import Group
    from rich.live import Live

    from common.protocol import RunState

    def frame() -> tuple[Any, bool]:
        status, devices = poll()
        return Group(rounds_table(status), devices_table(devices)), status.state != RunState.running

    view, over = frame()
    if once:
        _print(view)
        return
    with Live(view, auto_refresh=False) as live:
        while not over:
            time.sleep(interval)
            view, over = frame()
            live.update(view, refresh=True)
