"""Timing one build on this device: load, time to first token, prefill and decode speed.

`cotune edge bench` uses this; `benchmarks/latency.py` times every engine (ours and the raw
ones) with the same definitions, each in its own process:
- ttft: from the call to the first generated token (prefill of the whole prompt included);
- prefill tok/s: prompt tokens / ttft;
- decode tok/s: tokens after the first / time from the first token to the last.
Medians over `runs` timed runs after `warmup` untimed ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

FILLER = (
    "The committee met on a grey morning to review the harvest figures, the state of the river "
    "locks and the accounts of the northern mill. Each report was read aloud, questioned and noted. "
)


def prompt_ids(tokenize: Callable[[str], list[int]], n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of ordinary text, starting as the tokenizer starts a prompt (e.g. <bos>)."""
    text = FILLER
    ids = tokenize(text)
    while len(ids) < n_tokens:
        text += text
        ids = tokenize(text)
    return ids[:n_tokens]


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's VmHWM belongs to the current address space, which exec replaces; ru_maxrss
    instead carries over the peak of the process that spawned us (with vfork, the parent's
    whole footprint), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_token_stream(tokens: Iterable[Any], n_expected: int) -> dict[str, float]:
    """Consume a stream of generated tokens; the stream must be created just before the call."""
    t0 = time.perf_counter()
    t_first = t_last = None
    count = 0
    for _ in tokens:
        now = time.perf_counter()
        count += 1
        if t_first is None:
            t_first = now
        t_last = now
        if count >= n_expected:
            break
    if t_first is None or t_last is None:
        raise RuntimeError("the engine generated no tokens")
    return {"ttft_s": t_first - t0, "decode_s": t_last - t_first, "generated": count}


def summarize(runs: Sequence[dict[str, float]], prompt_tokens: int) -> dict[str, Any]:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    decode = [(r["generated"] - 1) / r["decode_s"] for r in runs if r["decode_s"] > 0]
    return {
        "runs": len(runs),
        "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft if ttft > 0 else 0.0,
        "decode_tok_s": statistics.median(decode) if decode else 0.0,
        "decode_tok_s_min": min(decode) if decode else 0.0,
        "decode_tok_s_max": max(decode) if decode else 0.0,
        "generated": int(statistics.median(r["generated"] for r in runs)),
        "per_run": list(runs),
    }


def bench_model(model: Any, prompt_tokens: int = 512, decode_tokens: int = 128, runs: int = 5,
                warmup: int = 1) -> dict[str, Any]:
    """Time an EdgeModel on a prompt of exactly prompt_tokens tokens, decoding decode_tokens."""
    if prompt_tokens + decode_tokens > model.context_length:
        raise ValueError(f"prompt {prompt_tokens} + decode {decode_tokens} tokens exceed the context "
                         f"({model.context_length}); load with a larger n_ctx or shorten them")
    ids = prompt_ids(model.tokenize, prompt_tokens)
    timed: list[dict[str, float]] = []
    for i in range(warmup + runs):
        stream = model.stream(ids, max_tokens=decode_tokens, ignore_eos=True)
        sample = time_token_stream(stream, decode_tokens)
        if i >= warmup:
            timed.append(sample)
    return {"load_s": model.load_seconds, "prompt_tokens": prompt_tokens, **summarize(timed, prompt_tokens)}
