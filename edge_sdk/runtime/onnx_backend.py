"""ONNX Runtime backend: decoder graphs with past key values, our own generation loop.

Works with the single-file graphs optimum exports for task text-generation-with-past
(inputs input_ids, attention_mask, optional position_ids, past_key_values.N.key/value;
outputs logits, present.N.key/value). Neither torch nor transformers is imported: the
tokenizer is a `tokenizers.Tokenizer` read from tokenizer.json, and token settings come
from the build's config files.

Why this is faster than optimum's ORTModelForCausalLM.generate on the same file:
- The KV cache stays in ONNX Runtime: each step's `present` OrtValues are bound as the
  next step's `past` inputs through IO binding, never copied out to numpy (or torch).
- Logits are written by the session into a buffer allocated once, and only the last
  position's row is read; there is no per-step tensor bookkeeping in Python.
- cotune's exports have an optional `logits_to_keep` input (export/onnx_export.py): fed 1, the
  output head runs on the last position only, so a prompt costs the decoder layers and one
  row of logits, not a (prompt x vocab) matrix (0.5 GB and most of the work for a 512-token
  prompt at Gemma's 262k vocabulary). Graphs without it get the prompt in chunks of 128, so
  that matrix never exists at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.runtime.accel import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    Providers,
    parse_providers,
    resolve_providers,
)
from edge_sdk.runtime.base import (
    Backend,
    BackendInfo,
    BackendUnavailableError,
    ContextOverflowError,
    Detokenizer,
    GpuUnavailableError,
    InferenceError,
    ModelFileError,
    UnsupportedBuildError,
    default_threads,
)

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_LOGITS_TO_KEEP = "logits_to_keep"
# Prompt tokens per prefill pass when the graph can keep the last position's logits only; else
# fewer, so that a pass's (chunk x vocab) logits stay small.
_DEFAULT_PREFILL_CHUNK, _LONG_PREFILL_CHUNK = 128, 512  # prefill_chunk=None picks one
# Tokens that end a turn or a document in the families we export, when config files do
# not list them; llama.cpp treats the same ones as end-of-generation.
_END_TOKENS = ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


def _imports() -> tuple[Any, Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("cannot run an ONNX build", f"onnxruntime is not installed ({exc})",
                                      "pip install onnxruntime") from None
    try:
        import tokenizers
    except ImportError as exc:
        raise BackendUnavailableError("cannot run an ONNX build", f"the tokenizers library is not installed ({exc})",
                                      'pip install tokenizers (or pip install "cotune[edge]")') from None
    return ort, tokenizers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


class _WindowDetokenizer(Detokenizer):
    """Incremental decoding with the tokenizers library: decode a short window of ids twice
    (with and without the newest ones) and emit the difference. The window starts in the
    prompt so that decoders which strip a leading space see the text in context. Text that
    ends in an undecodable byte sequence (U+FFFD) waits for the next token; whatever is
    still waiting at the end comes out in flush(), as on the llama.cpp path."""

    _CONTEXT = 4

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-self._CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def _new_text(self) -> str:
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=True)
        return after[len(before):] if after.startswith(before) else after

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        text = self._new_text()
        self._prefix = self._read = len(self._ids)
        return text


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        tokenizer_path: str | Path,
        n_ctx: int | None = None,
        threads: int | None = None,
        prefill_chunk: int | None = None,
        eos_ids: Sequence[int] | None = None,
        providers: Providers | None = "auto",
    ) -> None:
        """providers: auto (CUDA when this onnxruntime has it, then the CPU), cpu, cuda, tensorrt,
        or a list of provider names; a GPU provider this onnxruntime lacks is a GpuUnavailableError."""
        ort, tokenizers = _imports()
        chosen = resolve_providers(providers, ort.get_available_providers(), ort.get_all_providers())
        model_path, tokenizer_path = Path(model_path), Path(tokenizer_path)
        if not model_path.is_file():
            raise ModelFileError(f"model file {model_path} does not exist", None,
                                 "check the build directory, or fetch the build again")
        if not tokenizer_path.is_file():
            raise ModelFileError(f"tokenizer file {tokenizer_path} does not exist",
                                 "an ONNX build carries its tokenizer.json", "fetch the build again")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception subclasses
            raise ModelFileError(f"{tokenizer_path} is not a readable tokenizer", str(exc).splitlines()[0],
                                 "fetch the build again") from None
        threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(model_path), opts, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"ONNX Runtime could not load {model_path}", first,
                                 "the file may be truncated or corrupt, or need a newer onnxruntime; "
                                 "fetch the build again or upgrade onnxruntime") from None
        self._providers = list(self._sess.get_providers())
        # onnxruntime drops a GPU provider it cannot start (no CUDA or cuDNN libraries) with only a
        # log line; that is fine for auto, not for a provider the caller named.
        dropped = [p for p in chosen if p != CPU_EP and p not in self._providers]
        if dropped and parse_providers(providers) != "auto":
            self._sess = None
            raise GpuUnavailableError(f"ONNX Runtime could not start {', '.join(dropped)}",
                                      f"the session runs on {', '.join(self._providers)} only; the CUDA or cuDNN "
                                      "libraries this onnxruntime-gpu needs may be missing or of another version",
                                      "install the CUDA and cuDNN versions onnxruntime-gpu's documentation lists, "
                                      "or load with providers auto or cpu")
        # On a GPU provider the KV cache stays in device memory between steps; on the CPU it is host memory.
        self._kv_device = "cuda" if self._providers and self._providers[0] in (CUDA_EP, TENSORRT_EP) else "cpu"
        self._ort = ort
        self._threads = threads
        self._path = model_path
        self._inspect_graph()
        if prefill_chunk is None:
            prefill_chunk = _LONG_PREFILL_CHUNK if self._keeps_logits else _DEFAULT_PREFILL_CHUNK
        self._prefill_chunk = max(1, prefill_chunk)
        config = {**_read_json(model_path.parent / "config.json")}
        gen_config = _read_json(model_path.parent / "generation_config.json")
        limit = int(config.get("max_position_embeddings") or 0)
        if n_ctx is None:
            n_ctx = min(limit, 4096) if limit else 2048
        elif limit and n_ctx > limit:
            raise ContextOverflowError(f"n_ctx={n_ctx} is larger than the {limit} positions this model supports",
                                       None, f"load it with n_ctx <= {limit}")
        self._n_ctx = n_ctx
        self._eos = frozenset(eos_ids) if eos_ids is not None else self._end_tokens(config, gen_config)
        # Buffers reused by every step; the attention mask is all ones, sliced to the length.
        self._mask = np.ones((1, n_ctx), dtype=np.int64)
        self._positions = np.arange(n_ctx, dtype=np.int64).reshape(1, n_ctx)
        self._step_ids = np.zeros((1, 1), dtype=np.int64)
        self._keep_one = np.array(1, dtype=np.int64)
        self._step_logits = np.empty((1, 1, self._vocab), dtype=np.float32)
        self._empty_past = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        self._io = self._sess.io_binding()
        self._past: list[Any] | None = None
        self._length = 0

    # -- graph checks ----------------------------------------------------------------------

    def _inspect_graph(self) -> None:
        inputs = {i.name: i for i in self._sess.get_inputs()}
        outputs = {o.name: o for o in self._sess.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise UnsupportedBuildError(f"{self._path} is not a causal language model graph",
                                        f"inputs {sorted(inputs)[:4]}..., outputs {sorted(outputs)[:4]}...",
                                        "export it with optimum's task text-generation-with-past")
        layers: dict[int, set[str]] = {}
        for name in inputs:
            m = _PAST.match(name)
            if m:
                layers.setdefault(int(m.group(1)), set()).add(m.group(2))
        if not layers:
            raise UnsupportedBuildError(f"{self._path} has no past_key_values inputs",
                                        "without a KV cache every token would recompute the whole sequence",
                                        "re-export with optimum's task text-generation-with-past")
        self._layers = sorted(layers)
        if any(layers[i] != {"key", "value"} for i in self._layers) or self._layers != list(range(len(layers))):
            raise UnsupportedBuildError(f"{self._path} has an unexpected KV cache layout", None,
                                        "re-export with optimum's task text-generation-with-past")
        first = inputs["past_key_values.0.key"]
        shape = first.shape
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise UnsupportedBuildError(f"{self._path}: past key shape {shape} is not (batch, heads, seq, dim)")
        self._kv_heads, self._head_dim = shape[1], shape[3]
        self._kv_dtype = _ORT_TYPES.get(first.type)
        if self._kv_dtype is None:
            raise UnsupportedBuildError(f"{self._path}: KV cache type {first.type} is not supported")
        ids_type = _ORT_TYPES.get(inputs["input_ids"].type)
        if ids_type not in (np.int64, np.int32):
            raise UnsupportedBuildError(f"{self._path}: input_ids of type {inputs['input_ids'].type}")
        self._ids_dtype = ids_type
        logits_type = outputs["logits"].type
        if logits_type != "tensor(float)":
            # A float16 graph: logits are copied out and widened, not written into our buffer.
            self._logits_fp32 = False
        else:
            self._logits_fp32 = True
        vocab = outputs["logits"].shape[-1]
        if not isinstance(vocab, int):
            raise UnsupportedBuildError(f"{self._path}: the logits' vocabulary size is not fixed in the graph")
        self._vocab = vocab
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        # cotune's exports take `logits_to_keep` (an input with a default, so listed apart from the
        # required ones): with 1, the head runs on the last position only (export/onnx_export.py).
        optional = {i.name for i in self._sess.get_overridable_initializers()}
        self._keeps_logits = _LOGITS_TO_KEEP in inputs or _LOGITS_TO_KEEP in optional
        known = {"input_ids", "attention_mask", "position_ids", _LOGITS_TO_KEEP} | {
            f"past_key_values.{i}.{kv}" for i in self._layers for kv in ("key", "value")}
        extra = sorted(set(inputs) - known)
        if extra:
            raise UnsupportedBuildError(f"{self._path} needs inputs this runtime does not provide: {extra}", None,
                                        "export with optimum's task text-generation-with-past")
        self._past_names = [f"past_key_values.{i}.{kv}" for i in self._layers for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in self._layers for kv in ("key", "value")]
        missing = [n for n in self._present_names if n not in outputs]
        if missing:
            raise UnsupportedBuildError(f"{self._path} lacks outputs {missing[:2]}...", None,
                                        "re-export with optimum's task text-generation-with-past")

    def _end_tokens(self, config: dict[str, Any], gen_config: dict[str, Any]) -> frozenset[int]:
        ids: set[int] = set()
        for source in (gen_config, config):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        for token in _END_TOKENS:
            tid = self._tok.token_to_id(token)
            if tid is not None:
                ids.add(tid)
        return frozenset(ids)

    # -- Backend interface -----------------------------------------------------------------

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, model_path=str(self._path), context_length=self._n_ctx,
                           vocab_size=self._vocab, threads=self._threads,
                           extra={"providers": list(self._providers), "gpu": self._kv_device != "cpu",
                                  "layers": len(self._layers), "kv_heads": self._kv_heads,
                                  "head_dim": self._head_dim, "kv_dtype": np.dtype(self._kv_dtype).name,
                                  "logits_kept": 1 if self._keeps_logits else None,
                                  "prefill_chunk": self._prefill_chunk})

    @property
    def eos_ids(self) -> Container[int]:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        return _WindowDetokenizer(self._tok, prompt_ids)

    def reset(self) -> None:
        self._past = None
        self._length = 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids_arr = np.asarray(ids, dtype=self._ids_dtype).reshape(1, -1)
        if self._length + ids_arr.shape[1] > self._n_ctx:
            raise ContextOverflowError(f"{self._length + ids_arr.shape[1]} tokens do not fit the context",
                                       f"it holds {self._n_ctx}", "shorten the prompt or load with a larger n_ctx")
        logits: np.ndarray | None = None
        for lo in range(0, ids_arr.shape[1], self._prefill_chunk):
            chunk = np.ascontiguousarray(ids_arr[:, lo: lo + self._prefill_chunk])
            # Each chunk writes its logits here (the last row only, where the graph can keep it alone).
            rows = 1 if self._keeps_logits else chunk.shape[1]
            out = np.empty((1, rows, self._vocab), dtype=np.float32)
            logits = self._run(chunk, out)
        assert logits is not None
        return logits

    def step(self, token_id: int) -> np.ndarray:
        if self._length + 1 > self._n_ctx:
            raise ContextOverflowError("the KV cache is full", f"the context holds {self._n_ctx} tokens",
                                       "shorten the prompt or max_tokens, or load with a larger n_ctx")
        self._step_ids[0, 0] = token_id
        return self._run(self._step_ids, self._step_logits)

    def close(self) -> None:
        self._past = None
        self._io = None
        self._sess = None

    # -- internals ---------------------------------------------------------------------------

    def _run(self, ids: np.ndarray, logits_out: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        total = self._length + n
        io = self._io
        ortvalue = self._ort.OrtValue.ortvalue_from_numpy
        io.bind_ortvalue_input("input_ids", ortvalue(ids.astype(self._ids_dtype, copy=False)))
        if self._has_mask:
            io.bind_ortvalue_input("attention_mask", ortvalue(self._mask[:, :total]))
        if self._has_positions:
            positions = np.ascontiguousarray(self._positions[:, self._length:total])
            io.bind_ortvalue_input("position_ids", ortvalue(positions))
        if self._keeps_logits:
            io.bind_ortvalue_input(_LOGITS_TO_KEEP, ortvalue(self._keep_one))
        if self._past is None:
            empty = ortvalue(self._empty_past)
            for name in self._past_names:
                io.bind_ortvalue_input(name, empty)
        else:
            for name, value in zip(self._past_names, self._past, strict=True):
                io.bind_ortvalue_input(name, value)
        io.clear_binding_outputs()
        if self._logits_fp32:
            io.bind_output("logits", "cpu", 0, np.float32, list(logits_out.shape), logits_out.ctypes.data)
        else:
            io.bind_output("logits", "cpu")
        for name in self._present_names:
            io.bind_output(name, self._kv_device)
        try:
            self._sess.run_with_iobinding(io)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InferenceError("ONNX Runtime failed to run the model", first) from None
        outputs = io.get_outputs()
        self._past = list(outputs[1:])
        self._length = total
        if self._logits_fp32:
            return logits_out[0, -1]
        return np.asarray(outputs[0].numpy()[0, -1], dtype=np.float32)
