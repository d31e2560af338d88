"""Latency of the cotune edge runtime against the engines people would otherwise use.

For each model (the tiny llama-shaped model and Gemma 3 270M) and each build (backend x
quantization), in one run on one machine:
- cotune's EdgeModel on every GGUF and ONNX build;
- llama-cpp-python used directly (`Llama.generate`, its own sampler) on the same GGUF files;
- optimum's `ORTModelForCausalLM.generate` on the same ONNX files;
- transformers eager attention in torch (float32) on the checkpoint the builds came from.
Each measurement runs in its own subprocess, so peak RSS is that engine's alone. Metrics:
load time, time to first token, prefill tok/s (prompt tokens / ttft), decode tok/s (tokens
after the first / time between first and last), peak RSS, file size; medians over `runs`
timed runs after `warmup`, in each of `repeats` processes per measurement, run in alternating
order so that bursts of other work on a shared machine do not all land on one engine.
Every engine gets the same prompt token ids, greedy decoding, EOS ignored, the same thread
count. The machine's memory read bandwidth is measured in the same run,
and decode speed is reported as a fraction of the bound bandwidth / bytes read per token.

    python -m benchmarks.latency --model tiny --runs 3 --repeats 2     (or: cotune bench latency)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.latency_assets import Build, Log, ModelAssets, prepare_model
from benchmarks.report import Column, Panel, write_report

ENGINES = ("cotune", "llama-cpp-python", "optimum", "transformers")
DEFAULT_GGUF_QUANTS = ("q4_k_m", "q8_0", "f16")
DEFAULT_ONNX_QUANTS = ("fp32", "int8")


@dataclass
class LatencyConfig:
    models: Sequence[str] = ("tiny", "gemma")
    engines: Sequence[str] | None = None
    runs: int = 3  # per process; with repeats=2 the medians are over 6 runs
    warmup: int = 1
    # Each measurement is split over this many processes, run in alternating order (see run_latency).
    repeats: int = 2
    prompt_tokens: int = 512
    decode_tokens: int = 128
    threads: int | None = None
    gguf_quants: Sequence[str] | None = None
    onnx_quants: Sequence[str] | None = None
    formats: Sequence[str] = ("gguf", "onnx")
    out_dir: Path = Path("results/latency")
    timeout_s: float = 1800.0
    # The same attention kernels for our llama.cpp path and the raw one, so the comparison
    # measures the runtime's overhead and nothing else.
    flash_attn: bool = True


# -- what one token costs in memory traffic -----------------------------------------------------


def weight_bytes_per_token(build: Build | None, hf_dir: Path | None = None) -> int | None:
    """Bytes of weights read to generate one token: every matrix once, the input embedding
    only one row (skipped here) unless the output head reads it too (tied embeddings)."""
    try:
        if build is None and hf_dir is not None:
            return _safetensors_bytes(hf_dir)
        if build is None:
            return None
        path = build.path / build.manifest.model_file
        if build.manifest.format == "gguf":
            return _gguf_bytes(path)
        if build.manifest.format == "onnx":
            return _onnx_bytes(path)
    except Exception:  # noqa: BLE001 - an estimate; the table shows n/a without it
        return None
    return None


def _gguf_bytes(path: Path) -> int:
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"]
    return total


def _onnx_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper  # noqa: F401 - registers dtype helpers used by tensor sizes

    model = onnx.load(str(path), load_external_data=False)
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            sizes[init.name] = int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            sizes[init.name] = len(init.raw_data) if init.raw_data else 0
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in sizes:
                users.setdefault(name, set()).add(node.op_type if i == 0 else node.op_type + ":w")
    # An embedding table that only Gather reads contributes one row per token.
    gathered = {n for n, ops in users.items() if ops and all(op.startswith("Gather") and ":w" not in op for op in ops)}
    return sum(size for name, size in sizes.items() if name not in gathered)


def _safetensors_bytes(hf_dir: Path) -> int:
    from common.checkpoint import inspect_checkpoint

    total, embed, has_head = 0, 0, False
    for name, info in inspect_checkpoint(hf_dir, need_tokenizer=False).tensors.items():
        size = info.end - info.begin
        total += size
        if name.endswith("embed_tokens.weight"):
            embed = size
        if name.endswith("lm_head.weight"):
            has_head = True
    return total - embed if has_head else total


# -- measurements (each in its own process) ---------------------------------------------------


def _timing_streamer() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Notes when each new token comes out of generate(); the first put() is the prompt."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: Any) -> None:
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return TimingStreamer()


def _hf_generate_timer(model: Any, ids: list[int], decode: int, pad_id: int) -> Callable[[], dict[str, float]]:
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(input_ids)

    def once() -> dict[str, float]:
        streamer = _timing_streamer()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=decode, min_new_tokens=decode,
                           do_sample=False, streamer=streamer, pad_token_id=pad_id)
        times = streamer.times
        return {"ttft_s": times[0] - t0, "decode_s": times[-1] - times[0], "generated": len(times)}

    return once


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine on one build: load, warm up, time `runs` generations. Runs in a subprocess."""
    from edge_sdk.runtime.bench import peak_rss_bytes, summarize, time_token_stream

    engine, threads = spec["engine"], int(spec["threads"])
    ids, decode = list(spec["ids"]), int(spec["decode"])
    n_ctx = len(ids) + decode + 16
    t0 = time.perf_counter()
    once: Callable[[], dict[str, float]]
    if engine == "cotune":
        from edge_sdk.runtime import EdgeModel

        # Same attention kernels as the raw engine (see LatencyConfig.flash_attn).
        options = {"flash_attn": spec.get("flash_attn")} if spec["format"] == "gguf" else {}
        model = EdgeModel.load(spec["build_dir"], n_ctx=n_ctx, threads=threads, engine_options=options)

        def once() -> dict[str, float]:
            return time_token_stream(model.stream(ids, max_tokens=decode, ignore_eos=True), decode)

    elif engine == "llama-cpp-python":
        from llama_cpp import Llama

        llm = Llama(spec["model_path"], n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                    flash_attn=bool(spec.get("flash_attn")), verbose=False)

        def once() -> dict[str, float]:
            llm.reset()  # no reuse of the previous run's prompt from the KV cache
            return time_token_stream(llm.generate(ids, temp=0.0, reset=True), decode)

    elif engine == "optimum":
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoConfig

        torch.set_num_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        build_dir = Path(spec["build_dir"])
        kwargs: dict[str, Any] = {}
        if not (build_dir / "config.json").is_file():
            kwargs["config"] = AutoConfig.from_pretrained(spec["hf_dir"])
        model = ORTModelForCausalLM.from_pretrained(build_dir, file_name=spec["model_file"], session_options=opts,
                                                    provider="CPUExecutionProvider", **kwargs)
        once = _hf_generate_timer(model, ids, decode, int(spec.get("pad_id", 0)))
    elif engine == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        once = _hf_generate_timer(model, ids, decode, int(spec.get("pad_id", 0)))
    else:
        raise ValueError(f"unknown engine {engine}")
    load_s = time.perf_counter() - t0
    samples = []
    for i in range(int(spec["warmup"]) + int(spec["runs"])):
        sample = once()
        if i >= int(spec["warmup"]):
            samples.append(sample)
    result = summarize(samples, len(ids))
    result["load_s"] = load_s
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["torch_imported"] = "torch" in sys.modules
    return result


def bandwidth_worker(threads: int, megabytes: int = 512, repeats: int = 7) -> dict[str, Any]:
    """Memory read bandwidth: `threads` threads summing disjoint slices of a buffer far larger
    than the caches (numpy releases the GIL in reductions); best of `repeats`."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    buf = np.ones(megabytes * (1 << 20) // 8, dtype=np.int64)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return {"read_bytes_per_s": buf.nbytes / best, "buffer_bytes": buf.nbytes, "threads": threads,
            "method": f"numpy sum over int64, best of {repeats}"}


def _subprocess(args: list[str], threads: int, timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


def run_worker(spec: dict[str, Any], threads: int, timeout_s: float) -> dict[str, Any]:
    """`worker(spec)` in a fresh Python process of its own (one engine's memory and threads only)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cotune-latency-") as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        return _subprocess(["--worker", str(spec_file)], threads, timeout_s)


# -- the run -----------------------------------------------------------------------------------


def prompt_ids_for(assets: ModelAssets, n: int) -> list[int]:
    """A prompt of exactly n tokens in the model's tokenizer (its tokenizer.json, or a GGUF's own)."""
    from edge_sdk.runtime.bench import prompt_ids

    tok_file = None
    if assets.hf_dir is not None and (assets.hf_dir / "tokenizer.json").is_file():
        tok_file = assets.hf_dir / "tokenizer.json"
    for b in assets.builds:
        if tok_file is None and b.manifest.tokenizer_file:
            tok_file = b.path / b.manifest.tokenizer_file
    if tok_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        return prompt_ids(lambda text: tok.encode(text).ids, n)
    gguf = next(b for b in assets.builds if b.manifest.format == "gguf")
    from edge_sdk.runtime.llama_cpp_backend import LlamaCppBackend

    backend = LlamaCppBackend(gguf.path / gguf.manifest.model_file, n_ctx=64, threads=1)
    try:
        return prompt_ids(backend.tokenize, n)
    finally:
        backend.close()


def _pad_id(hf_dir: Path | None) -> int:
    if hf_dir is None:
        return 0
    config = json.loads((hf_dir / "config.json").read_text())
    pad = config.get("pad_token_id")
    eos = config.get("eos_token_id")
    return int(pad if pad is not None else (eos[0] if isinstance(eos, list) else eos or 0))


def plan_jobs(assets: ModelAssets, engines: Sequence[str]) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for b in assets.builds:
        fmt = b.manifest.format
        common = {"model": assets.key, "build": b.label, "format": fmt, "quant": b.manifest.quantization,
                  "build_dir": str(b.path), "model_file": b.manifest.model_file,
                  "model_path": str(b.path / b.manifest.model_file), "file_bytes": b.manifest.size_bytes,
                  "note": b.note}
        if "cotune" in engines:
            jobs.append({**common, "engine": "cotune"})
        if fmt == "gguf" and "llama-cpp-python" in engines:
            jobs.append({**common, "engine": "llama-cpp-python"})
        if fmt == "onnx" and "optimum" in engines:
            jobs.append({**common, "engine": "optimum"})
    if "transformers" in engines and assets.hf_dir is not None:
        size = sum(f.stat().st_size for f in assets.hf_dir.glob("*.safetensors"))
        jobs.append({"model": assets.key, "build": "torch-fp32", "format": "torch", "quant": "fp32",
                     "engine": "transformers", "hf_dir": str(assets.hf_dir), "file_bytes": size, "note": "eager"})
    return jobs


def run_latency(cfg: LatencyConfig, log: Log = print) -> dict[str, Path]:
    """Prepare the builds, measure every engine on them, write results/latency.{json,md,png}."""
    from edge_sdk.runtime.base import default_threads

    threads = cfg.threads or default_threads()
    engines = list(cfg.engines or ENGINES)
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    if cfg.runs < 1:
        raise ValueError("runs must be >= 1")
    notes: list[str] = []
    if cfg.repeats < 1:
        raise ValueError("repeats must be >= 1")
    if cfg.runs * cfg.repeats < 5:
        notes.append(f"only {cfg.runs * cfg.repeats} timed runs per measurement: a reduced run, not a result to quote")
    log("measuring memory read bandwidth")
    bandwidth = _subprocess(["--bandwidth", "--threads", str(threads)], threads, 300)
    rows: list[dict[str, Any]] = []
    for key in cfg.models:
        gguf_quants = list(cfg.gguf_quants or DEFAULT_GGUF_QUANTS)
        onnx_quants = list(cfg.onnx_quants or DEFAULT_ONNX_QUANTS)
        if ("cotune" not in engines and "optimum" not in engines) or "onnx" not in cfg.formats:
            onnx_quants = []
        if ("cotune" not in engines and "llama-cpp-python" not in engines) or "gguf" not in cfg.formats:
            gguf_quants = []
        assets = prepare_model(key, gguf_quants, onnx_quants, threads, log)
        notes.extend(assets.notes)
        if not assets.builds and assets.hf_dir is None:
            continue
        ids = prompt_ids_for(assets, cfg.prompt_tokens)
        pad = _pad_id(assets.hf_dir)
        bytes_cache: dict[str, int | None] = {}
        jobs = plan_jobs(assets, engines)
        measured: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(jobs))}
        failures: dict[int, str] = {}
        # Passes alternate the order of the jobs (each a fresh process), so a burst of other
        # work on a shared machine lands on different engines instead of sinking one of them.
        for p in range(cfg.repeats):
            order = list(range(len(jobs))) if p % 2 == 0 else list(reversed(range(len(jobs))))
            for i in order:
                job = jobs[i]
                spec = {**job, "ids": ids, "decode": cfg.decode_tokens, "runs": cfg.runs, "warmup": cfg.warmup,
                        "threads": threads, "hf_dir": str(assets.hf_dir) if assets.hf_dir else None,
                        "pad_id": pad, "flash_attn": cfg.flash_attn}
                log(f"{key} {job['build']} {job['engine']}: measuring (pass {p + 1}/{cfg.repeats})")
                try:
                    figures = run_worker(spec, threads, cfg.timeout_s)
                    measured[i].append(figures)
                    log(f"  ttft {figures['ttft_s'] * 1000:.0f} ms, prefill {figures['prefill_tok_s']:.0f} tok/s, "
                        f"decode {figures['decode_tok_s']:.1f} tok/s, rss {figures['peak_rss_bytes'] / 2**20:.0f} MiB")
                except Exception as exc:  # noqa: BLE001 - report the failure, keep measuring the rest
                    failures[i] = str(exc)[:300]
                    log(f"  failed: {failures[i]}")
        for i, job in enumerate(jobs):
            row = {k: job.get(k) for k in ("model", "build", "format", "quant", "engine", "file_bytes", "note")}
            row["label"] = f"{key} {job['build']} {job['engine']}"
            if measured[i]:
                row.update(_pool(measured[i], cfg.prompt_tokens))
            else:
                row["error"] = failures.get(i, "not measured")
                notes.append(f"{row['label']}: failed ({row['error']})")
            if job["build"] not in bytes_cache:
                build = next((b for b in assets.builds if b.label == job["build"]), None)
                bytes_cache[job["build"]] = weight_bytes_per_token(build, assets.hf_dir if build is None else None)
            per_token = bytes_cache[job["build"]]
            row["bytes_per_token"] = per_token
            if per_token and row.get("decode_tok_s"):
                bound = bandwidth["read_bytes_per_s"] / per_token
                row["bandwidth_bound_tok_s"] = bound
                row["bandwidth_fraction"] = row["decode_tok_s"] / bound
            rows.append(row)
    _add_ratios(rows)
    notes.extend(_target_notes(rows))
    columns = [
        Column("model", "model"), Column("build", "build"), Column("engine", "engine"),
        Column("load_s", "load s", "{:.2f}"), Column("ttft_s", "TTFT ms", lambda v: f"{v * 1000:.0f}"),
        Column("prefill_tok_s", "prefill tok/s", "{:.0f}"), Column("decode_tok_s", "decode tok/s", "{:.1f}"),
        Column("vs_raw", "decode vs raw", "{:.2f}x"),
        Column("peak_rss_bytes", "peak RSS MiB", lambda v: f"{v / 2**20:.0f}"),
        Column("file_bytes", "file MiB", lambda v: f"{v / 2**20:.1f}"),
        Column("bandwidth_fraction", "decode / BW bound", "{:.0%}"), Column("note", "note"),
    ]
    meta = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
            "threads": threads, "bandwidth": bandwidth, "engines": engines}
    notes.insert(0, f"memory read bandwidth {bandwidth['read_bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['method']}, "
                    f"{threads} threads); 'decode / BW bound' = decode tok/s / (bandwidth / weight bytes read "
                    "per token)")
    notes.insert(1, f"prompt {cfg.prompt_tokens} tokens, {cfg.decode_tokens} generated, greedy, EOS ignored, "
                    f"{threads} threads for every engine; medians of {cfg.runs} runs x {cfg.repeats} "
                    f"processes (alternating order), each after {cfg.warmup} warm-up; "
                    "'decode vs raw' compares cotune with llama-cpp-python (GGUF) or optimum (ONNX) on the same file")
    paths = write_report(cfg.out_dir, "latency", "Edge runtime latency", rows, columns,
                         panels=[Panel("decode_tok_s", "decode tok/s"), Panel("ttft_s", "time to first token (s)"),
                                 Panel("peak_rss_bytes", "peak RSS (MiB)", scale=2**20)],
                         label_key="label", color_key="engine", meta=meta, notes=notes, row_key="model")
    log(paths["md"].read_text())
    return paths


def _pool(results: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    """One engine's passes together: medians over every timed run, the worst peak RSS."""
    from edge_sdk.runtime.bench import summarize

    runs = [r for res in results for r in res["per_run"]]
    pooled = summarize(runs, prompt_tokens)
    pooled["load_s"] = statistics.median(res["load_s"] for res in results)
    pooled["peak_rss_bytes"] = max(res["peak_rss_bytes"] for res in results)
    pooled["torch_imported"] = any(res.get("torch_imported") for res in results)
    pooled["processes"] = len(results)
    return pooled


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    index = {(r["model"], r["build"], r["engine"]): r for r in rows}
    for r in rows:
        if r["engine"] != "cotune" or not r.get("decode_tok_s"):
            continue
        ref_engine = "llama-cpp-python" if r["format"] == "gguf" else "optimum"
        ref = index.get((r["model"], r["build"], ref_engine))
        if ref and ref.get("decode_tok_s"):
            r["vs_raw"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["vs_engine"] = ref_engine
            if ref.get("ttft_s"):
                r["ttft_vs_raw"] = ref["ttft_s"] / r["ttft_s"]


def _target_notes(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if "vs_raw" not in r:
            continue
        if r["format"] == "gguf":
            ok = r["vs_raw"] >= 0.97
            out.append(f"target llama.cpp within 3% of raw ({r['model']} {r['build']}): {r['vs_raw']:.3f}x -> "
                       f"{'met' if ok else 'missed'}")
        else:
            ok = r["vs_raw"] >= 1.3
            out.append(f"target ONNX >= 1.3x optimum decode ({r['model']} {r['build']}): {r['vs_raw']:.2f}x -> "
                       f"{'met' if ok else 'missed'}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", action="append", help="tiny | gemma (repeatable)")
    parser.add_argument("--engine", action="append", help=f"one of {', '.join(ENGINES)} (repeatable)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="processes per measurement, alternating order")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gguf-quant", action="append")
    parser.add_argument("--onnx-quant", action="append")
    parser.add_argument("--format", action="append", choices=["gguf", "onnx"], help="build formats (default both)")
    parser.add_argument("--out", type=Path, default=Path("results/latency"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker.read_text()))), flush=True)
        return
    if args.bandwidth:
        print(json.dumps(bandwidth_worker(args.threads or 1)), flush=True)
        return
    run_latency(LatencyConfig(
        models=args.model or ["tiny", "gemma"], engines=args.engine, runs=args.runs, warmup=args.warmup,
        repeats=args.repeats, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, threads=args.threads,
        gguf_quants=args.gguf_quant, onnx_quants=args.onnx_quant, formats=args.format or ("gguf", "onnx"),
        out_dir=args.out))


if __name__ == "__main__":
    main()
