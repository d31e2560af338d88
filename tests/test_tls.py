"""Serving over TLS with a self-signed certificate: trusted clients connect, others are refused."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from cotune.demo.quickstart import child_env, cotune_cmd, free_port, write_server_config
from edge_sdk.client import CoordinatorClient
from tests.support import run_spec


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cotune-test",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_https_with_a_self_signed_certificate(world, tmp_path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    spec = run_spec(world, name="tls", algorithm="fedavg")
    config = write_server_config(tmp_path / "c.toml", port=port, state_dir=tmp_path / "state",
                                 admin_token="a" * 32, run=spec,
                                 extra={"tls_certfile": str(cert), "tls_keyfile": str(key)})
    proc = subprocess.Popen(cotune_cmd("serve", "--config", str(config)), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    try:
        client = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                client = CoordinatorClient(url, verify=cert)
                assert client.healthz()["status"] == "ok"
                break
            except httpx.TransportError:
                client.close()
                client = None
                time.sleep(0.3)
        assert client is not None, "the TLS coordinator never answered"
        creds = client.register(spec["enroll_token"], "secure-device")
        assert client.current_round(creds.run_id).round == 1
        client.close()
        # Without trusting the certificate, a client refuses to talk, and plain HTTP fails.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        proc.terminate()
        proc.wait(15)
