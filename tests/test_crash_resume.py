"""A coordinator killed mid-round (SIGKILL) restarts on the same state and finishes the run;
no accepted update is lost or counted twice."""

from __future__ import annotations

import httpx
import numpy as np

from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES, DeviceProfile
from common.tensorfile import load_arrays, save_arrays
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, run_spec, wait_finished


def test_kill_mid_round_then_resume(world, tmp_path, state_url) -> None:
    spec = run_spec(world, name="crash", algorithm="fedavg", rounds=1, min_clients=2)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec, extra={"state_url": state_url}).start()
    try:
        a, b = CoordinatorClient(coord.url), CoordinatorClient(coord.url)
        ca = a.register(spec["enroll_token"], "a", DeviceProfile())
        cb = b.register(spec["enroll_token"], "b", DeviceProfile())
        run_id = ca.run_id
        ref = next(r for r in a.current_round(run_id).artifacts if r.name == SLM_ADAPTER)
        base = {k: np.array(v) for k, v in load_arrays(a.download(ref, tmp_path / "adapter")).items()}
        rng = np.random.default_rng(1)
        upd_a = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        upd_b = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        body_a = save_arrays(upd_a, {META_NUM_SAMPLES: "30"})
        body_b = save_arrays(upd_b, {META_NUM_SAMPLES: "10"})

        assert a.upload_update(run_id, 1, ca.client_id, body_a).duplicate is False
        coord.kill()  # after a's update was accepted, before b's arrived

        coord.start()
        # a's update survived the crash: sending it again is recognised, not counted twice.
        assert a.upload_update(run_id, 1, ca.client_id, body_a).duplicate is True
        assert b.upload_update(run_id, 1, cb.client_id, body_b).duplicate is False
        status = wait_finished(coord, run_id)
        assert status["state"] == "finished", status["error"]
        summary = status["rounds"][-1]
        assert summary["num_updates"] == 2
        assert summary["num_samples"] == 40

        final = next(x for x in summary["artifacts"] if x["name"] == SLM_ADAPTER)
        blob = httpx.get(f"{coord.url}/v1/artifacts/{final['sha256']}", headers=coord.admin, timeout=30)
        path = tmp_path / "final.safetensors"
        path.write_bytes(blob.content)
        got = load_arrays(path)
        for name in base:
            np.testing.assert_allclose(got[name], (30 * upd_a[name] + 10 * upd_b[name]) / 40, rtol=1e-6, atol=1e-6)
        a.close()
        b.close()
    finally:
        coord.stop()
