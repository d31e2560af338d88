"""Parity of a build against the torch model: logits, greedy continuations, top-1, perplexity.

A reference (the torch model, or another build) is run once on a fixed prompt set and on
held-out text; each build is run on the same token ids and compared. Float builds must
match tightly (logits within a relative tolerance, identical greedy continuations);
quantized builds report top-1 agreement and perplexity change, and the export fails when
they cross `ParityBounds`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from export.targets import Target

if TYPE_CHECKING:
    import numpy as np

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "def fibonacci(n):",
    "Translate to French: good morning ->",
)
DEFAULT_EVAL_TEXTS: tuple[str, ...] = (
    "The river wound slowly through the valley, past fields of wheat and the old stone mill. In the evening the "
    "farmers walked home along its banks, talking about the weather and the price of bread.",
    "A computer stores numbers in binary. Each bit is either zero or one, and eight bits make a byte. Larger "
    "numbers use several bytes, and the order in which those bytes are stored is called the endianness.",
    "Good morning! Could you tell me the way to the train station? Walk straight ahead, turn left at the bakery, "
    "and you will see it across the square, next to the post office.",
)


@dataclass(frozen=True)
class ParityBounds:
    """Limits a build must stay within; figures beyond them fail the export.

    Logit differences are relative: max |build - reference| over the prompt positions divided
    by the largest |reference logit|. Perplexity change is ppl_build / ppl_reference - 1.
    """

    max_rel_logit_diff_f32: float = 2e-3
    max_rel_logit_diff_f16: float = 1e-2
    greedy_tokens: int = 32
    min_top1_8bit: float = 0.90
    max_ppl_change_8bit: float = 0.05
    min_top1_4bit: float = 0.70
    max_ppl_change_4bit: float = 0.30
    # A GGUF LoRA adapter on its base against the merged GGUF of the same quantization.
    max_rel_logit_diff_lora: float = 1e-2
    # 1: a greedy continuation may part from the reference only where the reference's own top-2 gap is
    # below the logit error already measured (a tie within noise); 0: continuations must be identical.
    greedy_allow_ties: float = 1.0
    eval_max_tokens: int = 128
    # False: a build that crosses a bound is kept with a warning instead of failing the export
    # (for measuring speed, as the latency benchmark does; never for builds devices receive).
    enforce: bool = True

    def with_overrides(self, **values: float) -> ParityBounds:
        known = set(asdict(self))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown parity bound(s) {unknown}; known: {sorted(known)}")
        return ParityBounds(**{**asdict(self), **values})


class Runner(Protocol):
    """Something that turns token ids into next-token logits."""

    def logits(self, ids: Sequence[int]) -> np.ndarray: ...  # (len(ids), vocab) float32

    def greedy(self, ids: Sequence[int], n: int) -> list[int]: ...

    def close(self) -> None: ...


class TorchRunner:
    def __init__(self, model: Any) -> None:
        self.model = model

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([list(ids)])).logits[0].float().numpy()

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        import torch

        out: list[int] = []
        with torch.no_grad():
            result = self.model(torch.tensor([list(ids)]), use_cache=True)
            for _ in range(n):
                token = int(result.logits[0, -1].argmax())
                out.append(token)
                result = self.model(torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True)
        return out

    def close(self) -> None:
        pass


class LlamaCppRunner:
    """A GGUF in llama.cpp (optionally with a GGUF LoRA adapter), default context settings."""

    def __init__(self, path: Path, *, lora: Path | None = None, n_ctx: int = 256, threads: int = 2) -> None:
        import tempfile

        import llama_cpp

        from export.errors import ExportError
        from export.quantize import native_output_to

        kwargs: dict[str, Any] = {"lora_path": str(lora)} if lora else {}
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "llama.log"
            try:
                with native_output_to(log):
                    self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                               logits_all=True, n_threads=threads, n_threads_batch=threads,
                                               verbose=False, **kwargs)
            except (ValueError, RuntimeError) as exc:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                what = f"{path.name} with adapter {lora.name}" if lora else path.name
                raise ExportError(f"llama.cpp cannot load {what}: {exc} {tail}") from None

    def tokenize(self, text: str) -> list[int]:
        # special=True: HF matches special-token strings inside text, and so must llama.cpp.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(n):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()


class OnnxRunner:
    """An optimum text-generation-with-past model.onnx in onnxruntime, KV cache carried between steps."""

    def __init__(self, path: Path, *, threads: int = 2) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [name for name in self.inputs if name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _empty_past(self) -> dict[str, np.ndarray]:
        import numpy as np

        feeds = {}
        for name in self.past:
            shape = self.inputs[name].shape  # (batch, kv heads, past length, head dim)
            dims = [1, int(shape[1]), 0, int(shape[3])]
            dtype = np.float16 if "float16" in self.inputs[name].type else np.float32
            feeds[name] = np.zeros(dims, dtype=dtype)
        return feeds

    def _step(self, ids: Sequence[int], past: dict[str, np.ndarray], start: int) -> tuple[Any, dict[str, Any]]:
        import numpy as np

        n = len(ids)
        feeds: dict[str, Any] = {"input_ids": np.array([list(ids)], dtype=np.int64), **past}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, start + n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        if "cache_position" in self.inputs:
            feeds["cache_position"] = np.arange(start, start + n, dtype=np.int64)
        values = self.session.run(None, feeds)
        named = dict(zip(self.outputs, values, strict=True))
        new_past = {name: named[name.replace("past_key_values.", "present.")] for name in self.past}
        return named["logits"][0], new_past

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        logits, _ = self._step(ids, self._empty_past(), 0)
        return np.asarray(logits, dtype=np.float32)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        logits, past = self._step(ids, self._empty_past(), 0)
        pos = len(ids)
        out: list[int] = []
        for _ in range(n):
            token = int(logits[-1].argmax())
            out.append(token)
            logits, past = self._step([token], past, pos)
            pos += 1
        return out

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under logits[:-1] (float64 for a stable log-sum-exp)."""
    import numpy as np

    x = logits[:-1].astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    logz = (peak + np.log(np.exp(x - peak).sum(axis=-1, keepdims=True)))[:, 0]
    return logz - x[np.arange(len(ids) - 1), np.asarray(ids[1:])]


@dataclass
class Reference:
    """What the reference model produced on the prompt set and the held-out text."""

    prompt_ids: list[list[int]]
    prompt_logits: list[np.ndarray]
    greedy: list[list[int]]
    eval_ids: list[list[int]]
    eval_argmax: list[np.ndarray]
    eval_nll: list[np.ndarray]
    greedy_tokens: int
    # top-1 minus top-2 reference logit at each greedy step: how decided the reference was.
    greedy_margins: list[list[float]] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        import numpy as np

        return float(math.exp(float(np.concatenate(self.eval_nll).mean())))


def encode_texts(tokenizer: Any, prompts: Sequence[str], eval_texts: Sequence[str], *, context: int,
                 greedy_tokens: int, eval_max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids for the prompts (room left for the continuation) and the held-out texts (capped)."""
    room = max(2, context - greedy_tokens - 1)
    prompt_ids = [tokenizer(p)["input_ids"][:room] for p in prompts]
    eval_ids = [tokenizer(t)["input_ids"][: min(eval_max_tokens, context)] for t in eval_texts]
    eval_ids = [ids for ids in eval_ids if len(ids) >= 2]
    if not prompt_ids or not eval_ids:
        raise ValueError("parity needs at least one prompt and one held-out text of 2+ tokens")
    return prompt_ids, eval_ids


def reference_from(runner: Runner, prompt_ids: list[list[int]], eval_ids: list[list[int]],
                   greedy_tokens: int) -> Reference:
    import numpy as np

    prompt_logits = [runner.logits(ids) for ids in prompt_ids]
    greedy = [runner.greedy(ids, greedy_tokens) for ids in prompt_ids]
    margins = []
    for ids, cont in zip(prompt_ids, greedy, strict=True):
        steps = runner.logits(list(ids) + cont[:-1])[len(ids) - 1:]
        top2 = np.partition(steps, -2, axis=-1)[:, -2:]
        margins.append([float(m) for m in top2[:, 1] - top2[:, 0]])
    eval_argmax, eval_nll = [], []
    for ids in eval_ids:
        logits = runner.logits(ids)
        eval_argmax.append(logits[:-1].argmax(axis=-1))
        eval_nll.append(_nll(logits, ids))
    return Reference(prompt_ids, prompt_logits, greedy, eval_ids, eval_argmax, eval_nll, greedy_tokens, margins)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def measure(runner: Runner, ref: Reference) -> dict[str, Any]:
    """Figures for one build against the reference."""
    import numpy as np

    max_diff, scale, agree, total = 0.0, 0.0, 0, 0
    for ids, ref_logits in zip(ref.prompt_ids, ref.prompt_logits, strict=True):
        got = runner.logits(ids)
        max_diff = max(max_diff, float(np.abs(got - ref_logits).max()))
        scale = max(scale, float(np.abs(ref_logits).max()))
        agree += int((got.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += len(ids)
    matched, tie_margins = [], []
    for ids, ref_cont, margins in zip(ref.prompt_ids, ref.greedy, ref.greedy_margins, strict=True):
        cont = runner.greedy(ids, ref.greedy_tokens)
        same = next((i for i, (a, b) in enumerate(zip(cont, ref_cont, strict=True)) if a != b), len(ref_cont))
        matched.append(same)
        if same < len(ref_cont):
            tie_margins.append(margins[same] / scale if scale else margins[same])
    nll = []
    for ids, ref_arg in zip(ref.eval_ids, ref.eval_argmax, strict=True):
        logits = runner.logits(ids)
        agree += int((logits[:-1].argmax(-1) == ref_arg).sum())
        total += len(ids) - 1
        nll.append(_nll(logits, ids))
    ppl = float(math.exp(float(np.concatenate(nll).mean())))
    return {
        "max_abs_logit_diff": _round(max_diff),
        "rel_logit_diff": _round(max_diff / scale if scale else max_diff),
        "top1_agreement": _round(agree / total),
        "greedy_tokens": ref.greedy_tokens,
        "greedy_match": [int(m) for m in matched],
        "greedy_identical": all(m == ref.greedy_tokens for m in matched),
        # Where a continuation first differs: the reference's top-1/top-2 gap there, relative to the logit scale.
        "greedy_divergence_margins": [_round(m) for m in tie_margins],
        "ppl_reference": _round(ref.ppl),
        "ppl": _round(ppl),
        "ppl_change": _round(ppl / ref.ppl - 1.0),
        "positions": total,
    }


def _greedy_ok(figures: dict[str, Any], bounds: ParityBounds) -> bool:
    if figures["greedy_identical"]:
        return True
    return bool(bounds.greedy_allow_ties) and all(
        m <= figures["rel_logit_diff"] for m in figures["greedy_divergence_margins"])


def check_bounds(target: Target, figures: dict[str, Any], bounds: ParityBounds) -> list[str]:
    """The bounds this build crosses, as readable sentences (empty: it passes)."""
    problems: list[str] = []
    if figures.get("tokenizer_match") is False:
        problems.append(f"llama.cpp tokenizes {figures.get('tokenizer_mismatches')} sample text(s) differently "
                        "from the HF tokenizer")
    if target.is_float:
        limit = bounds.max_rel_logit_diff_f16 if target.quant == "f16" else bounds.max_rel_logit_diff_f32
        if figures["rel_logit_diff"] > limit:
            problems.append(f"relative logit difference {figures['rel_logit_diff']:.3g} > {limit:g}")
        if not _greedy_ok(figures, bounds):
            problems.append(f"greedy continuations differ (matching tokens per prompt: {figures['greedy_match']} "
                            f"of {figures['greedy_tokens']}; the reference's relative top-2 margin where they part: "
                            f"{figures['greedy_divergence_margins']})")
    else:
        top1, ppl = ((bounds.min_top1_8bit, bounds.max_ppl_change_8bit) if target.bits >= 8
                     else (bounds.min_top1_4bit, bounds.max_ppl_change_4bit))
        if figures["top1_agreement"] < top1:
            problems.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {top1:g}")
        if figures["ppl_change"] > ppl:
            problems.append(f"perplexity change {figures['ppl_change']:+.3f} > {ppl:+g}")
    lora = figures.get("lora_vs_merged")
    if lora is not None and target.is_float:
        if lora["rel_logit_diff"] > bounds.max_rel_logit_diff_lora:
            problems.append(f"the LoRA adapter on its base differs from the merged build: relative logit difference "
                            f"{lora['rel_logit_diff']:.3g} > {bounds.max_rel_logit_diff_lora:g}")
        if not _greedy_ok(lora, bounds):
            problems.append(f"the LoRA adapter on its base continues differently from the merged build "
                            f"(matching tokens per prompt: {lora['greedy_match']})")
    elif lora is not None:
        # A quantized base and a quantized merged model round different weights: compare like builds.
        top1 = bounds.min_top1_8bit if target.bits >= 8 else bounds.min_top1_4bit
        if lora["top1_agreement"] < top1:
            problems.append(f"the LoRA adapter on its base agrees with the merged build on "
                            f"{lora['top1_agreement']:.3f} of top-1 tokens < {top1:g}")
    return problems


def tokenizer_agreement(llama: LlamaCppRunner, tokenizer: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Does llama.cpp split each text into the HF tokenizer's ids?"""
    bad = [t for t in texts if llama.tokenize(t) != list(tokenizer(t)["input_ids"])]
    return {"tokenizer_match": not bad, "tokenizer_mismatches": len(bad), "tokenizer_texts": len(texts)}


TOKENIZER_SAMPLES: tuple[str, ...] = (
    "Hello world",
    "  leading spaces, double  spaces and a trailing one ",
    "tabs\tand\nnew lines\n\n",
    "I'm sure they'll say it's 3.14159 or 1e-9; won't they?",
    "Ünïcödé — émojis 🙂🚀, 中文字符, Ελληνικά, Русский",
    "def f(x):\n    return x ** 2  # comment",
    "http://example.com/path?q=1&r=2",
)
