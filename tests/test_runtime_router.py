"""Collaborative inference against a real HTTP coordinator stand-in on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.test_runtime_onnx import make_onnx_build, make_tiny_checkpoint

TOKEN = "device-token-0123456789"


class GenerateRequest(BaseModel):
    """The coordinator's /v1/generate request (module level: FastAPI resolves annotations by name)."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def coordinator():
    """A minimal app answering the /v1/generate contract; it records what it was sent."""
    import uvicorn
    from fastapi import FastAPI, Header, HTTPException

    seen: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/v1/generate")
    def generate(body: GenerateRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        if authorization != f"Bearer {TOKEN}":
            raise HTTPException(401, detail={"code": "unauthorized", "message": "bad token"})
        seen.append(body.model_dump())
        return {"text": f"cloud answer to: {body.prompt}", "tokens": 5, "model": "big-llm"}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test coordinator did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "seen": seen}
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from edge_sdk import EdgeModel

    root = tmp_path_factory.mktemp("router")
    build = make_onnx_build(make_tiny_checkpoint(root), root)
    with EdgeModel.load(build, threads=1) as m:
        yield m


def test_confident_answers_stay_local(model, coordinator) -> None:
    from edge_sdk.runtime import CollaborativeRouter

    before = len(coordinator["seen"])
    router = CollaborativeRouter(model, coordinator["url"], TOKEN, threshold=1e6)
    answer = router.answer("the river lock", max_tokens=6)
    assert answer.path == "local" and not answer.escalated
    assert answer.text == answer.local.text
    assert answer.signal == "mean_entropy" and answer.signal_value is not None and answer.signal_value > 0
    assert "confident" in answer.reason
    assert len(coordinator["seen"]) == before


def test_unsure_answers_escalate_to_the_coordinator(model, coordinator) -> None:
    from edge_sdk.runtime import CollaborativeRouter

    # An untrained model is close to uniform over its vocabulary: entropy near log(vocab).
    router = CollaborativeRouter(model, coordinator["url"], TOKEN, signal="mean_entropy", threshold=0.5)
    answer = router.answer("keeper 4 opened", max_tokens=7, temperature=0.0, top_p=0.9, stop=["\n"])
    assert answer.path == "cloud" and answer.escalated, (answer.reason, answer.cloud_error)
    assert answer.text == "cloud answer to: keeper 4 opened"
    assert answer.cloud == {"text": answer.text, "tokens": 5, "model": "big-llm"}
    assert "unsure" in answer.reason and "big-llm" in answer.reason
    assert coordinator["seen"][-1] == {"prompt": "keeper 4 opened", "max_tokens": 7, "temperature": 0.0,
                                       "top_p": 0.9, "stop": ["\n"]}
    assert answer.local.completion_tokens >= 1  # the device still answered first
    assert answer.to_dict()["path"] == "cloud"


def test_unreachable_coordinator_falls_back_to_the_local_answer(model) -> None:
    from edge_sdk.runtime import CollaborativeRouter

    closed = _free_port()  # bound then released: nothing listens there
    router = CollaborativeRouter(model, f"http://127.0.0.1:{closed}", TOKEN, threshold=0.5, connect_timeout_s=2)
    t0 = time.monotonic()
    answer = router.answer("the river lock", max_tokens=5)
    assert time.monotonic() - t0 < 10
    assert answer.path == "local" and answer.escalated
    assert answer.text == answer.local.text
    assert "unreachable" in answer.reason and "local answer stands" in answer.reason
    assert answer.cloud_error and str(closed) in answer.cloud_error


def test_refused_token_falls_back_and_says_so(model, coordinator) -> None:
    from edge_sdk.runtime import CollaborativeRouter

    router = CollaborativeRouter(model, coordinator["url"], "wrong-token", threshold=0.5)
    answer = router.answer("keeper", max_tokens=4)
    assert answer.path == "local" and "refused" in answer.reason and "401" in (answer.cloud_error or "")


def test_custom_signal_and_no_coordinator(model) -> None:
    from edge_sdk.runtime import CollaborativeRouter

    def long_answer(result: Any) -> float:
        return float(result.completion_tokens)

    router = CollaborativeRouter(model, None, signal=long_answer, threshold=2)
    answer = router.answer("keeper", max_tokens=4)
    assert answer.signal == "long_answer" and answer.signal_value == 4.0
    assert answer.path == "local" and "no coordinator is configured" in answer.reason
    with pytest.raises(ValueError, match="unknown signal"):
        CollaborativeRouter(model, signal="vibes")  # type: ignore[arg-type]


def test_router_from_the_command_line(model, coordinator, tmp_path: Path) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from cotune.cli.edge_runtime import edge_generate

    app = typer.Typer()
    app.command()(edge_generate)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    result = CliRunner().invoke(app, ["edge-generate", str(model.build_dir), "keeper", "--max-tokens", "4",
                                      "--coordinator", coordinator["url"], "--token", TOKEN, "--threshold", "0.5",
                                      "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["path"] == "cloud" and payload["text"] == "cloud answer to: keeper"
