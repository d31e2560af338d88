"""llama.cpp through llama-cpp-python's low-level bindings: GGUF models and LoRA adapters.

The high-level `llama_cpp.Llama` is not used: it loads at most one adapter (and turns mmap
off for it), keeps its own sampler chain and token bookkeeping, and allocates a logits
matrix of n_batch x vocab. Here the context is driven directly: one sequence, logits of
the last position only, sampling in `edge_sdk.runtime.sampling`. Adapters are loaded once
and switched on the context with `llama_set_adapters_lora` (ARCHITECTURE.md, "Edge runtime
and export"): the base weights stay mapped and are never reloaded; scale 0 gives the base
model's logits, 1 the merged one.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections import deque
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.runtime.accel import GpuLayers, resolve_gpu_layers
from edge_sdk.runtime.base import (
    AdapterError,
    Backend,
    BackendInfo,
    BackendUnavailableError,
    ContextOverflowError,
    Detokenizer,
    InferenceError,
    ModelFileError,
    default_threads,
)

# llama.cpp logs through one process-wide callback. We keep its recent lines so that a
# failed load can say why (llama.cpp returns NULL and explains only in its log).
_LOG_LINES: deque[str] = deque(maxlen=64)
_LOG_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"callback": None, "backend_ready": False, "verbose": False}


def _lib() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendUnavailableError(
            "cannot run a GGUF build", f"llama-cpp-python is not installed ({exc})",
            "pip install llama-cpp-python (it compiles llama.cpp; about 10 minutes on 2 cores)",
        ) from None
    if _STATE["callback"] is None:
        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", "replace")
            with _LOG_LOCK:
                _LOG_LINES.append(line)
            if _STATE["verbose"]:
                import sys

                sys.stderr.write(line)

        _STATE["callback"] = _on_log  # keep a reference: llama.cpp holds only the C pointer
        llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
    if not _STATE["backend_ready"]:
        llama_cpp.llama_backend_init()
        _STATE["backend_ready"] = True
    return llama_cpp


def _recent_errors(limit: int = 3) -> str:
    """The last log lines that look like an explanation, for error messages."""
    with _LOG_LOCK:
        lines = [ln.strip() for ln in _LOG_LINES if ln.strip()]
    flagged = [ln for ln in lines if any(w in ln.lower() for w in ("error", "failed", "invalid", "unknown", "not "))]
    chosen = (flagged or lines)[-limit:]
    return "; ".join(chosen) if chosen else "llama.cpp gave no reason"


def _clear_log() -> None:
    with _LOG_LOCK:
        _LOG_LINES.clear()


class _EndTokens:
    """llama.cpp's end-of-generation set (eos, eot, <end_of_turn>, ...), asked per token.

    The C API has no call listing them, and asking for each of 256k ids at load would cost
    a noticeable fraction of a second; the tokens actually sampled are few.
    """

    def __init__(self, lib: Any, vocab: Any) -> None:
        self._lib, self._vocab = lib, vocab
        self._known: dict[int, bool] = {}

    def __contains__(self, token: object) -> bool:
        if not isinstance(token, int):
            return False
        hit = self._known.get(token)
        if hit is None:
            hit = self._known[token] = bool(self._lib.llama_vocab_is_eog(self._vocab, token))
        return hit


class _PieceDetokenizer(Detokenizer):
    """Token pieces are bytes, and a UTF-8 character may span several tokens: text that ends
    in an undecodable sequence waits for the next token (same rule as the ONNX path)."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self._backend = backend
        self._pending = b""

    def step(self, token_id: int) -> str:
        self._pending += self._backend.token_bytes(token_id)
        text = self._pending.decode("utf-8", "replace")
        if text.endswith("\ufffd"):
            return ""
        self._pending = b""
        return text

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", "replace"), b""
        return text


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int | None = None,
        threads: int | None = None,
        n_batch: int = 512,
        use_mmap: bool = True,
        flash_attn: bool | None = None,
        verbose: bool = False,
        n_gpu_layers: GpuLayers | str = "auto",
    ) -> None:
        """n_gpu_layers: auto (every layer when this llama.cpp can offload to a GPU, else none),
        all, or a count; asking for layers on a GPU this build cannot use is a GpuUnavailableError."""
        lib = _lib()
        self._lib = lib
        _STATE["verbose"] = verbose
        path = Path(model_path)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist", None,
                                 "check the build directory, or fetch the build again")
        with path.open("rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{path} is not a GGUF file", f"it starts with {magic!r}, not b'GGUF'",
                                 "the file is corrupt or of another format; fetch the build again")
        self._model = self._ctx = None
        self._adapters: dict[str, Any] = {}
        self._active: list[tuple[str, float]] = []
        threads = threads or default_threads()

        gpu_layers = resolve_gpu_layers(n_gpu_layers, bool(lib.llama_supports_gpu_offload()))
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        if not use_mmap:
            mparams.load_mode = lib.LLAMA_LOAD_MODE_NONE
        _clear_log()
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelFileError(f"llama.cpp could not load {path}", _recent_errors(),
                                 "the file may be truncated or corrupt, or made for a newer llama.cpp; "
                                 "fetch the build again or upgrade llama-cpp-python")
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        train_ctx = int(lib.llama_model_n_ctx_train(model))
        if n_ctx is None:
            n_ctx = min(train_ctx, 4096) if train_ctx > 0 else 4096
        elif train_ctx > 0 and n_ctx > train_ctx:
            self.close()
            raise ContextOverflowError(f"n_ctx={n_ctx} is larger than the {train_ctx} tokens this model was trained on",
                                       None, f"load it with n_ctx <= {train_ctx}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = min(n_batch, n_ctx)
        cparams.n_ubatch = min(n_batch, n_ctx)
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if flash_attn is not None:  # None keeps llama.cpp's choice (auto)
            enabled, disabled = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED, lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.flash_attn_type = enabled if flash_attn else disabled
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise InferenceError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}",
                                 _recent_errors(), "try a smaller n_ctx, or free memory")
        self._ctx = ctx
        # llama.cpp rounds the context up (to 256); the caller's limit is the one we keep.
        self._n_ctx = min(n_ctx, int(lib.llama_n_ctx(ctx)))
        self._n_batch = int(lib.llama_n_batch(ctx))
        self._threads = threads
        self._one = (lib.llama_token * 1)()
        self._logits_type = ctypes.c_float * self._n_vocab
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        self._add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self._eos = _EndTokens(lib, self._vocab)
        self._path = path
        self._arch = self._meta("general.architecture") or "unknown"
        self._n_layer = int(lib.llama_model_n_layer(model))
        # llama.cpp offloads the first min(requested, layers) repeating layers (and the output layer
        # when every one fits); report the layers that run on the GPU.
        self._gpu_layers = min(gpu_layers, self._n_layer)

    # -- Backend interface -----------------------------------------------------------------

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name, model_path=str(self._path), context_length=self._n_ctx, vocab_size=self._n_vocab,
            threads=self._threads,
            extra={"architecture": self._arch, "description": self._describe(),
                   "n_params": int(self._lib.llama_model_n_params(self._model)),
                   "gpu": self._gpu_layers > 0, "gpu_layers": self._gpu_layers, "n_layer": self._n_layer,
                   "adapters": list(self._adapters), "active_adapters": list(self._active)},
        )

    @property
    def eos_ids(self) -> Container[int]:
        return self._eos

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """BOS (when the model adds one) and the text's tokens.

        `special` parses special tokens written in the text (a chat template's EOS and turn markers)
        into their single ids, as the HF tokenizer, the ONNX path and llama.cpp's own server do;
        off, such text is split like any other.
        """
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, self._add_bos, special)
        if n < 0:  # the buffer was too small; -n is the size needed
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, self._add_bos, special)
        if n < 0:
            raise InferenceError("llama.cpp could not tokenize the prompt", f"llama_tokenize returned {n}")
        return list(buf[:n])

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            n = self._lib.llama_token_to_piece(self._vocab, token_id, self._piece_buf, len(self._piece_buf), 0, False)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token_id, big, len(big), 0, False)
                piece = big.raw[:n]
            else:
                piece = self._piece_buf.raw[:n]
            self._pieces[token_id] = piece
        return piece

    def chat_template(self) -> str | None:
        """The GGUF's `tokenizer.chat_template`, if it carries one."""
        found = self._lib.llama_model_chat_template(self._model, None)
        return found.decode("utf-8", "replace") if found else None

    def special_token_texts(self) -> dict[str, str | None]:
        """The text of the BOS and EOS tokens (what a chat template writes for them)."""
        out: dict[str, str | None] = {}
        for name, getter in (("bos", self._lib.llama_vocab_bos), ("eos", self._lib.llama_vocab_eos)):
            token = int(getter(self._vocab))
            text = self._lib.llama_vocab_get_text(self._vocab, token) if 0 <= token < self._n_vocab else None
            out[name] = text.decode("utf-8", "replace") if text else None
        return out

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        # Pieces carry their own spaces (lstrip=0): no prompt context needed.
        return _PieceDetokenizer(self)

    def reset(self) -> None:
        mem = self._lib.llama_get_memory(self._ctx)
        if mem:
            self._lib.llama_memory_clear(mem, True)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        for lo in range(0, len(ids), self._n_batch):
            chunk = ids[lo: lo + self._n_batch]
            arr = (self._lib.llama_token * len(chunk))(*chunk)
            self._decode(arr, len(chunk))
        return self._last_logits()

    def step(self, token_id: int) -> np.ndarray:
        self._one[0] = token_id
        self._decode(self._one, 1)
        return self._last_logits()

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        for handle in self._adapters.values():
            lib.llama_adapter_lora_free(handle)
        self._adapters.clear()
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer
            self.close()

    # -- LoRA adapters ---------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a GGUF LoRA adapter for this base model; it is inactive until `set_adapters`."""
        path = Path(path)
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded", None,
                               "choose another name, or unload it first")
        if not path.is_file():
            raise AdapterError(f"adapter file {path} does not exist", None, "check the adapter build directory")
        _clear_log()
        handle = self._lib.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise AdapterError(f"llama.cpp could not load the LoRA adapter {path}", _recent_errors(),
                               "the adapter must be a GGUF LoRA made for this base model's architecture and shapes")
        self._adapters[name] = handle

    def unload_adapter(self, name: str) -> None:
        handle = self._adapters.pop(name, None)
        if handle is None:
            raise AdapterError(f"no adapter named {name!r} is loaded", None, f"loaded: {sorted(self._adapters)}")
        if any(n == name for n, _ in self._active):
            self.set_adapters([(n, s) for n, s in self._active if n != name])
        self._lib.llama_adapter_lora_free(handle)

    def set_adapters(self, active: Sequence[tuple[str, float]]) -> None:
        """Apply these (adapter, scale) pairs from the next token on; [] runs the base model.

        The KV cache holds keys and values computed with the previous adapters, so it is
        cleared: the next generation starts with a fresh prefill.
        """
        missing = [n for n, _ in active if n not in self._adapters]
        if missing:
            raise AdapterError(f"no adapter named {missing[0]!r} is loaded", None,
                               f"load it first; loaded: {sorted(self._adapters)}")
        n = len(active)
        handles = (self._lib.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._adapters[a] for a, _ in active])
        scales = (ctypes.c_float * max(n, 1))(*[float(s) for _, s in active])
        rc = self._lib.llama_set_adapters_lora(self._ctx, handles if n else None, n, scales if n else None)
        if rc != 0:
            raise AdapterError("llama.cpp refused the adapter set", f"llama_set_adapters_lora returned {rc}; "
                               + _recent_errors())
        self._active = [(a, float(s)) for a, s in active]
        self.reset()

    # -- internals ---------------------------------------------------------------------------

    def _decode(self, arr: Any, n: int) -> None:
        batch = self._lib.llama_batch_get_one(arr, n)
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc == 0:
            return
        if rc == 1:
            raise ContextOverflowError("the KV cache is full", f"the context holds {self._n_ctx} tokens",
                                       "shorten the prompt or max_tokens, or load with a larger n_ctx")
        raise InferenceError("llama.cpp failed to evaluate tokens", f"llama_decode returned {rc}; " + _recent_errors())

    def _last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise InferenceError("llama.cpp returned no logits", _recent_errors())
        # A view, no copy; frombuffer over a cached array type costs half of np.ctypeslib.as_array.
        return np.frombuffer(self._logits_type.from_address(ctypes.cast(ptr, ctypes.c_void_p).value),
                             dtype=np.float32)

    def _describe(self) -> str:
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n > 0 else ""

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None
