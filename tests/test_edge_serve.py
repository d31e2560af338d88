"""`cotune edge serve`: the OpenAI API on the device, driven by the official `openai` client.

The server runs as `cotune edge serve` in its own process on loopback, over a tiny llama
exported to GGUF (f32) plus a LoRA adapter build; answers are compared with EdgeModel in this
process on the same build.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from cotune.demo.quickstart import child_env, cotune_cmd, free_port, wait_healthy
from tests.test_runtime_llama import _exporter, _random_adapter
from tests.test_runtime_onnx import make_tiny_checkpoint

openai = pytest.importorskip("openai")

PROMPT = "the river lock 3 was"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    export = _exporter()
    root = tmp_path_factory.mktemp("serve")
    hf = make_tiny_checkpoint(root)
    adapter = _random_adapter(hf, root / "adapter", scale=0.5)
    export(hf, adapter, ["gguf-lora:f32"], root / "builds", progress=False, threads=2)
    lora = root / "builds" / "gguf-lora-f32"
    # The LoRA build carries the base GGUF it was made for: serve that, with the adapter on offer.
    return {"lora": lora, "base": lora / "base.gguf", "root": root}


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(cotune_cmd("edge", "serve", "--port", str(port), "--threads", "1", *args),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, what=f"edge serve (log: {log})")
    except RuntimeError:
        proc.terminate()
        raise
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def server(builds: dict[str, Path]) -> Iterator[str]:
    proc, url = _start(["--build", str(builds["base"]), "--model-name", "tiny", "--adapter", str(builds["lora"])],
                       builds["root"] / "serve.log")
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(builds: dict[str, Path]):
    from edge_sdk import EdgeModel

    with EdgeModel.load(builds["base"], threads=1) as model:
        yield model


def test_models_lists_the_build_and_each_adapter(client) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny"
    assert len(ids) == 2 and ids[1].startswith("tiny:")


def test_greedy_completion_equals_edge_model(client, local) -> None:
    want = local.generate(PROMPT, max_tokens=12, temperature=0.0)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == want.completion_tokens
    assert got.model_extra["cotune_source"] == "local"


def test_adapter_selected_by_model_name(client, local, builds: dict[str, Path]) -> None:
    from edge_sdk import EdgeModel

    adapter_id = [m.id for m in client.models.list().data][1]
    with EdgeModel.load(builds["lora"], threads=1) as with_lora:
        want = with_lora.generate(PROMPT, max_tokens=12, ignore_eos=False)
    base = local.generate(PROMPT, max_tokens=12)
    assert want.text != base.text  # the adapter visibly changes the model
    got = client.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert again.choices[0].text == base.text


def test_chat_stream_concatenates_to_the_answer(client, local) -> None:
    from edge_sdk.serve.chat import DEFAULT_CHAT_TEMPLATE, ChatFormatter

    messages = [{"role": "user", "content": "keeper 5 closed the"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    default = ChatFormatter(None)
    prompt = default.render(messages)
    assert default.template == DEFAULT_CHAT_TEMPLATE and prompt == "keeper 5 closed the\n"
    # The default template's answers end at a newline, in chat as in evaluation.
    assert default.stop == ("\n",)
    assert full.choices[0].message.content == local.generate(prompt, max_tokens=16, stop=list(default.stop)).text
    assert full.choices[0].message.role == "assistant"
    pieces, finishes = [], []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == full.usage.completion_tokens
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(pieces) == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]


def test_stop_is_honoured(client, local) -> None:
    free = local.generate(PROMPT, max_tokens=24, ignore_eos=True).text
    assert len(free) > 4
    stop = free[2:4]
    want = local.generate(PROMPT, max_tokens=24, stop=[stop])
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == want.text and stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == want.text


def test_seeded_sampling_repeats(client) -> None:
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 1.5, "top_p": 0.9}
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert a == client.completions.create(seed=7, **kw).choices[0].text


def test_bad_requests_get_openai_errors(client, server: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert bad.value.status_code == 400
    body = bad.value.body
    assert set(body) >= {"message", "type", "code"} and body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="secret-model-name", messages=[{"role": "user", "content": "x"}])
    assert "secret-model-name" not in json.dumps(missing.value.body)
    # Not JSON, an unknown field, a body over the limit: each a 4xx in OpenAI's shape, not echoed.
    for content, status in ((b"{not json", 400), (b'{"model":"tiny","prompt":"a","zz_secret":1}', 400),
                            (b'{"model":"tiny","prompt":"' + b"a" * (2 << 20) + b'"}', 413)):
        reply = httpx.post(f"{server}/v1/completions", content=content,
                           headers={"content-type": "application/json"}, timeout=30)
        assert reply.status_code == status
        error = reply.json()["error"]
        assert set(error) >= {"message", "type", "code"} and "zz_secret" not in reply.text
    # A prompt longer than the context.
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny", prompt="lock " * 5000, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded"


def test_concurrent_clients_all_get_complete_answers(client, local) -> None:
    prompts = ["the river lock 3 was", "keeper 5 closed the", "dawn", "lock 7"]
    want = {p: local.generate(p, max_tokens=20).text for p in prompts}
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(p: str, streaming: bool) -> None:
        try:
            if streaming:
                got[p] = "".join(c.choices[0].text for c in client.completions.create(
                    model="tiny", prompt=p, max_tokens=20, temperature=0, stream=True) if c.choices)
            else:
                got[p] = client.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0).choices[0].text
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert got == want


def test_escalation_says_the_coordinator_answered(builds: dict[str, Path], tmp_path: Path) -> None:
    """Threshold -1 makes every answer unsure; a stand-in for the coordinator's /v1/generate answers."""
    seen: list[dict] = []
    cloud = FastAPI()

    @cloud.post("/v1/generate")
    async def generate(request: Request) -> dict:
        seen.append({"auth": request.headers.get("authorization"), **(await request.json())})
        return {"text": "from the cloud", "tokens": 3, "model": "llm", "seconds": 0.01}

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(cloud, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    creds = tmp_path / "credentials.json"
    coordinator = f"http://127.0.0.1:{port}"
    creds.write_text(json.dumps({"coordinator": coordinator,
                                 "credentials": {"client_id": "c", "run_id": "r", "token": "tok-1"}}))
    proc, url = _start(["--build", str(builds["base"]), "--model-name", "tiny", "--coordinator", coordinator,
                        "--credentials", str(creds), "--threshold", "-1"], tmp_path / "serve.log")
    try:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=8)
        assert answer.choices[0].message.content == "from the cloud"
        assert answer.model_extra["cotune_source"] == "coordinator" and answer.usage.completion_tokens == 3
        streamed = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "from the cloud"
        assert all(c.model_extra["cotune_source"] == "coordinator" for c in streamed)
        assert seen and seen[0]["auth"] == "Bearer tok-1" and seen[0]["prompt"] == "hi\n"
    finally:
        _stop(proc)
        uv.should_exit = True
        thread.join(10)


def test_a_client_leaving_mid_stream_frees_the_model(client, local, server: str) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as reply:
            assert reply.status_code == 200
            first = next(reply.iter_lines())
            assert first.startswith("data: ")
        # Leaving the `with` drops the connection with the answer unfinished.
    want = local.generate("dawn", max_tokens=10).text
    got = client.completions.create(model="tiny", prompt="dawn", max_tokens=10, temperature=0, timeout=60)
    assert got.choices[0].text == want


class _FakeModel:
    backend_name = "onnxruntime"

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir


def test_chat_template_comes_from_the_build(tmp_path: Path) -> None:
    from edge_sdk.serve.chat import ChatFormatter, ChatTemplateError

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ChatFormatter.for_model(_FakeModel(tmp_path)).render(messages) == "be brief\nhi\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")}))
    formatter = ChatFormatter.for_model(_FakeModel(tmp_path))
    assert formatter.source == "tokenizer_config.json"
    assert formatter.render(messages) == "<|system|>be brief<|user|>hi<|assistant|>"
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}x")
    strict = ChatFormatter.for_model(_FakeModel(tmp_path))
    assert strict.source == "chat_template.jinja"
    with pytest.raises(ChatTemplateError, match="no system role"):
        strict.render(messages)
    # The sandbox refuses what a hostile template would reach for.
    with pytest.raises(ChatTemplateError):
        ChatFormatter("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(messages)


def test_chat_uses_the_gguf_chat_template(builds: dict[str, Path], local) -> None:
    """A GGUF carrying `tokenizer.chat_template` is rendered with it, not with the default."""
    from edge_sdk import EdgeModel
    from edge_sdk.serve.chat import ChatFormatter

    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    out = builds["root"] / "templated.gguf"
    subprocess.run([*cotune_cmd()[:1], "-m", "gguf.scripts.gguf_new_metadata", str(builds["base"]), str(out),
                    "--chat-template", template, "--force"], check=True, capture_output=True, timeout=120)
    with EdgeModel.load(out, threads=1) as templated:
        formatter = ChatFormatter.for_model(templated)
        assert formatter.source == "gguf"
        prompt = formatter.render([{"role": "user", "content": "dawn"}])
        assert prompt == "[user] dawn\n[assistant]"
        want = templated.generate(prompt, max_tokens=12).text
    proc, url = _start(["--build", str(out), "--model-name", "tiny"], builds["root"] / "templated.log")
    try:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        got = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "dawn"}],
                                          max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want
        assert want != local.generate("dawn\n", max_tokens=12).text  # the template made a difference
    finally:
        _stop(proc)


def test_credentials_must_belong_to_the_coordinator(tmp_path: Path) -> None:
    import typer

    from cotune.cli.edge_serve import read_client_token

    creds = tmp_path / "credentials.json"
    with pytest.raises(typer.BadParameter, match="no credentials file"):
        read_client_token(creds, "http://a")
    creds.write_text(json.dumps({"coordinator": "http://a/", "credentials": {"token": "t"}}))
    assert read_client_token(creds, "http://a") == "t"
    with pytest.raises(typer.BadParameter, match="another coordinator"):
        read_client_token(creds, "http://b")
    creds.write_text("[]")
    with pytest.raises(typer.BadParameter, match="not a credentials file"):
        read_client_token(creds, "http://a")


def test_serve_runs_from_a_config_file_and_the_environment(builds: dict[str, Path], tmp_path: Path) -> None:
    """Like a service: the build, model name and adapters from a TOML file, the port from the
    environment; a key the server does not know is refused with its name."""
    config = tmp_path / "serve.toml"
    config.write_text(f'build = "{builds["base"]}"\nmodel_name = "svc"\nadapters = ["{builds["lora"]}"]\n'
                      'threads = 1\nport = 1\n')
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cotune_cmd("edge", "serve", "--config", str(config)), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**child_env(), "COTUNE_SERVE_PORT": str(port)})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, what=f"edge serve (log: {log})")
        ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]]
        assert ids[0] == "svc" and any(i.startswith("svc:") for i in ids)
    finally:
        _stop(proc)
    config.write_text(f'build = "{builds["base"]}"\nmodel = "typo"\n')
    bad = subprocess.run(cotune_cmd("edge", "serve", "--config", str(config)), capture_output=True, text=True,
                         env=child_env(), timeout=60)
    assert bad.returncode != 0 and "model" in bad.stderr and "Extra inputs" in bad.stderr
