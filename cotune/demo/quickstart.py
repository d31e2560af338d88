"""The quickstart: a real coordinator and N devices as separate OS processes on loopback,
co-tuning tiny models on synthetic non-IID multi-domain data, with a per-round table."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from common.cache import cache_root
from common.methods import get_method
from common.protocol import RunStatus


@dataclass
class Processes:
    server: subprocess.Popen
    clients: list[subprocess.Popen]

    def stop(self) -> None:
        for proc in [*self.clients, self.server]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.clients, self.server]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cotune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cotune.cli.main", *args]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0, path: str = "/healthz",
                 what: str = "the coordinator") -> None:
    """Wait until `url + path` answers 2xx; fail early if `proc` exits, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}{path}", timeout=2).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f}s")


def write_server_config(path: Path, *, port: int, state_dir: Path, admin_token: str,
                        run: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> Path:
    """A coordinator TOML: server keys, then the run to create at start-up (if any)."""
    server = {
        "host": "127.0.0.1", "port": port, "state_url": f"sqlite:///{state_dir / 'coordinator.db'}",
        "artifact_dir": str(state_dir / "artifacts"), "work_dir": str(state_dir / "work"),
        "admin_token": admin_token, "tick_s": 0.2, **(extra or {}),
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in server.items()]
    if run:
        lines.append("\n[run]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in run.items() if not isinstance(v, dict)]
        for table, values in run.items():
            if isinstance(values, dict):
                lines.append(f"\n[run.{table}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_table(status: RunStatus) -> str:
    """One row per round: server-side scores of both models, and bytes per client."""
    header = ("| round | SLM Rouge-L | SLM EM | LLM Rouge-L | LLM EM | updates | "
              "up KiB/client | down KiB/client |")
    rows = [header, "|" + "---|" * 8]
    for summary in status.rounds:
        m = summary.metrics
        slm, llm = m.get("slm") or {}, m.get("llm") or {}
        clients = (m.get("clients") or {}).values()
        ups = [c.get("bytes_up", 0) for c in clients]
        downs = [c.get("bytes_down", 0) for c in clients]

        def pct(d: dict, key: str) -> str:
            return f"{100 * d[key]:.1f}" if key in d else "-"

        def kib(values: list[int]) -> str:
            return f"{sum(values) / len(values) / 1024:.1f}" if values else "-"

        rows.append(
            f"| {summary.round if summary.round else '0 (start)'} | {pct(slm, 'rougeL')} | {pct(slm, 'em')} | "
            f"{pct(llm, 'rougeL')} | {pct(llm, 'em')} | {summary.num_updates} | {kib(ups)} | {kib(downs)} |"
        )
    return "\n".join(rows)


def run_quickstart(workdir: Path, num_clients: int = 3, rounds: int = 3, algorithm: str = "fedcollm",
                   seed: int = 0, min_clients: int | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from cotune.demo.world import prepare_world

    started = time.monotonic()
    workdir = Path(workdir).resolve()
    cache = cache_root().resolve()
    print(f"preparing data and tiny models in {workdir} (cached in {cache})")
    world = prepare_world(workdir / "world", num_clients=num_clients, seed=seed, cache_dir=cache)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    state_dir = workdir / f"state-{stamp}"
    logs = state_dir / "logs"
    logs.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin_token, enroll_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    run = {
        "name": f"quickstart-{algorithm}", "algorithm": algorithm, "slm": str(world.slm_dir),
        "llm": str(world.llm_dir), "rounds": rounds, "min_clients": min_clients or num_clients,
        "round_deadline_s": 300.0, "aux_data": str(world.data["aux"]), "eval_data": str(world.data["test"]),
        # The synthetic answers are a few words: a short generation budget fits them.
        "eval_max_new_tokens": 24,
        "seed": seed, "enroll_token": enroll_token,
        # After the last round the coordinator exports the co-tuned SLM; each device pulls the
        # build that fits it and answers locally with llama.cpp.
        "builds": ["gguf:f16", "gguf:q8_0"],
        # LoRA on every linear layer: attention alone leaves a tiny model too little to adapt.
        "lora": {"r": 16, "alpha": 32.0, "target_modules": [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {"epochs": 4.0, "lr": 5e-3, "batch_size": 16, "max_len": 48},
        "distill": {"epochs": 2.0, "lr": 3e-3, "batch_size": 16, "lambda_kd": 1.0, "temperature": 1.0},
    }
    config = write_server_config(state_dir / "coordinator.toml", port=port, state_dir=state_dir,
                                 admin_token=admin_token, run=run)

    server_log = (logs / "coordinator.log").open("w")
    server = subprocess.Popen(cotune_cmd("serve", "--config", str(config), "--threads", "1"),
                              stdout=server_log, stderr=subprocess.STDOUT, env=child_env())
    procs = Processes(server, [])
    try:
        wait_healthy(url, server)
        for k in range(num_clients):
            log = (logs / f"client-{k}.log").open("w")
            procs.clients.append(subprocess.Popen(
                cotune_cmd("edge", "join", "--coordinator", url, "--enroll-token", enroll_token,
                           "--data", str(world.data[f"client_{k}"]),
                           "--eval-data", str(world.data[f"client_{k}_test"]),
                           "--name", f"device-{k}", "--state-dir", str(state_dir / f"device-{k}"),
                           "--threads", "1", "--poll", "0.5", "--no-progress"),
                stdout=log, stderr=subprocess.STDOUT, env=child_env()))
        status = _follow(url, admin_token, procs, rounds, tqdm)
        for proc in procs.clients:
            proc.wait(120)
    finally:
        procs.stop()
        server_log.close()

    if status.state.value != "finished":
        raise RuntimeError(f"the run ended {status.state.value}: {status.error}; logs in {logs}")
    finals = [json.loads((state_dir / f"device-{k}" / "final" / "final.json").read_text())
              for k in range(num_clients)]
    digests = {f["adapter_sha256"] for f in finals}
    # The artifact devices train and download a new version of every round: the shared SLM's adapter.
    shared = get_method(algorithm).contract.update_artifact
    final_digest = next(a.sha256 for a in status.rounds[-1].artifacts if a.name == shared)
    table = run_table(status)
    wall = time.monotonic() - started
    print()
    print(table)
    print(f"\n{algorithm}: {num_clients} devices, {rounds} rounds, {wall:.0f} s wall time; "
          f"every device holds the server's final SLM adapter: {digests == {final_digest}} "
          f"(sha256 {final_digest[:12]})")
    local = _answer_locally(finals[0], world.data["client_0_test"])
    result = {"algorithm": algorithm, "clients": num_clients, "rounds": rounds, "wall_s": round(wall, 1),
              "final_adapter_sha256": final_digest, "devices_match": digests == {final_digest},
              "status": json.loads(status.model_dump_json()), "table": table, "device_0_local": local}
    (workdir / "quickstart.json").write_text(json.dumps(result, indent=2))
    (workdir / "quickstart.md").write_text(table + "\n")
    return result


def _answer_locally(final: dict[str, Any], test_file: Path, n: int = 3) -> dict[str, Any] | None:
    """Device 0 answers a few of its held-out prompts with the edge build it pulled."""
    if not final.get("build_dir"):
        print("device 0 pulled no edge build; skipping the local answers")
        return None
    from common.records import read_jsonl
    from edge_sdk.runtime import EdgeModel
    from edge_sdk.serve.chat import ChatFormatter

    model = EdgeModel.load(final["build_dir"])
    # The chat template the build carries: the one its model was trained with.
    chat = ChatFormatter.for_model(model)
    name = Path(final["build_dir"]).name
    print(f"\ndevice 0 answers on its own with the {name} build (llama.cpp):")
    rows = []
    for record in read_jsonl(test_file)[:n]:
        prompt = chat.render([m.to_dict() for m in record.messages(with_response=False)])
        out = model.generate(prompt, max_tokens=16, stop=list(chat.stop))
        rows.append({"prompt": record.prompt, "answer": out.text.strip(), "reference": record.response})
        print(f"  {record.prompt!r} -> {out.text.strip()!r} (reference {record.response!r})")
    return {"build": name, "answers": rows}


def _follow(url: str, admin_token: str, procs: Processes, rounds: int, tqdm: Any) -> RunStatus:
    """Poll the run as the admin, with a progress bar over rounds, until it ends."""
    run_id = None
    headers = {"Authorization": f"Bearer {admin_token}"}
    with tqdm(total=rounds, desc="rounds", unit="round") as bar:
        while True:
            for k, proc in enumerate(procs.clients):
                if proc.poll() not in (None, 0):
                    raise RuntimeError(f"device {k} exited with code {proc.returncode}; see its log")
            if procs.server.poll() is not None:
                raise RuntimeError("the coordinator exited; see its log")
            if run_id is None:
                runs = httpx.get(f"{url}/v1/runs", headers=headers, timeout=10).json()
                run_id = runs[0]["run_id"] if runs else None
                continue
            status = RunStatus.model_validate_json(
                httpx.get(f"{url}/v1/runs/{run_id}", headers=headers, timeout=10).content)
            closed = sum(1 for r in status.rounds if r.round > 0 and r.state.value == "closed")
            bar.update(closed - bar.n)
            if status.state.value != "running":
                return status
            time.sleep(0.5)
