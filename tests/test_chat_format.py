"""Chat format end to end: records in three forms, one chat template through training, evaluation,
export (GGUF metadata, Ollama Modelfile, ONNX template files and genai_config.json) and serving.

Two tiny llamas: one whose tokenizer has no chat template (the declared default applies, the format
base models have always been tuned on) and one with a ChatML template whose turn markers are special
tokens. A LoRA adapter is trained on the first from a JSONL file mixing the three record forms, and
both are exported; the builds are then read back by llama.cpp, ONNX Runtime (ours and
onnxruntime-genai) and `cotune edge serve`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.chat import PLAIN, ChatTemplate, ChatTemplateError, chat_template_for
from common.manifest import BuildManifest
from common.ml.batching import IGNORE_INDEX, encode_record, encode_records, prompt_ids
from common.records import ChatMessage, TaskRecord, read_jsonl, write_jsonl

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LINES = [
    {"prompt": "Translate to Velish: red fox", "response": "fele rireine", "domain": "velish"},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Colour of the sky?"},
                  {"role": "assistant", "content": "blue"},
                  {"role": "user", "content": "Colour of grass?"},
                  {"role": "assistant", "content": "green"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                               {"type": "text", "text": "France?"}]},
                  {"role": "assistant", "content": "Paris"}], "domain": "geo"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "output": "hello"},
]
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the river lock 3 was"},
                {"role": "assistant", "content": "open"}, {"role": "user", "content": "keeper 5 closed the"}]


def _write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# -- records ----------------------------------------------------------------------------------------


def test_three_record_forms_become_one(tmp_path: Path) -> None:
    plain, chat, parts, alpaca, bare = read_jsonl(_write_lines(tmp_path / "mixed.jsonl", LINES))
    assert plain == TaskRecord("Translate to Velish: red fox", "fele rireine", "velish")
    assert (chat.prompt, chat.response) == ("Colour of grass?", "green")
    assert chat.context == (ChatMessage("system", "Answer in one word."), ChatMessage("user", "Colour of the sky?"),
                            ChatMessage("assistant", "blue"))
    assert (parts.prompt, parts.response, parts.domain) == ("Capital of France?", "Paris", "geo")
    assert (alpaca.prompt, alpaca.response) == ("Add the numbers.\n\n2 and 3", "5")
    assert (bare.prompt, bare.response) == ("Say hello.", "hello")
    # A conversation that ends with the user is a prompt waiting for an answer (auxiliary prompts).
    (waiting,) = read_jsonl(_write_lines(tmp_path / "aux.jsonl", [{"messages": CONVERSATION}]))
    assert (waiting.prompt, waiting.response, len(waiting.context)) == ("keeper 5 closed the", "", 3)
    # Written back, every record reads the same.
    write_jsonl(tmp_path / "again.jsonl", [plain, chat, parts, alpaca, waiting])
    assert read_jsonl(tmp_path / "again.jsonl") == [plain, chat, parts, alpaca, waiting]


@pytest.mark.parametrize(("line", "what"), [
    ('{"prompt": "p"}', 'missing "response"'),
    ('{"prompt": "p", "response": 3}', '"response" must be a string, got int'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "messages\\[0\\]: role 'tool' is not one of system, user, assistant"),
    ('{"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "the final assistant reply must follow a user turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', 'messages\\[0\\]: missing "content"'),
    ('{"instruction": "i", "output": 1}', '"output" must be a string'),
    ('{"instruction": "i", "input": ["x"], "output": "o"}', '"input" must be a string'),
    ('{"prompt": "p", "response": "r", "messages": []}', "mixes the prompt/response and messages forms"),
    ('{"question": "q", "answer": "a"}', 'no "prompt"/"response", "messages" or "instruction"/"output" keys'),
    ('{"prompt": "p", "response": "r", "domain": 1}', '"domain" must be a string'),
    ('["p", "r"]', "expected a JSON object, got list"),
])
def test_malformed_records_say_what_why_and_what_to_do(tmp_path: Path, line: str, what: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [LINES[0], line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{what}") as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert "one of three forms" in message and message.endswith("fix or remove that line.")


# -- one tokenizer, two templates -------------------------------------------------------------------


def _tokenizer(specials: tuple[str, ...] = ()) -> Any:
    from common.ml.tokenizer import train_tokenizer

    texts = [json.dumps(line) for line in LINES] * 20 + [m["content"] for m in CONVERSATION] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    if specials:
        tok.add_special_tokens(list(specials))
    return tok


def _checkpoint(root: Path, chat_template: str | None = None) -> Path:
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import save_tokenizer
    from cotune.demo.tiny import build_tiny_model

    tok = _tokenizer(("<|im_start|>", "<|im_end|>") if chat_template else ())
    tok_dir = save_tokenizer(tok, root / "tokenizer", chat_template=chat_template)
    model = build_tiny_model("llama", "tiny", vocab_size=tok.get_vocab_size(), seed=0, max_positions=256)
    return save_checkpoint(model, tok_dir, root / "hf")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from common.ml.tokenizer import load_hf_tokenizer, save_tokenizer

    return load_hf_tokenizer(save_tokenizer(_tokenizer(), tmp_path_factory.mktemp("tok")))


def test_prompt_response_records_train_as_before(hf_tokenizer: Any) -> None:
    """Without a chat template a record is `<bos> prompt "\\n" response <eos>`, loss on the response."""
    assert chat_template_for(hf_tokenizer).name == PLAIN.name
    record = TaskRecord("Translate to Velish: red fox", "fele rireine")
    example, cut = encode_record(hf_tokenizer, record, max_len=64)
    head = [1, *hf_tokenizer.encode(record.prompt + "\n", add_special_tokens=False)]
    reply = [*hf_tokenizer.encode(record.response, add_special_tokens=False), 2]
    assert example == {"input_ids": head + reply, "labels": [IGNORE_INDEX] * len(head) + reply} and not cut
    assert prompt_ids(hf_tokenizer, record.prompt) == head == prompt_ids(hf_tokenizer, record)


def test_loss_is_on_the_final_reply_only(hf_tokenizer: Any) -> None:
    record = TaskRecord("keeper 5 closed the", "gate", None,
                        tuple(ChatMessage(m["role"], m["content"]) for m in CONVERSATION[:3]))
    example, _ = encode_record(hf_tokenizer, record, max_len=128)
    assert example is not None
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert trained == [*hf_tokenizer.encode("gate", add_special_tokens=False), 2]
    # The earlier assistant turn is context: rendered (with its <eos>) but not trained.
    prompt_text = "be brief\nthe river lock 3 was\nopen<eos>keeper 5 closed the\n"
    assert example["input_ids"][: -len(trained)] == [1, *hf_tokenizer.encode(prompt_text, add_special_tokens=False)]
    assert example["input_ids"].count(2) == 2  # <eos> in the text is the eos token, not its characters


def test_truncation_is_counted_and_logged(hf_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    from common.ml.lora import attach_lora
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec
    from cotune.demo.tiny import build_tiny_model

    long = TaskRecord("p", "fele rireine " * 20)
    records = [TaskRecord("short", "fox"), long, TaskRecord("word " * 40, "x")]
    examples, counts = encode_records(hf_tokenizer, records, max_len=24)
    assert (counts.total, counts.truncated, counts.dropped) == (3, 1, 1) and len(examples) == 2
    assert counts.report() == {"truncated_records": 1, "dropped_records": 1}

    model = attach_lora(build_tiny_model("llama", "tiny", vocab_size=len(hf_tokenizer), seed=0), LoraSpec(r=2), 0)
    with caplog.at_level(logging.WARNING, logger="cotune.train"), pytest.warns(UserWarning, match="dropped 1 of 3"):
        report = train_lora(model, hf_tokenizer, records, TrainSpec(max_len=24, max_steps=1, batch_size=2), seed=0)
    assert (report["truncated_records"], report["dropped_records"], report["num_samples"]) == (1, 1, 2)
    assert any("2 of 3 records were longer than max_len=24" in r.getMessage() for r in caplog.records)
    clean = train_lora(model, hf_tokenizer, records[:1], TrainSpec(max_steps=1), seed=0)
    assert (clean["truncated_records"], clean["dropped_records"]) == (0, 0)


def test_cut_answers_are_counted_in_evaluation(hf_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    from common.ml.evaluate import evaluate
    from cotune.demo.tiny import build_tiny_model

    model = build_tiny_model("llama", "tiny", vocab_size=len(hf_tokenizer), seed=3)
    records = [TaskRecord("the river lock 3 was", "open"), TaskRecord("keeper 5 closed the", "gate")]
    with caplog.at_level(logging.WARNING, logger="cotune.eval"):
        scores = evaluate(model, hf_tokenizer, records, max_new_tokens=1)
    # An untrained model ends no answer within one token (unless it says <eos> or a newline at once).
    assert scores["n"] == 2 and scores["truncated_answers"] >= 1
    assert any("reached max_new_tokens=1" in r.getMessage() for r in caplog.records)


def test_a_template_whose_prompt_is_not_a_prefix_is_refused() -> None:
    odd = ChatTemplate(source="{% if add_generation_prompt %}A:{% endif %}{% for m in messages %}{{ m['content'] }}"
                       "{% endfor %}")
    with pytest.raises(ChatTemplateError, match="cannot be told apart"):
        odd.split([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


# -- exported builds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The template-less llama, a LoRA adapter trained on the mixed-form records, and its builds."""
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec
    from export import ParityBounds, export_builds_isolated

    root = tmp_path_factory.mktemp("chat-plain")
    hf = _checkpoint(root)
    records = read_jsonl(_write_lines(root / "train.jsonl", LINES))
    model, tok = load_checkpoint(hf)
    spec = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    peft_model = attach_lora(model, spec, seed=0)
    report = train_lora(peft_model, tok, records, TrainSpec(epochs=6.0, lr=5e-2, batch_size=5), seed=0)
    adapter = root / "adapter.safetensors"
    adapter.write_bytes(adapter_to_bytes(adapter_state(peft_model)))
    results = export_builds_isolated(hf, (adapter, spec), "gguf:f32,gguf-lora:f32,onnx:fp32", root / "builds",
                            bounds=ParityBounds(), progress=False, threads=1)
    return {"hf": hf, "tok": tok, "report": report, "root": root, **{r.target.format: r.path for r in results}}


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A llama whose tokenizer has a ChatML template with special turn markers, exported as it is."""
    from common.ml.tokenizer import load_hf_tokenizer
    from export import export_builds_isolated

    root = tmp_path_factory.mktemp("chat-chatml")
    hf = _checkpoint(root, CHATML)
    results = export_builds_isolated(hf, None, "gguf:f32,onnx:fp32", root / "builds", progress=False, threads=1)
    return {"hf": hf, "tok": load_hf_tokenizer(hf), "root": root, **{r.target.format: r.path for r in results}}


def test_training_on_the_three_forms_learns(plain: dict[str, Any]) -> None:
    report = plain["report"]
    assert report["num_samples"] == len(LINES) and report["steps"] == 6
    assert report["loss_last"] < report["loss_first"]
    assert (report["truncated_records"], report["dropped_records"]) == (0, 0)


@pytest.mark.parametrize("which", ["plain", "chatml"])
def test_gguf_carries_the_template_llama_cpp_reads_back(request: pytest.FixtureRequest, which: str) -> None:
    from edge_sdk import EdgeModel

    world = request.getfixturevalue(which)
    expected = chat_template_for(world["tok"])
    assert expected.source == (CHATML if which == "chatml" else PLAIN.source)
    for build in [world["gguf"], *([world["gguf-lora"]] if "gguf-lora" in world else [])]:
        with EdgeModel.load(build, threads=1) as model:
            assert model._backend.chat_template() == expected.source


@pytest.mark.parametrize("which", ["plain", "chatml"])
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_serving_renders_and_tokenizes_as_training(request: pytest.FixtureRequest, which: str, fmt: str) -> None:
    """The build's template, rendered by the server and tokenized by its runtime, gives the very
    tokens training put before the reply (turn markers as single special tokens)."""
    from edge_sdk import EdgeModel
    from edge_sdk.serve.chat import ChatFormatter

    world = request.getfixturevalue(which)
    tok = world["tok"]
    with EdgeModel.load(world[fmt], threads=1) as model:
        formatter = ChatFormatter.for_model(model)
        assert formatter.source == ("gguf" if fmt == "gguf" else "chat_template.jinja")
        text = formatter.render(CONVERSATION)
        assert text == chat_template_for(tok).prompt(CONVERSATION)
        assert model.tokenize(text) == prompt_ids(tok, [ChatMessage(m["role"], m["content"]) for m in CONVERSATION])
        assert formatter.stop == (("\n",) if which == "plain" else ())
    if which == "chatml":  # each turn's end marker is one token
        marker = tok.convert_tokens_to_ids("<|im_end|>")
        assert text.count("<|im_end|>") == 4 == prompt_ids(tok, CONVERSATION).count(marker)


def test_modelfiles_beside_gguf_builds(plain: dict[str, Any], chatml: dict[str, Any]) -> None:
    merged = (plain["gguf"] / "Modelfile").read_text()
    template = ('{{- range .Messages }}{{ if eq .Role "assistant" }}{{ .Content }}<eos>{{ else }}{{ .Content }}\n'
                '{{ end }}{{ end }}')
    assert merged.splitlines()[1:] == [
        "FROM ./model.gguf", "# the cotune-plain chat format cotune trained this model with",
        *f'TEMPLATE """{template}"""'.splitlines(), 'PARAMETER stop """', '"""']
    lora = (plain["gguf-lora"] / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in lora and f'TEMPLATE """{template}"""' in lora
    own = (chatml["gguf"] / "Modelfile").read_text()
    # No Go form of a model's own template: Ollama takes it from the GGUF; its end marker is a stop.
    assert "FROM ./model.gguf" in own and "\nTEMPLATE" not in own
    assert own.endswith("\nPARAMETER stop <|im_end|>\n")
    for build in (plain["gguf"], plain["gguf-lora"], chatml["gguf"]):
        assert "Modelfile" in {f.name for f in BuildManifest.read(build).files}


def test_modelfile_template_renders_like_the_jinja_template(plain: dict[str, Any], tmp_path: Path) -> None:
    """Ollama renders TEMPLATE with Go's text/template: run it there on the conversations training sees."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain to run Go's text/template")
    (tmp_path / "render.go").write_text(GO_RENDER)
    text = (plain["gguf"] / "Modelfile").read_text()
    (tmp_path / "template.txt").write_text(text.split('TEMPLATE """', 1)[1].split('"""', 1)[0])
    conversations = [CONVERSATION, CONVERSATION[:1], [{"role": "user", "content": "two\nlines"}]]
    (tmp_path / "messages.json").write_text(json.dumps(conversations))
    done = subprocess.run([go, "run", "render.go", "template.txt", "messages.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=_go_env(tmp_path))
    assert done.returncode == 0, done.stderr
    template = chat_template_for(plain["tok"])
    assert json.loads(done.stdout) == [template.prompt(c) for c in conversations]


def _go_env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {**os.environ, "GO111MODULE": "off"}  # one file, no module
    if "HOME" not in env:
        env.setdefault("GOCACHE", str(tmp_path / "gocache"))
    return env


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	source, _ := os.ReadFile(os.Args[1])
	data, _ := os.ReadFile(os.Args[2])
	var conversations [][]Message
	if err := json.Unmarshal(data, &conversations); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(string(source)))
	out := []string{}
	for _, messages := range conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.parametrize("which", ["plain", "chatml"])
def test_onnx_builds_carry_the_template_and_genai_config(request: pytest.FixtureRequest, which: str) -> None:
    world = request.getfixturevalue(which)
    build: Path = world["onnx"]
    source = chat_template_for(world["tok"]).source
    assert (build / "chat_template.jinja").read_text() == source
    assert json.loads((build / "tokenizer_config.json").read_text())["chat_template"] == source
    assert {"chat_template.jinja", "genai_config.json"} <= {f.name for f in BuildManifest.read(build).files}
    genai = json.loads((build / "genai_config.json").read_text())
    model = genai["model"]
    assert (model["type"], model["decoder"]["filename"], model["vocab_size"]) == ("llama", "model.onnx",
                                                                                   len(world["tok"]))
    ends = model["eos_token_id"]
    marker = world["tok"].convert_tokens_to_ids("<|im_end|>")
    assert ends == ([2, marker] if which == "chatml" else 2)
    assert model["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["search"]["past_present_share_buffer"] is False


@pytest.mark.parametrize("which", ["plain", "chatml"])
def test_onnxruntime_genai_runs_the_build_as_our_runtime(request: pytest.FixtureRequest, which: str) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    from edge_sdk import EdgeModel

    world = request.getfixturevalue(which)
    build = world["onnx"]
    with EdgeModel.load(build, threads=1) as ours:
        ids = ours.tokenize(chat_template_for(world["tok"]).prompt(CONVERSATION))
        want = ours.generate(ids, max_tokens=10, temperature=0.0).token_ids
    model = og.Model(str(build))
    # genai renders the build's template as we do (its tokenizer adds no <bos>, so ids come from ours).
    rendered = og.Tokenizer(model).apply_chat_template(json.dumps(CONVERSATION), add_generation_prompt=True)
    assert rendered == chat_template_for(world["tok"]).prompt(CONVERSATION)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    got: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    ends = json.loads((build / "genai_config.json").read_text())["model"]["eos_token_id"]
    ends = ends if isinstance(ends, list) else [ends]
    assert got[: len(want)] == want and all(t in ends for t in got[len(want):])


def test_chat_request_on_an_exported_build_uses_its_template(chatml: dict[str, Any]) -> None:
    """`cotune edge serve` on the ChatML build answers a chat as the model answers its ChatML prompt."""
    openai = pytest.importorskip("openai")
    from edge_sdk import EdgeModel
    from tests.test_edge_serve import _start, _stop

    template = chat_template_for(chatml["tok"])
    with EdgeModel.load(chatml["gguf"], threads=1) as local:
        want = local.generate(template.prompt(CONVERSATION), max_tokens=12).text
        plain_answer = local.generate(PLAIN.prompt(CONVERSATION), max_tokens=12).text
    proc, url = _start(["--build", str(chatml["gguf"]), "--model-name", "tiny"], chatml["root"] / "serve.log")
    try:
        import httpx

        assert httpx.get(f"{url}/healthz").json()["chat_template"] == "gguf"
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        got = api.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want
        assert want != plain_answer  # the template made a difference
    finally:
        _stop(proc)
