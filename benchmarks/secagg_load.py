"""What secure aggregation costs: one FedAvg round of N simulated devices with the quickstart's
LoRA adapter on its tiny SLM, with and without secure aggregation, against a live coordinator on
loopback.

Each device runs the real device code (edge_sdk/secagg.py) and the real REST calls, one device
after another, so a device's seconds are its own computation (keys, sharing, masking, revealing)
and not time spent waiting on others; the coordinator runs in its own process. Reported per N:
payload bytes up and down per device, device seconds per device, and the coordinator's seconds to
close the round (unmasking included) and its wall time, next to the plain round.
Writes JSON, a markdown table and a PNG plot under the output directory.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.report import Column, machine_info, markdown_table
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES, DeviceProfile
from common.secagg.ring import layout_of
from common.tensorfile import load_arrays, save_arrays
from cotune.demo.quickstart import child_env, cotune_cmd, free_port, wait_healthy, write_server_config
from edge_sdk.client import CoordinatorClient
from edge_sdk.secagg import SecureSession

# The quickstart's adapter on its tiny SLM (cotune/demo/quickstart.py): r=16 on every linear layer.
QUICKSTART_LORA = {"r": 16, "alpha": 32.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]}


@dataclass
class Meter:
    """One device's payload bytes and own computation time."""

    up: int = 0
    down: int = 0
    compute_s: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def __enter__(self) -> Meter:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.compute_s += time.perf_counter() - self._t0


def build_model(root: Path) -> Path:
    """The quickstart's tiny llama SLM with a tokenizer of its own."""
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import save_tokenizer, train_tokenizer
    from cotune.demo.tiny import build_tiny_model

    tok = root / "tokenizer"
    save_tokenizer(train_tokenizer([f"device {i} talks to the coordinator" for i in range(200)], 384), tok)
    return save_checkpoint(build_tiny_model("llama", "tiny", vocab_size=384), tok, root / "slm")


def _wait(client: CoordinatorClient, run_id: str, state: str, timeout: float = 3600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.current_round(run_id)
        if info.state.value == state or info.run_state.value != "running":
            return info
        time.sleep(0.05)
    raise TimeoutError(f"round never reached {state}")


def _size(model: Any) -> int:
    return len(model.model_dump_json())


def run_round(n: int, model_dir: Path, work: Path, secure: bool) -> dict[str, Any]:
    state_dir = work / f"{'secure' if secure else 'plain'}-{n}"
    state_dir.mkdir(parents=True)
    port, admin, enroll = free_port(), secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    run: dict[str, Any] = {"name": f"cost-{n}", "algorithm": "fedavg", "slm": str(model_dir), "rounds": 1,
                           "min_clients": n, "max_devices": n, "round_deadline_s": 3600.0, "enroll_token": enroll,
                           "lora": QUICKSTART_LORA}
    if secure:
        run["secure_aggregation"] = {"phase_deadline_s": 3600.0}
    config = write_server_config(state_dir / "coordinator.toml", port=port, state_dir=state_dir, admin_token=admin,
                                 run=run, extra={"tick_s": 0.05})
    log = (state_dir / "coordinator.log").open("w")
    server = subprocess.Popen(cotune_cmd("serve", "--config", str(config), "--threads", "1"), stdout=log,
                              stderr=subprocess.STDOUT, env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        clients = [CoordinatorClient(url) for _ in range(n)]
        creds = [c.register(enroll, f"sim-{k}", DeviceProfile()) for k, c in enumerate(clients)]
        for c, cr in zip(clients, creds, strict=True):
            c.token = cr.token
        run_id = creds[0].run_id
        meters = [Meter() for _ in range(n)]
        started = time.perf_counter()
        info = _wait(clients[0], run_id, "keys" if secure else "collecting")
        ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
        base = {k: np.array(v) for k, v in load_arrays(clients[0].download(ref, work / f"start-{n}-{secure}")).items()}
        layout = layout_of({k: (v.shape, "") for k, v in base.items()})
        sessions = [SecureSession(state_dir / f"device-{k}.json", run_id, 1, cr.client_id,
                                  info.task.secure_aggregation) if secure else None for k, cr in enumerate(creds)]
        for m in meters:
            m.down += ref.size
        if secure:
            for c, cr, s, m in zip(clients, creds, sessions, meters, strict=True):
                with m:
                    advert = s.advert()
                m.up += _size(advert)
                c.advertise_keys(run_id, 1, cr.client_id, advert)
            _wait(clients[0], run_id, "shares")
            for c, cr, s, m in zip(clients, creds, sessions, meters, strict=True):
                hood = c.neighbourhood(run_id, 1)
                m.down += _size(hood)
                with m:
                    bundle = s.deal(hood)
                m.up += _size(bundle)
                c.deal_shares(run_id, 1, cr.client_id, bundle)
            _wait(clients[0], run_id, "collecting")
        rng = np.random.default_rng(0)
        for k, (c, cr, s, m) in enumerate(zip(clients, creds, sessions, meters, strict=True)):
            update = {name: a + rng.standard_normal(a.shape, dtype=np.float32) * 0.01 for name, a in base.items()}
            samples = 10 + k % 7
            if secure:
                inbox = c.inbox(run_id, 1)
                m.down += _size(inbox)
                with m:
                    masked, _ = s.masked(update, layout, samples, inbox)
                    body = save_arrays(masked, {META_NUM_SAMPLES: str(samples)})
            else:
                with m:
                    body = save_arrays(update, {META_NUM_SAMPLES: str(samples)})
            m.up += len(body)
            c.upload_update(run_id, 1, cr.client_id, body)
        if secure:
            _wait(clients[0], run_id, "unmasking")
            for c, cr, s, m in zip(clients, creds, sessions, meters, strict=True):
                request = c.unmask_request(run_id, 1)
                m.down += _size(request)
                with m:
                    reveal = s.reveal(request)
                m.up += _size(reveal)
                c.reveal(run_id, 1, cr.client_id, reveal)
        devices_done = time.perf_counter()
        while True:
            status = httpx.get(f"{url}/v1/runs/{run_id}", headers={"Authorization": f"Bearer {admin}"},
                               timeout=30).json()
            if status["state"] != "running":
                break
            time.sleep(0.05)
        finished = time.perf_counter()
        summary = [r for r in status["rounds"] if r["round"] == 1][0]
        times = summary["phase_times"]
        aggregate_s = _seconds(times.get("server_step"), times.get("aggregating"))
        for c in clients:
            c.close()
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    if status["state"] != "finished":
        raise RuntimeError(f"the round failed: {status.get('error')}")
    agg = summary["metrics"].get("aggregation", {}).get("secure_aggregation", {})
    return {"devices": n, "secure": secure, "adapter_kib": round(ref.size / 1024, 1),
            "up_kib_per_device": round(statistics.median(m.up for m in meters) / 1024, 1),
            "down_kib_per_device": round(statistics.median(m.down for m in meters) / 1024, 1),
            "device_s_median": round(statistics.median(m.compute_s for m in meters), 4),
            "device_s_max": round(max(m.compute_s for m in meters), 4),
            "coordinator_aggregate_s": aggregate_s,
            "round_wall_s": round(finished - started, 2), "after_last_device_s": round(finished - devices_done, 2),
            "neighbours": agg.get("neighbours"), "threshold": agg.get("threshold")}


def _seconds(later: str | None, earlier: str | None) -> float | None:
    if later is None or earlier is None:
        return None
    from datetime import datetime

    return round((datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds(), 3)


COLUMNS = ["devices", "secure", "neighbours", "threshold", "adapter_kib", "up_kib_per_device", "down_kib_per_device",
           "device_s_median", "device_s_max", "coordinator_aggregate_s", "after_last_device_s", "round_wall_s"]


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(rows, [Column(c, c) for c in COLUMNS])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for secure, style in ((False, "o-"), (True, "s--")):
        pick = [r for r in rows if r["secure"] is secure]
        ns = [r["devices"] for r in pick]
        label = "secure aggregation" if secure else "plain"
        axes[0].plot(ns, [r["up_kib_per_device"] + r["down_kib_per_device"] for r in pick], style, label=label)
        axes[1].plot(ns, [r["device_s_median"] * 1000 for r in pick], style, label=label)
        axes[2].plot(ns, [r["coordinator_aggregate_s"] or 0 for r in pick], style, label=label)
    for ax, title, unit in zip(axes, ("bytes per device (up + down)", "device compute per round",
                                      "coordinator aggregation per round"), ("KiB", "ms", "s"), strict=True):
        ax.set(xscale="log", xlabel="devices", ylabel=unit, title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_secagg_benchmark(ns: list[int], out_dir: Path) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cotune-secagg-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        for n in ns:
            for secure in (False, True):
                print(f"secure aggregation cost: {n} devices, {'secure' if secure else 'plain'} ...", flush=True)
                rows.append(run_round(n, model_dir, work, secure))
    table = markdown(rows)
    meta = {"benchmark": "secure_aggregation_cost", "rows": rows,
            "machine": machine_info(),
            "note": "coordinator and simulated devices share this machine; devices act one after another"}
    (out_dir / "secagg_cost.json").write_text(json.dumps(meta, indent=2))
    (out_dir / "secagg_cost.md").write_text(table + "\n")
    plot(rows, out_dir / "secagg_cost.png")
    print(table)
    return rows
