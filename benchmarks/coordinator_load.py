"""Load on a live coordinator: N simulated devices register, poll, download the round's
adapter and upload their own (about 1 MiB each), for N = 10, 100, 1000, at a given number of
requests in flight, against one coordinator or several replicas behind a load balancer.

Replicas share one PostgreSQL database (`--state-url`, a server the benchmark may create
databases on) and one artifact directory, with HAProxy (round robin, HTTP mode) in front: the
deployment ARCHITECTURE.md, "Round state machine", describes. Reports request throughput,
p50/p99 latency per operation, the update's size as a share of the SLM's parameters, the
coordinators' peak RSS, and RSS growth while aggregating (which must not grow with N:
aggregation streams). Writes JSON, a markdown table and a PNG plot under the output directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.report import Column, machine_info, markdown_table
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES
from common.retry import Backoff
from common.tensorfile import load_arrays, save_arrays
from cotune.demo.quickstart import child_env, cotune_cmd, free_port, wait_healthy, write_server_config

OPS = ("register", "poll", "download", "upload")


@dataclass
class Sample:
    op: str
    seconds: float
    ok: bool
    nbytes: int = 0
    transport_error: bool = False  # the connection failed (no HTTP status)


@dataclass
class RssWatch:
    """Samples a process's RSS every 50 ms, tagged with the round state seen last."""

    pid: int
    samples: list[tuple[float, int, str]] = field(default_factory=list)
    state: str = "?"
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.monotonic(), proc.memory_info().rss, self.state))
                except psutil.Error:
                    return
                self._stop.wait(0.05)

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def build_model(root: Path) -> Path:
    """A small llama-shaped SLM with our own tokenizer; LoRA r=128 on q/k/v/o makes 1 MiB adapters."""
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import save_tokenizer, train_tokenizer
    from cotune.demo.tiny import build_tiny_model

    tok = root / "tokenizer"
    save_tokenizer(train_tokenizer([f"device {i} talks to the coordinator" for i in range(200)], 384), tok)
    return save_checkpoint(build_tiny_model("llama", "small", vocab_size=384), tok, root / "slm")


def parameter_count(model_dir: Path) -> int:
    """The SLM's parameters, read from its safetensors headers."""
    from common.tensorfile import read_header

    return sum(math.prod(info.shape) for f in sorted(Path(model_dir).glob("*.safetensors"))
               for info in read_header(f, wire_dtypes=False).tensors.values())


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server at `admin_url` for one measurement, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"cotune_load_{secrets.token_hex(4)}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def haproxy_config(port: int, backends: list[int]) -> str:
    """Round robin over the replicas; timeouts long enough for a 1000-device round."""
    servers = "\n".join(f"    server r{k} 127.0.0.1:{p}" for k, p in enumerate(backends))
    return (f"global\n    maxconn 4096\ndefaults\n    mode http\n    timeout connect 5s\n"
            f"    timeout client 600s\n    timeout server 600s\nfrontend coordinators\n"
            f"    bind 127.0.0.1:{port}\n    default_backend replicas\nbackend replicas\n    balance roundrobin\n"
            f"{servers}\n")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# Like a real device (edge_sdk's client), a simulated one retries a dropped connection, 429 and 503
# with backoff; every failed attempt is a sample of its own, and a device that gives up is counted.
RETRY = Backoff(max_tries=4, base_s=0.2, max_s=2.0, max_total_s=None)


async def device(k: int, url: str, enroll: str, base: dict[str, np.ndarray], gate: asyncio.Semaphore,
                 client: httpx.AsyncClient, samples: list[Sample]) -> None:
    rng = random.Random(k)

    async def timed(op: str, send: Callable[[], Awaitable[httpx.Response]], nbytes: int = 0) -> httpx.Response:
        for attempt in range(RETRY.max_tries):
            t0 = time.perf_counter()
            try:
                response = await send()
            except httpx.TransportError:
                samples.append(Sample(op, time.perf_counter() - t0, False, 0, transport_error=True))
                if attempt + 1 == RETRY.max_tries:
                    raise
            else:
                samples.append(Sample(op, time.perf_counter() - t0, response.is_success,
                                      nbytes or len(response.content)))
                if response.status_code not in (429, 503) or attempt + 1 == RETRY.max_tries:
                    response.raise_for_status()
                    return response
            await asyncio.sleep(RETRY.delay(attempt, rng))
        raise AssertionError("unreachable")

    async with gate:
        creds = (await timed("register", lambda: client.post(
            f"{url}/v1/clients", json={"name": f"sim-{k}"}, headers={"Authorization": f"Bearer {enroll}"}))).json()
        auth = {"Authorization": f"Bearer {creds['token']}"}
        info = (await timed("poll", lambda: client.get(f"{url}/v1/runs/{creds['run_id']}/rounds/current",
                                                        headers=auth))).json()
        ref = next(a for a in info["artifacts"] if a["name"] == SLM_ADAPTER)
        await timed("download", lambda: client.get(f"{url}/v1/artifacts/{ref['sha256']}", headers=auth))
        noise = np.random.default_rng(k)
        body = save_arrays({n: a + noise.standard_normal(a.shape, dtype=np.float32) * 0.01 for n, a in base.items()},
                           {META_NUM_SAMPLES: str(10 + k % 7)})
        await timed("upload", lambda: client.put(
            f"{url}/v1/runs/{creds['run_id']}/rounds/1/updates/{creds['client_id']}", content=body, headers=auth),
            nbytes=len(body))


async def drive(n: int, url: str, enroll: str, admin: str, watches: list[RssWatch],
                concurrency: int) -> dict[str, Any]:
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        runs = (await client.get(f"{url}/v1/runs", headers={"Authorization": f"Bearer {admin}"})).json()
        run_id = runs[0]["run_id"]
        # One device fetches the initial adapter so every simulated device can perturb it.
        first = await client.post(f"{url}/v1/clients", json={"name": "probe"},
                                  headers={"Authorization": f"Bearer {enroll}"})
        token = first.json()["token"]
        info = (await client.get(f"{url}/v1/runs/{run_id}/rounds/current",
                                 headers={"Authorization": f"Bearer {token}"})).json()
        ref = next(a for a in info["artifacts"] if a["name"] == SLM_ADAPTER)
        raw = (await client.get(f"{url}/v1/artifacts/{ref['sha256']}",
                                headers={"Authorization": f"Bearer {token}"})).content
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
            fh.write(raw)
            fh.flush()
            base = {k: np.array(v) for k, v in load_arrays(Path(fh.name)).items()}
        # The probe is enrolled too: revoke it so the round waits for the N devices only.
        await client.delete(f"{url}/v1/clients/{first.json()['client_id']}",
                            headers={"Authorization": f"Bearer {admin}"})
        gate = asyncio.Semaphore(concurrency)
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(device(k, url, enroll, base, gate, client, samples) for k in range(n)),
                                        return_exceptions=True)
        traffic_s = time.perf_counter() - started
        gave_up = [o for o in outcomes if isinstance(o, BaseException)]
        if len(gave_up) == n:
            raise RuntimeError(f"every simulated device failed; the first: {gave_up[0]!r}")
        # Wait for the round to aggregate and close, noting states for the RSS samples.
        while True:
            status = (await client.get(f"{url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {admin}"})
                      ).json()
            current = [r for r in status["rounds"] if r["round"] == 1]
            seen = current[0]["state"] if current else "?"
            for watch in watches:
                watch.state = seen
            # A round that lost devices waits for its deadline; the benchmark does not.
            if status["state"] != "running" or seen == "closed" or gave_up:
                break
            await asyncio.sleep(0.05)
        close_s = time.perf_counter() - started - traffic_s
    return {"samples": samples, "traffic_s": traffic_s, "close_s": None if gave_up else close_s,
            "adapter_bytes": len(raw), "devices_failed": len(gave_up)}


def run_one(n: int, model_dir: Path, work: Path, concurrency: int, replicas: int = 1,
            state_url: str | None = None) -> dict[str, Any]:
    if replicas > 1 and state_url is None:
        raise ValueError("several replicas share one PostgreSQL database: give --state-url")
    with postgres_database(state_url) if state_url else _nothing() as db_url:
        return _run_one(n, model_dir, work, concurrency, replicas, db_url)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _run_one(n: int, model_dir: Path, work: Path, concurrency: int, replicas: int,
             db_url: str | None) -> dict[str, Any]:
    state = work / f"n{n}-c{concurrency}-r{replicas}"
    state.mkdir(parents=True)
    admin, enroll = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    run = {"name": f"load-{n}", "algorithm": "fedavg", "slm": str(model_dir), "rounds": 1, "min_clients": n,
           "max_devices": max(n, 1),
           "round_deadline_s": 3600.0, "enroll_token": enroll,
           "lora": {"r": 128, "alpha": 256.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    ports = [free_port() for _ in range(replicas)]
    servers, logs, watches = [], [], []
    balancer = None
    try:
        for k, port in enumerate(ports):
            extra: dict[str, Any] = {"tick_s": 0.05, "instance_id": f"replica-{k}",
                                     "artifact_dir": str(state / "artifacts"), "work_dir": str(state / f"work-{k}")}
            if db_url is not None:
                extra["state_url"] = db_url
            config = write_server_config(state / f"coordinator-{k}.toml", port=port, state_dir=state,
                                         admin_token=admin, run=run, extra=extra)
            logs.append((state / f"coordinator-{k}.log").open("w"))
            servers.append(subprocess.Popen(cotune_cmd("serve", "--config", str(config), "--threads", "1"),
                                            stdout=logs[-1], stderr=subprocess.STDOUT, env=child_env()))
            wait_healthy(f"http://127.0.0.1:{port}", servers[-1])  # one at a time: the first creates the run
        url = f"http://127.0.0.1:{ports[0]}"
        if replicas > 1:
            front = free_port()
            cfg = state / "haproxy.cfg"
            cfg.write_text(haproxy_config(front, ports))
            balancer = subprocess.Popen([_haproxy(), "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{front}"
            wait_healthy(url, balancer)
        watches = [RssWatch(s.pid) for s in servers]
        for watch in watches:
            watch.start()
        result = asyncio.run(drive(n, url, enroll, admin, watches, concurrency))
    finally:
        for watch in watches:
            watch.stop()
        if balancer is not None:
            balancer.terminate()
            balancer.wait(30)
        for server in servers:
            server.terminate()
            server.wait(30)
        for log in logs:
            log.close()
    samples: list[Sample] = result["samples"]
    slm_params = parameter_count(model_dir)
    update_values = result["adapter_bytes"] // 4  # float32
    row: dict[str, Any] = {"clients": n, "concurrency": concurrency, "replicas": replicas,
                           "state": "postgresql" if db_url else "sqlite", "requests": len(samples),
                           "errors": sum(not s.ok for s in samples),
                           "transport_errors": sum(s.transport_error for s in samples),
                           "devices_failed": result["devices_failed"],
                           "throughput_rps": round(len(samples) / result["traffic_s"], 1),
                           "upload_mib_s": round(sum(s.nbytes for s in samples if s.op == "upload")
                                                 / result["traffic_s"] / 2**20, 1),
                           "adapter_kib": round(result["adapter_bytes"] / 1024, 1),
                           "update_share_of_slm_params": round(update_values / slm_params, 4),
                           "close_s": None if result["close_s"] is None else round(result["close_s"], 2)}
    for op in OPS:
        times = [s.seconds * 1000 for s in samples if s.op == op]
        row[f"{op}_p50_ms"] = round(percentile(times, 50), 1)
        row[f"{op}_p99_ms"] = round(percentile(times, 99), 1)
    samples_all = [x for w in watches for x in w.samples]
    rss = [r for _, r, _ in samples_all]
    before = [r for w in watches for _, r, st in w.samples if st in ("open", "collecting", "?")]
    during = [r for _, r, st in samples_all if st in ("aggregating", "server_step")]
    row["rss_peak_mib"] = round(max(rss) / 2**20, 1) if rss else None
    row["rss_before_aggregation_mib"] = round(before[-1] / 2**20, 1) if before else None
    row["rss_aggregation_peak_mib"] = round(max(during) / 2**20, 1) if during else None
    return row


def _haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        raise RuntimeError("several replicas are measured behind HAProxy, which is not installed: "
                           "apt-get install haproxy")
    return found


COLUMNS = ["clients", "concurrency", "replicas", "state", "requests", "errors", "transport_errors",
           "devices_failed", "throughput_rps", "upload_mib_s",
           *[f"{op}_{q}_ms" for op in OPS for q in ("p50", "p99")], "adapter_kib", "update_share_of_slm_params",
           "close_s", "rss_peak_mib", "rss_before_aggregation_mib", "rss_aggregation_peak_mib"]


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(rows, [Column(c, c) for c in COLUMNS])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per set-up (requests in flight, replicas): upload and poll latency, and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = sorted({(r["concurrency"], r["replicas"]) for r in rows})
    fig, (up, poll, mem) = plt.subplots(1, 3, figsize=(15, 4))
    for c, k in setups:
        pick = sorted((r for r in rows if (r["concurrency"], r["replicas"]) == (c, k)), key=lambda r: r["clients"])
        ns = [r["clients"] for r in pick]
        label = f"{c} in flight, {k} replica{'s' if k > 1 else ''}"
        line = up.plot(ns, [r["upload_p99_ms"] for r in pick], marker="o", label=f"{label} p99")[0]
        up.plot(ns, [r["upload_p50_ms"] for r in pick], marker="x", linestyle="--", color=line.get_color(),
                label=f"{label} p50")
        poll.plot(ns, [r["poll_p99_ms"] for r in pick], marker="o", label=f"{label} p99")
        mem.plot(ns, [r["rss_peak_mib"] for r in pick], marker="s", label=label)
    up.axhline(500, color="grey", linewidth=0.8, linestyle=":", label="target p99 500 ms")
    up.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel="ms", title="upload latency")
    poll.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel="ms", title="poll latency (p99)")
    mem.set(xscale="log", xlabel="simulated devices", ylabel="MiB", title="peak RSS of a coordinator")
    for ax in (up, poll, mem):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_report(rows: list[dict[str, Any]], out_dir: Path) -> str:
    table = markdown(rows)
    meta = {"benchmark": "coordinator_load", "rows": rows,
            "machine": {**machine_info(), "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            "note": "coordinators, load balancer and simulated devices share this machine"}
    (out_dir / "coordinator_load.json").write_text(json.dumps(meta, indent=2))
    (out_dir / "coordinator_load.md").write_text(table + "\n")
    return table


def run_load_benchmark(ns: list[int], out_dir: Path, concurrency: int | list[int] = 32,
                       replicas: list[int] | None = None, state_url: str | None = None) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    concurrencies = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    replica_counts = replicas or [1]
    with tempfile.TemporaryDirectory(prefix="cotune-load-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        rows: list[dict[str, Any]] = []
        for n in ns:
            for c in concurrencies:
                for r in replica_counts:
                    print(f"load: {n} simulated devices, {c} in flight, {r} replica(s) ...", flush=True)
                    rows.append(run_one(n, model_dir, work, c, r, state_url))
                    table = _write_report(rows, out_dir)  # after every row: a long matrix keeps what it measured
    plot(rows, out_dir / "coordinator_load.png")
    print(table)
    growth = [r["rss_aggregation_peak_mib"] for r in rows if r["rss_aggregation_peak_mib"]]
    if len(growth) > 1:
        print(f"aggregation peak RSS from N={rows[0]['clients']} to N={rows[-1]['clients']}: "
              f"{growth[0]} -> {growth[-1]} MiB (median {statistics.median(growth)})")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated N values")
    parser.add_argument("--concurrency", default="32", help="comma-separated: devices in flight at once")
    parser.add_argument("--replicas", default="1", help="comma-separated: coordinator replicas behind HAProxy")
    parser.add_argument("--state-url", default=None, help="PostgreSQL server URL (needed for several replicas)")
    parser.add_argument("--out", type=Path, default=Path("results/load"))
    args = parser.parse_args(argv)
    run_load_benchmark([int(x) for x in args.clients.split(",")], args.out,
                       [int(x) for x in args.concurrency.split(",")], [int(x) for x in args.replicas.split(",")],
                       args.state_url)


if __name__ == "__main__":
    main()
