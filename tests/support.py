"""Shared test helpers: a tiny world of data and models, and a real coordinator process."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cotune.demo.quickstart import child_env, cotune_cmd, free_port, wait_healthy, write_server_config


@dataclass
class TinyWorld:
    root: Path
    slm_dir: Path
    llm_dir: Path
    data: dict[str, Path]


def build_tiny_world(root: Path, num_clients: int = 2, seed: int = 0) -> TinyWorld:
    """Untrained tiny models and a small synthetic suite: enough to exercise every code path."""
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import save_tokenizer, train_tokenizer
    from cotune.demo.synthetic import all_text, make_suite, write_suite
    from cotune.demo.tiny import build_tiny_model

    suite = make_suite(num_clients=num_clients, seed=seed, per_client=40, public_size=40,
                       aux_size=24, test_per_domain=3)
    data = write_suite(suite, root / "data")
    tok_dir = root / "tokenizer"
    save_tokenizer(train_tokenizer(all_text(suite), vocab_size=384), tok_dir)
    slm_dir = save_checkpoint(build_tiny_model("llama", "tiny", vocab_size=384, seed=seed), tok_dir, root / "slm")
    llm_dir = save_checkpoint(build_tiny_model("llama", "small", vocab_size=384, seed=seed + 1), tok_dir,
                              root / "llm")
    return TinyWorld(root=root, slm_dir=Path(slm_dir), llm_dir=Path(llm_dir), data=data)


def run_spec(world: TinyWorld, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "test-run", "algorithm": "fedcollm", "slm": str(world.slm_dir), "llm": str(world.llm_dir),
        "rounds": 2, "min_clients": 2, "round_deadline_s": 120.0, "aux_data": str(world.data["aux"]),
        "eval_data": str(world.data["test"]), "eval_max_new_tokens": 8, "seed": 0,
        "enroll_token": secrets.token_urlsafe(24),
        "lora": {"r": 4, "alpha": 8.0},
        "train": {"epochs": 1.0, "lr": 3e-3, "batch_size": 8, "max_len": 40, "max_steps": 4},
        "distill": {"epochs": 1.0, "lr": 3e-3, "batch_size": 8, "lambda_kd": 1.0, "max_steps": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@dataclass
class CoordinatorProcess:
    """`cotune serve` in its own process, on loopback, on a state directory that outlives it."""

    state_dir: Path
    run: dict[str, Any] | None = None
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def start(self, env: dict[str, str] | None = None) -> CoordinatorProcess:
        """Start (or restart, on the same state) and wait until it answers."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = write_server_config(self.state_dir / "coordinator.toml", port=self.port,
                                     state_dir=self.state_dir, admin_token=self.admin_token,
                                     run=self.run or {}, extra=self.extra)
        log = (self.state_dir / "coordinator.log").open("a")
        self.proc = subprocess.Popen(cotune_cmd("serve", "--config", str(config), "--threads", "1"),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env={**child_env(), **self.env, **(env or {})})
        wait_healthy(self.url, self.proc, timeout=120)
        return self

    def wait_exit(self, timeout: float = 120) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, as in a crash or power cut."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 40) -> str:
        path = self.state_dir / "coordinator.log"
        return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else ""

    def run_id(self) -> str:
        runs = httpx.get(f"{self.url}/v1/runs", headers=self.admin, timeout=10).json()
        return runs[0]["run_id"]

    def status(self, run_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/runs/{run_id}", headers=self.admin, timeout=10)
        response.raise_for_status()
        return response.json()


def join_cmd(coord: CoordinatorProcess, world: TinyWorld, k: int, state_dir: Path) -> list[str]:
    return cotune_cmd("edge", "join", "--coordinator", coord.url, "--enroll-token", coord.run["enroll_token"],
                      "--data", str(world.data[f"client_{k}"]), "--name", f"device-{k}",
                      "--state-dir", str(state_dir), "--threads", "1", "--poll", "0.3", "--no-progress")


def wait_finished(coord: CoordinatorProcess, run_id: str, timeout: float = 120) -> dict[str, Any]:
    """The run's status once it is no longer running; AssertionError (with the log) after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = coord.status(run_id)
        if status["state"] != "running":
            return status
        time.sleep(0.2)
    raise AssertionError(f"run did not finish:\n{coord.log_tail()}")


def join_all(coord: CoordinatorProcess, world: TinyWorld, root: Path, count: int,
             timeout: float = 300) -> dict[str, Any]:
    """`count` real `cotune edge join` devices (device k on the data of client k modulo the world's
    clients) take part until the run ends; the run's status then. A device that fails is an
    AssertionError with its log; none is left running."""
    from cotune.demo.quickstart import child_env

    clients = sum(1 for key in world.data if key.startswith("client_") and not key.endswith("_test"))
    devices: list[subprocess.Popen] = []
    try:
        for k in range(count):
            log = (root / f"device-{k}.log").open("w")
            devices.append(subprocess.Popen(join_cmd(coord, world, k % clients, root / f"device-{k}"),
                                            stdout=log, stderr=subprocess.STDOUT, env=child_env()))
        for k, proc in enumerate(devices):
            assert proc.wait(timeout) == 0, f"device {k} failed:\n{(root / f'device-{k}.log').read_text()[-3000:]}"
        return coord.status(coord.run_id())
    finally:
        for proc in devices:
            if proc.poll() is None:
                proc.kill()
