"""`EdgeModel`: load an edge build and generate text with it, whichever engine runs it.

    from edge_sdk import EdgeModel

    model = EdgeModel.load("builds/gguf-q4_k_m")          # a build directory (manifest.json)
    result = model.generate("Translate: cat ->", max_tokens=16, stop=["\\n"])
    print(result.text, result.completion_tokens, result.timings.decode_tok_s)
    for chunk in model.stream("Once upon a time", max_tokens=64, temperature=0.8, top_p=0.95):
        print(chunk.text, end="", flush=True)

The manifest's `format` picks the backend: "gguf" -> llama.cpp, "onnx" -> ONNX Runtime.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from common.digest import file_sha256
from common.manifest import MANIFEST_NAME, BuildManifest
from edge_sdk.runtime.accel import GpuLayers, Providers, parse_gpu_layers, parse_providers
from edge_sdk.runtime.base import (
    AdapterError,
    Backend,
    GenerationResult,
    ModelFileError,
    UnsupportedBuildError,
)
from edge_sdk.runtime.generation import GenerationRequest, GenerationStream
from edge_sdk.runtime.sampling import SamplingParams

BACKENDS = {"gguf": "llama.cpp", "onnx": "onnxruntime"}
Verify = Literal["none", "size", "sha256"]


def read_build(source: str | Path | BuildManifest, build_dir: str | Path | None = None) -> tuple[BuildManifest, Path]:
    """(manifest, build directory) from a directory, a manifest.json path, or a manifest object."""
    if isinstance(source, BuildManifest):
        if build_dir is None:
            raise ValueError("a BuildManifest does not say where its files are; pass build_dir=... as well")
        return source, Path(build_dir)
    path = Path(source)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist", None, "pass a build directory holding manifest.json")
    if path.is_dir() and not (path / MANIFEST_NAME).is_file():
        raise ModelFileError(f"{path} has no {MANIFEST_NAME}", "every cotune edge build carries one",
                             "pass the build directory that `cotune export` (or the coordinator) produced")
    try:
        manifest = BuildManifest.read(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelFileError(f"cannot read the build manifest at {path}", str(exc),
                             "fetch the build again") from None
    return manifest, Path(build_dir) if build_dir is not None else (path if path.is_dir() else path.parent)


def check_files(manifest: BuildManifest, build_dir: Path, verify: Verify = "size") -> None:
    """Raise ModelFileError unless the model file (and every listed file) is present and intact.

    "size" compares sizes (cheap, catches truncated downloads); "sha256" hashes every file
    (catches any corruption, costs a read of the whole build); "none" checks presence only.
    """
    model_path = build_dir / manifest.model_file
    if not model_path.is_file():
        raise ModelFileError(f"the model file {model_path} is missing", f"the manifest names {manifest.model_file!r}",
                             "fetch the build again")
    if manifest.tokenizer_file and not (build_dir / manifest.tokenizer_file).is_file():
        raise ModelFileError(f"the tokenizer file {build_dir / manifest.tokenizer_file} is missing", None,
                             "fetch the build again")
    for f in manifest.files:
        path = build_dir / f.name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing from the build", None, "fetch the build again")
        if verify in ("size", "sha256") and path.stat().st_size != f.size:
            raise ModelFileError(f"{path} is {path.stat().st_size} bytes but the manifest says {f.size}",
                                 "the download was cut short or the file was changed", "fetch the build again")
        if verify == "sha256" and file_sha256(path) != f.sha256:
            raise ModelFileError(f"{path} does not match the sha256 in its manifest", "the file is corrupt",
                                 "fetch the build again")


class EdgeModel:
    """A loaded build. One generation at a time: the model holds a single KV cache, and
    starting a new generation ends a stream that is still open. Not thread-safe; give each
    thread its own EdgeModel (weights are memory-mapped and shared where the engine allows)."""

    def __init__(self, backend: Backend, manifest: BuildManifest | None, build_dir: Path | None,
                 load_seconds: float) -> None:
        self._backend = backend
        self.manifest = manifest
        self.build_dir = build_dir
        self.load_seconds = load_seconds
        self._stream: GenerationStream | None = None
        self._lock = threading.Lock()
        self._base_sha: str | None = None  # sha256 of the GGUF weights, to match adapters to their base

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        build: str | Path | BuildManifest,
        *,
        build_dir: str | Path | None = None,
        n_ctx: int | None = None,
        threads: int | None = None,
        verify: Verify = "size",
        backend: str | None = None,
        adapter: str | Path | None = None,
        verbose: bool = False,
        engine_options: dict[str, Any] | None = None,
        n_gpu_layers: GpuLayers | str = "auto",
        providers: Providers = "auto",
    ) -> EdgeModel:
        """Load a build: a directory with manifest.json, a manifest.json path, or a BuildManifest
        (with build_dir). A bare .gguf file also works, for models made outside cotune. A
        gguf-lora build that carries its base GGUF loads as base + adapter (switchable).

        n_ctx: context window in tokens (default: the build's, capped at 4096).
        threads: CPU threads (default: the cores this process may use).
        verify: "size" (default), "sha256" or "none"; see `check_files`.
        backend: insist on "llama.cpp" or "onnxruntime"; a build of the other format is refused.
        adapter: a GGUF LoRA build (or .gguf file) to load and switch on at scale 1.
        engine_options: passed to the backend: for llama.cpp n_batch, use_mmap, flash_attn
        (None = llama.cpp's choice); for ONNX Runtime prefill_chunk.
        n_gpu_layers (llama.cpp builds): auto (default: every layer on the GPU when this
        llama-cpp-python can offload, else none), all, or a count.
        providers (ONNX builds): auto (default: CUDA when this onnxruntime has it, then the CPU),
        cpu, cuda, tensorrt, or a list of execution provider names.
        Asking explicitly for a GPU this install cannot use is a GpuUnavailableError that names
        what to install; `describe()` says what was chosen.
        """
        t0 = time.perf_counter()
        # Both are checked whichever engine the build needs, so a typo never waits for another build.
        parse_gpu_layers(n_gpu_layers)
        parse_providers(providers)
        lora_build: tuple[BuildManifest, Path] | None = None
        base_sha: str | None = None
        if not isinstance(build, BuildManifest) and Path(build).suffix == ".gguf" and Path(build).is_file():
            manifest, root, model_path = None, Path(build).parent, Path(build)
            fmt = "gguf"
        else:
            manifest, root = read_build(build, build_dir)
            fmt = manifest.format
            if fmt == "gguf-lora":
                # An adapter build may carry the base GGUF it was made for: run base + adapter.
                base_file = next((f for f in manifest.files if f.sha256 == manifest.base_gguf), None)
                if base_file is None:
                    raise UnsupportedBuildError(
                        f"{root} is a LoRA adapter build without its base model",
                        f"it applies to the base GGUF {manifest.base_gguf or manifest.base_model}",
                        "load that base GGUF build and pass this one as adapter=..., or call load_adapter()",
                    )
                check_files(manifest, root, verify)
                lora_build = (manifest, root)
                model_path, fmt, base_sha = root / base_file.name, "gguf", base_file.sha256
            elif fmt not in BACKENDS:
                raise UnsupportedBuildError(f"{root}: build format {fmt!r} has no backend here",
                                            f"supported: {', '.join(BACKENDS)}", "export the model as GGUF or ONNX")
            else:
                check_files(manifest, root, verify)
                model_path = root / manifest.model_file
                base_sha = {f.name: f.sha256 for f in manifest.files}.get(manifest.model_file)
            if n_ctx is None and manifest.context_length:
                n_ctx = min(manifest.context_length, 4096)
        wanted = BACKENDS[fmt]
        if backend is not None and backend != wanted:
            raise UnsupportedBuildError(f"backend {backend!r} cannot run a {fmt} build",
                                        f"{fmt} builds run on {wanted}",
                                        f"load a build exported for {backend}, or drop backend=")
        engine: Backend
        if fmt == "gguf":
            from edge_sdk.runtime.llama_cpp_backend import LlamaCppBackend

            engine = LlamaCppBackend(model_path, n_ctx=n_ctx, threads=threads, verbose=verbose,
                                     n_gpu_layers=n_gpu_layers, **(engine_options or {}))
        else:
            from edge_sdk.runtime.onnx_backend import OnnxBackend

            assert manifest is not None
            if not manifest.tokenizer_file:
                raise ModelFileError(f"the ONNX build at {root} names no tokenizer_file",
                                     "ONNX builds carry tokenizer.json for the tokenizers library",
                                     "re-export the build with its tokenizer")
            engine = OnnxBackend(model_path, root / manifest.tokenizer_file, n_ctx=n_ctx, threads=threads,
                                 providers=providers, **(engine_options or {}))
        model = cls(engine, manifest, root, 0.0)
        model._base_sha = base_sha
        if lora_build is not None:
            model.use_adapter(model.load_adapter(lora_build[0], build_dir=lora_build[1]))
        if adapter is not None:
            model.use_adapter(model.load_adapter(adapter))
        model.load_seconds = time.perf_counter() - t0
        return model

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        *,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        track_confidence: bool = False,
    ) -> GenerationResult:
        """Complete `prompt` (text, or token ids as they go into the model).

        temperature 0 is greedy decoding; otherwise tokens are sampled after temperature,
        top_k (0 = off) and top_p (nucleus). Generation ends at an end-of-sequence token
        (unless ignore_eos), at the first stop string (cut from the text), after max_tokens,
        or when the context is full; `finish_reason` says which. track_confidence records
        each token's entropy and log-prob (costs a softmax over the vocabulary per token).
        """
        with self._lock:
            return self.stream(prompt, max_tokens, temperature, top_p, stop, top_k=top_k, seed=seed,
                               ignore_eos=ignore_eos, track_confidence=track_confidence).collect()

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        *,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        track_confidence: bool = False,
    ) -> GenerationStream:
        """Like `generate`, token by token: iterate for `Chunk`s, then read `.result`."""
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        request = GenerationRequest(
            prompt=prompt, max_tokens=max_tokens,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            stop=stops, ignore_eos=ignore_eos, track_confidence=track_confidence,
        )
        if self._stream is not None and self._stream.result is None:
            self._stream.close()  # it shares our KV cache
        self._stream = GenerationStream(self._backend, request)
        return self._stream

    def tokenize(self, text: str) -> list[int]:
        return self._backend.tokenize(text)

    # -- LoRA adapters (llama.cpp builds) ----------------------------------------------------

    def load_adapter(self, source: str | Path | BuildManifest, name: str | None = None,
                     build_dir: str | Path | None = None) -> str:
        """Load a GGUF LoRA adapter (a gguf-lora build or a .gguf file); returns its name.

        The base weights are not reloaded. The adapter stays off until `use_adapter`.
        """
        set_adapters = getattr(self._backend, "load_adapter", None)
        if set_adapters is None:
            raise AdapterError(f"the {self._backend.name} backend cannot swap LoRA adapters at run time",
                               "ONNX builds have the adapter merged at export",
                               "load the ONNX build exported with that adapter, or use a GGUF build")
        if not isinstance(source, BuildManifest) and Path(source).suffix == ".gguf" and Path(source).is_file():
            path = Path(source)
            default_name = path.stem
        else:
            manifest, root = read_build(source, build_dir)
            if manifest.format != "gguf-lora":
                raise AdapterError(f"{root} is a {manifest.format} build, not a LoRA adapter", None,
                                   "pass a gguf-lora build directory")
            check_files(manifest, root, "size")
            self._check_base(manifest)
            path = root / manifest.model_file
            default_name = f"round-{manifest.round}" if manifest.round is not None else root.name
        name = name or default_name
        self._backend.load_adapter(name, path)  # type: ignore[attr-defined]
        return name

    def _check_base(self, adapter: BuildManifest) -> None:
        """A LoRA made for other base weights would load without complaint and give garbage
        (and one applied to a build that already has it merged would count twice)."""
        mine = self._base_sha
        if adapter.base_gguf and mine and mine != adapter.base_gguf:
            raise AdapterError(
                "this LoRA adapter was made for another base model",
                f"it names base GGUF {adapter.base_gguf[:12]}..., this model is {mine[:12]}...",
                "load the base build the adapter was exported against",
            )

    def use_adapter(self, name: str | None, scale: float = 1.0) -> None:
        """Switch to adapter `name` at `scale` (None: the base model). Clears the KV cache."""
        setter = getattr(self._backend, "set_adapters", None)
        if setter is None:
            raise AdapterError(f"the {self._backend.name} backend cannot swap LoRA adapters at run time")
        setter([] if name is None else [(name, scale)])

    def unload_adapter(self, name: str) -> None:
        unload = getattr(self._backend, "unload_adapter", None)
        if unload is None:
            raise AdapterError(f"the {self._backend.name} backend has no run-time adapters")
        unload(name)

    @property
    def adapters(self) -> list[str]:
        return list(self._backend.info.extra.get("adapters", []))

    @property
    def active_adapters(self) -> list[tuple[str, float]]:
        return list(self._backend.info.extra.get("active_adapters", []))

    # -- description and lifetime -----------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def context_length(self) -> int:
        return self._backend.context_length

    @property
    def model_path(self) -> Path:
        return Path(self._backend.info.model_path)

    def describe(self) -> dict[str, Any]:
        """What is loaded and how it runs: backend, format, quantization, sizes, and the accelerator
        chosen (`gpu`; llama.cpp's `gpu_layers` of `n_layer`, ONNX Runtime's session `providers`)."""
        info = self._backend.info
        m = self.manifest
        return {
            "backend": info.name, "model_path": info.model_path, "context_length": info.context_length,
            "vocab_size": info.vocab_size, "threads": info.threads, "load_seconds": self.load_seconds,
            "format": m.format if m else "gguf",
            # Without a manifest, llama.cpp's own description names the type (e.g. "... Q4_K - Medium").
            "quantization": m.quantization if m else info.extra.get("description") or None,
            "architecture": m.architecture if m else info.extra.get("architecture"),
            "size_bytes": m.size_bytes if m else self.model_path.stat().st_size, **info.extra,
        }

    def close(self) -> None:
        if self._stream is not None and self._stream.result is None:
            self._stream.close()
        self._backend.close()

    def __enter__(self) -> EdgeModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
