"""Serving latency: `cotune edge serve` against llama-cpp-python's own OpenAI server
(`python -m llama_cpp.server`) on the same GGUF, with the same settings, in one run.

Both servers run on loopback in their own process, one at a time (the machine is theirs while
measured), with the same thread count, context size, batch size and flash-attention setting.
The client streams `POST /v1/completions` (greedy, one prompt of about `prompt_tokens` tokens,
`max_tokens` = `decode_tokens`) and times, per request:
- TTFT: from sending the request to the first chunk that carries text;
- decode tok/s: tokens after the first / time from the first text chunk to the last one
  (the token count comes from the same request made without streaming, whose `usage` says it).
Medians over `runs` timed requests after `warmup`, in `rounds` server starts per server, in
alternating order, so a burst of other work on a shared machine does not land on one server.
Target (issue 12): cotune's decode tok/s >= 0.95x llama_cpp.server's and no worse TTFT.

    python -m benchmarks.serve --model gemma --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import Column, Panel, write_report
from cotune.demo.quickstart import wait_healthy

SERVERS = ("cotune edge serve", "llama_cpp.server")
PROSE = ("the river lock keeper closed the upper gate at dawn and walked down to the mill where "
         "the barges waited in a long line for the water to rise")
WORDS = PROSE.split(" ")
MODEL_ID = "bench"


@dataclass
class ServeBenchConfig:
    model: str = "gemma"  # gemma (Gemma 3 270M Q4_K_M) | tiny | a path to a .gguf file
    prompt_tokens: int = 256
    decode_tokens: int = 128
    runs: int = 5
    warmup: int = 1
    rounds: int = 2
    threads: int = 2
    n_ctx: int = 1024
    flash_attn: bool = True
    out_dir: Path = Path("results/serve")
    timeout_s: float = 600.0


def model_file(key: str, threads: int) -> Path:
    if key == "gemma":
        from export.gemma import gemma_gguf

        return gemma_gguf()
    if key == "tiny":
        from benchmarks.latency_assets import prepare_model

        assets = prepare_model("tiny", ["f16"], [], threads)
        build = assets.builds[0]
        return build.path / build.manifest.model_file
    return Path(key)


def make_prompt(path: Path, n_tokens: int) -> tuple[str, int]:
    """Plain prose of at most n_tokens tokens for this model's tokenizer."""
    from edge_sdk import EdgeModel

    with EdgeModel.load(path, n_ctx=max(512, n_tokens * 4), threads=1) as model:
        words: list[str] = []
        i = 0
        while True:
            candidate = " ".join([*words, WORDS[i % len(WORDS)]])
            if len(model.tokenize(candidate)) > n_tokens:
                break
            words.append(WORDS[i % len(WORDS)])
            i += 1
        text = " ".join(words)
        return text, len(model.tokenize(text))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(which: str, path: Path, cfg: ServeBenchConfig, log: Path) -> tuple[subprocess.Popen, str]:

    port = _free_port()
    if which == "llama_cpp.server":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", MODEL_ID,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(cfg.n_ctx), "--n_batch", "512",
               "--n_threads", str(cfg.threads), "--n_threads_batch", str(cfg.threads),
               "--flash_attn", str(cfg.flash_attn)]
    else:
        cmd = [sys.executable, "-m", "cotune.cli.main", "edge", "serve", "--build", str(path), "--model-name",
               MODEL_ID, "--host", "127.0.0.1", "--port", str(port), "--n-ctx", str(cfg.n_ctx),
               "--threads", str(cfg.threads), "--flash-attn" if cfg.flash_attn else "--no-flash-attn"]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        # llama_cpp.server has no /healthz: both servers answer /v1/models once the model is loaded.
        wait_healthy(url, proc, path="/v1/models", what=f"{which} (log: {log})")
    except RuntimeError:
        proc.terminate()
        raise
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def timed_request(url: str, prompt: str, decode: int, timeout_s: float) -> dict[str, Any]:
    import httpx

    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": decode, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    t_first = t_last = None
    pieces: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            text = choices[0].get("text") if choices else None
            if text:
                now = time.perf_counter()
                t_first = t_first or now
                t_last = now
                pieces.append(text)
    if t_first is None or t_last is None:
        raise RuntimeError("the server streamed no text")
    return {"ttft_s": t_first - t0, "stream_s": t_last - t_first, "text": "".join(pieces)}


def count_tokens(url: str, prompt: str, decode: int, timeout_s: float) -> tuple[int, str]:
    import httpx

    reply = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": prompt, "max_tokens": decode,
                                                      "temperature": 0}, timeout=timeout_s)
    reply.raise_for_status()
    data = reply.json()
    return int(data["usage"]["completion_tokens"]), data["choices"][0]["text"]


def measure(which: str, path: Path, prompt: str, cfg: ServeBenchConfig, log: Path) -> dict[str, Any]:
    proc, url = start_server(which, path, cfg, log)
    try:
        tokens, text = count_tokens(url, prompt, cfg.decode_tokens, cfg.timeout_s)
        # Every timed prompt starts differently: llama_cpp.server keeps the last prompt's KV cache
        # and would skip the prefill of a repeated one, which is not what a new user's request costs.
        variants = [f"{WORDS[i % len(WORDS)]} {i} {prompt}" for i in range(cfg.warmup + cfg.runs)]
        for text in variants[:cfg.warmup]:
            timed_request(url, text, cfg.decode_tokens, cfg.timeout_s)
        samples = [timed_request(url, text, cfg.decode_tokens, cfg.timeout_s) for text in variants[cfg.warmup:]]
    finally:
        stop_server(proc)
    return {"tokens": tokens, "text": text, "samples": samples}


def run_serve_bench(cfg: ServeBenchConfig, log: Any = print) -> dict[str, Path]:
    path = model_file(cfg.model, cfg.threads)
    prompt, n_prompt = make_prompt(path, cfg.prompt_tokens - 4)  # room for the per-request variation
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    server_log = cfg.out_dir / "servers.log"
    found: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
    texts: dict[str, str] = {}
    tokens: dict[str, int] = {}
    for r in range(cfg.rounds):
        order = SERVERS if r % 2 == 0 else tuple(reversed(SERVERS))
        for which in order:
            log(f"round {r + 1}/{cfg.rounds}: {which}")
            got = measure(which, path, prompt, cfg, server_log)
            found[which] += got["samples"]
            texts[which], tokens[which] = got["text"], got["tokens"]
    rows = []
    for which in SERVERS:
        n = tokens[which]
        ttft = statistics.median(s["ttft_s"] for s in found[which])
        rates = [(n - 1) / s["stream_s"] for s in found[which] if s["stream_s"] > 0]
        decode = statistics.median(rates) if n > 1 and rates else None
        rows.append({"label": which, "server": which, "prompt_tokens": n_prompt, "completion_tokens": n,
                     "ttft_ms": ttft * 1000, "decode_tok_s": decode, "requests": len(found[which])})
    ref = rows[1]
    for row in rows:
        row["decode_vs_llama_cpp"] = (row["decode_tok_s"] / ref["decode_tok_s"]
                                      if row["decode_tok_s"] and ref["decode_tok_s"] else None)
        row["ttft_vs_llama_cpp"] = row["ttft_ms"] / ref["ttft_ms"] if ref["ttft_ms"] else None
    ours = rows[0]
    notes = [
        f"model {path.name}; prompt {n_prompt} tokens, up to {cfg.decode_tokens} generated greedily; "
        f"{cfg.threads} threads, n_ctx {cfg.n_ctx}, n_batch 512, flash attention {'on' if cfg.flash_attn else 'off'} "
        f"on both; medians over {cfg.runs} requests x {cfg.rounds} server starts each.",
        "same text from both servers" if texts[SERVERS[0]] == texts[SERVERS[1]] else
        "the two servers' greedy texts differ (see JSON)",
        f"target decode >= 0.95x llama_cpp.server: {ours['decode_vs_llama_cpp'] or 0:.2f}x "
        f"({'met' if (ours['decode_vs_llama_cpp'] or 0) >= 0.95 else 'NOT met'}); "
        f"TTFT no worse: {ours['ttft_vs_llama_cpp'] or 0:.2f}x "
        f"({'met' if (ours['ttft_vs_llama_cpp'] or 9) <= 1.0 else 'NOT met'}).",
    ]
    columns = [Column("server", "server"), Column("prompt_tokens", "prompt tok"),
               Column("completion_tokens", "generated tok"), Column("ttft_ms", "TTFT ms", "{:.1f}"),
               Column("decode_tok_s", "decode tok/s", "{:.1f}"),
               Column("decode_vs_llama_cpp", "decode vs llama_cpp.server", "{:.2f}x"),
               Column("ttft_vs_llama_cpp", "TTFT vs llama_cpp.server", "{:.2f}x")]
    panels = [Panel("ttft_ms", "time to first token (ms, lower is better)"),
              Panel("decode_tok_s", "decode tokens/s (higher is better)")]
    return write_report(cfg.out_dir, "serve", "OpenAI-compatible serving: cotune edge serve vs llama_cpp.server",
                        rows, columns, panels, meta={"config": vars(cfg), "texts": texts}, notes=notes)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma", help="gemma | tiny | path to a .gguf")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--no-flash-attn", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/serve"))
    a = p.parse_args(argv)
    cfg = ServeBenchConfig(model=a.model, prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens, runs=a.runs,
                           warmup=a.warmup, rounds=a.rounds, threads=a.threads, n_ctx=a.n_ctx,
                           flash_attn=not a.no_flash_attn, out_dir=a.out)
    paths = run_serve_bench(cfg)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
