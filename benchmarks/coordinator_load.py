"""Load on a live coordinator: N simulated devices register, poll, download the round's
adapter and upload their own (about 1 MiB each), for N = 10, 100, 1000.

Reports request throughput, p50/p99 latency per operation, the coordinator's peak RSS, and
its RSS growth while aggregating (which must not grow with N: aggregation streams).
Writes JSON, a markdown table and a PNG plot under the output directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES
from common.tensorfile import load_arrays, save_arrays
from cotune.demo.quickstart import child_env, cotune_cmd, free_port, wait_healthy, write_server_config

OPS = ("register", "poll", "download", "upload")


@dataclass
class Sample:
    op: str
    seconds: float
    ok: bool
    nbytes: int = 0


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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


async def device(k: int, url: str, enroll: str, base: dict[str, np.ndarray], gate: asyncio.Semaphore,
                 client: httpx.AsyncClient, samples: list[Sample]) -> None:
    async def timed(op: str, coro: Any, nbytes: int = 0) -> httpx.Response:
        t0 = time.perf_counter()
        response = await coro
        samples.append(Sample(op, time.perf_counter() - t0, response.is_success, nbytes or len(response.content)))
        response.raise_for_status()
        return response

    async with gate:
        creds = (await timed("register", client.post(f"{url}/v1/clients", json={"name": f"sim-{k}"},
                                                     headers={"Authorization": f"Bearer {enroll}"}))).json()
        auth = {"Authorization": f"Bearer {creds['token']}"}
        info = (await timed("poll", client.get(f"{url}/v1/runs/{creds['run_id']}/rounds/current",
                                                headers=auth))).json()
        ref = next(a for a in info["artifacts"] if a["name"] == SLM_ADAPTER)
        await timed("download", client.get(f"{url}/v1/artifacts/{ref['sha256']}", headers=auth))
        rng = np.random.default_rng(k)
        body = save_arrays({n: a + rng.standard_normal(a.shape, dtype=np.float32) * 0.01 for n, a in base.items()},
                           {META_NUM_SAMPLES: str(10 + k % 7)})
        await timed("upload", client.put(
            f"{url}/v1/runs/{creds['run_id']}/rounds/1/updates/{creds['client_id']}", content=body, headers=auth),
            nbytes=len(body))


async def drive(n: int, url: str, enroll: str, admin: str, watch: RssWatch, concurrency: int) -> dict[str, Any]:
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
        await asyncio.gather(*(device(k, url, enroll, base, gate, client, samples) for k in range(n)))
        traffic_s = time.perf_counter() - started
        # Wait for the round to aggregate and close, noting states for the RSS samples.
        while True:
            status = (await client.get(f"{url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {admin}"})
                      ).json()
            current = [r for r in status["rounds"] if r["round"] == 1]
            watch.state = current[0]["state"] if current else "?"
            if status["state"] != "running" or watch.state == "closed":
                break
            await asyncio.sleep(0.05)
        close_s = time.perf_counter() - started - traffic_s
    return {"samples": samples, "traffic_s": traffic_s, "close_s": close_s, "adapter_bytes": len(raw)}


def run_one(n: int, model_dir: Path, work: Path, concurrency: int) -> dict[str, Any]:
    state = work / f"n{n}"
    state.mkdir(parents=True)
    port, admin, enroll = free_port(), secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    run = {"name": f"load-{n}", "algorithm": "fedavg", "slm": str(model_dir), "rounds": 1, "min_clients": n,
           "max_devices": max(n, 1),
           "round_deadline_s": 3600.0, "enroll_token": enroll,
           "lora": {"r": 128, "alpha": 256.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    config = write_server_config(state / "coordinator.toml", port=port, state_dir=state, admin_token=admin,
                                 run=run, extra={"tick_s": 0.05})
    log = (state / "coordinator.log").open("w")
    server = subprocess.Popen(cotune_cmd("serve", "--config", str(config), "--threads", "1"), stdout=log,
                              stderr=subprocess.STDOUT, env=child_env())
    watch = RssWatch(server.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        watch.start()
        result = asyncio.run(drive(n, url, enroll, admin, watch, concurrency))
    finally:
        watch.stop()
        server.terminate()
        server.wait(30)
        log.close()
    samples: list[Sample] = result["samples"]
    row: dict[str, Any] = {"clients": n, "requests": len(samples),
                           "errors": sum(not s.ok for s in samples),
                           "throughput_rps": round(len(samples) / result["traffic_s"], 1),
                           "upload_mib_s": round(sum(s.nbytes for s in samples if s.op == "upload")
                                                 / result["traffic_s"] / 2**20, 1),
                           "adapter_kib": round(result["adapter_bytes"] / 1024, 1),
                           "close_s": round(result["close_s"], 2)}
    for op in OPS:
        times = [s.seconds * 1000 for s in samples if s.op == op]
        row[f"{op}_p50_ms"] = round(percentile(times, 50), 1)
        row[f"{op}_p99_ms"] = round(percentile(times, 99), 1)
    rss = [r for _, r, _ in watch.samples]
    before = [r for _, r, st in watch.samples if st in ("open", "collecting", "?")]
    during = [r for _, r, st in watch.samples if st in ("aggregating", "server_step")]
    row["rss_peak_mib"] = round(max(rss) / 2**20, 1) if rss else None
    row["rss_before_aggregation_mib"] = round(before[-1] / 2**20, 1) if before else None
    row["rss_aggregation_peak_mib"] = round(max(during) / 2**20, 1) if during else None
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["clients", "requests", "errors", "throughput_rps", "upload_mib_s",
            *[f"{op}_{q}_ms" for op in OPS for q in ("p50", "p99")],
            "close_s", "rss_peak_mib", "rss_before_aggregation_mib", "rss_aggregation_peak_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["clients"] for r in rows]
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for op in OPS:
        lat.plot(ns, [r[f"{op}_p50_ms"] for r in rows], marker="o", label=f"{op} p50")
        lat.plot(ns, [r[f"{op}_p99_ms"] for r in rows], marker="x", linestyle="--", label=f"{op} p99")
    lat.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel="latency (ms)", title="request latency")
    lat.legend(fontsize=7)
    mem.plot(ns, [r["rss_peak_mib"] for r in rows], marker="o", label="peak RSS")
    mem.plot(ns, [r["rss_aggregation_peak_mib"] for r in rows], marker="s", label="peak RSS while aggregating")
    mem.plot(ns, [r["rss_before_aggregation_mib"] for r in rows], marker="^", label="RSS before aggregating")
    mem.set(xscale="log", xlabel="simulated devices", ylabel="coordinator RSS (MiB)", title="memory")
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_load_benchmark(ns: list[int], out_dir: Path, concurrency: int = 32) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cotune-load-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        rows = []
        for n in ns:
            print(f"load: {n} simulated devices ...", flush=True)
            rows.append(run_one(n, model_dir, work, concurrency))
    table = markdown(rows)
    meta = {"benchmark": "coordinator_load", "concurrency": concurrency, "rows": rows,
            "note": "coordinator and simulated devices share this machine"}
    (out_dir / "coordinator_load.json").write_text(json.dumps(meta, indent=2))
    (out_dir / "coordinator_load.md").write_text(table + "\n")
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
    parser.add_argument("--concurrency", type=int, default=32, help="devices in flight at once")
    parser.add_argument("--out", type=Path, default=Path("results/load"))
    args = parser.parse_args(argv)
    run_load_benchmark([int(x) for x in args.clients.split(",")], args.out, args.concurrency)


if __name__ == "__main__":
    main()
