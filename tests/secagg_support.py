"""Devices that take part in secure-aggregation rounds over the real REST API with updates the
test chooses (no training), so a test can drop any device at any phase."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES, DeviceProfile, RoundInfo
from common.secagg.ring import layout_of
from common.tensorfile import load_arrays, save_arrays
from edge_sdk.client import CoordinatorClient
from edge_sdk.secagg import SecureSession


class SimDevice:
    def __init__(self, url: str, enroll_token: str, name: str, root: Path) -> None:
        self.client = CoordinatorClient(url)
        self.creds = self.client.register(enroll_token, name, DeviceProfile())
        self.id = self.creds.client_id
        self.run_id = self.creds.run_id
        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)

    def info(self) -> RoundInfo:
        return self.client.current_round(self.run_id)

    def session(self, info: RoundInfo) -> SecureSession:
        return SecureSession(self.root / f"secagg-{info.round}.json", self.run_id, info.round, self.id,
                             info.task.secure_aggregation)

    def start_adapter(self, info: RoundInfo) -> dict[str, np.ndarray]:
        ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
        path = self.client.download(ref, self.root / f"start-{info.round}.safetensors")
        return {k: np.array(v) for k, v in load_arrays(path).items()}

    def keys(self, info: RoundInfo) -> None:
        self.client.advertise_keys(self.run_id, info.round, self.id, self.session(info).advert())

    def shares(self, info: RoundInfo) -> None:
        hood = self.client.neighbourhood(self.run_id, info.round)
        self.client.deal_shares(self.run_id, info.round, self.id, self.session(info).deal(hood))

    def masked_body(self, info: RoundInfo, arrays: dict[str, np.ndarray], samples: int) -> bytes:
        inbox = self.client.inbox(self.run_id, info.round)
        layout = layout_of({k: (v.shape, "") for k, v in arrays.items()})
        masked, _clipped = self.session(info).masked(arrays, layout, samples, inbox)
        return save_arrays(masked, {META_NUM_SAMPLES: str(samples)})

    def upload(self, info: RoundInfo, arrays: dict[str, np.ndarray], samples: int) -> None:
        self.client.upload_update(self.run_id, info.round, self.id, self.masked_body(info, arrays, samples))

    def reveal(self, info: RoundInfo) -> None:
        request = self.client.unmask_request(self.run_id, info.round)
        self.client.reveal(self.run_id, info.round, self.id, self.session(info).reveal(request))


def wait_state(device: SimDevice, state: str, round_number: int | None = None, timeout: float = 60) -> RoundInfo:
    deadline = time.monotonic() + timeout
    info = device.info()
    while time.monotonic() < deadline:
        info = device.info()
        if info.state.value == state and (round_number is None or info.round == round_number):
            return info
        if info.run_state.value != "running":
            break
        time.sleep(0.1)
    raise AssertionError(f"round never reached {state}: it is {info.round} {info.state.value} ({info.run_state})")


def final_adapter(url: str, admin: dict[str, str], run_id: str, dest: Path) -> dict[str, np.ndarray]:
    status = httpx.get(f"{url}/v1/runs/{run_id}", headers=admin, timeout=10).json()
    ref = next(x for x in status["rounds"][-1]["artifacts"] if x["name"] == SLM_ADAPTER)
    dest.write_bytes(httpx.get(f"{url}/v1/artifacts/{ref['sha256']}", headers=admin, timeout=30).content)
    return {k: np.array(v) for k, v in load_arrays(dest).items()}


def weighted_mean(updates: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {k: sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total
            for k in updates[0]}
