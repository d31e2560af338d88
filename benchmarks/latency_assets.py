"""What the latency benchmark measures: each model's checkpoint and its edge builds, all made
by export/ (the builds users get) once, and cached under $COTUNE_CACHE/bench.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.cache import cache_root
from common.manifest import MANIFEST_NAME, BuildManifest

# Bump when the way a cached asset is made changes, so stale caches are not reused.
ASSET_VERSION = "2"  # 2: ONNX builds take logits_to_keep
GEMMA_BASE = "gemma-3-270m (q4_k_m GGUF)"
GEMMA_CONTEXT = 32768

Log = Callable[[str], None]


@dataclass
class Build:
    manifest: BuildManifest
    path: Path
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.manifest.format}-{self.manifest.quantization}"


@dataclass
class ModelAssets:
    key: str
    hf_dir: Path | None
    builds: list[Build] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tiny_checkpoint() -> Path:
    """A tiny llama-shaped model (random weights, 4 layers, hidden 192) with its own tokenizer."""
    out = cache_root() / "bench" / f"tiny-v{ASSET_VERSION}" / "hf"
    if (out / "model.safetensors").is_file():
        return out
    from common.ml.checkpoint import save_checkpoint
    from common.ml.tokenizer import train_tokenizer
    from cotune.demo.synthetic import all_text, make_suite
    from cotune.demo.tiny import build_tiny_model
    from edge_sdk.runtime.bench import FILLER

    texts = [*all_text(make_suite(num_clients=2, seed=0)), *FILLER.split(". ")]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model = build_tiny_model("llama", "base", vocab_size=tokenizer.get_vocab_size(), seed=0, max_positions=2048)
    return save_checkpoint(model, tokenizer, out)


def _checkpoint(key: str, log: Log) -> Path:
    if key == "tiny":
        return tiny_checkpoint()
    if key == "gemma":
        from export.gemma import gemma_checkpoint

        log("Gemma 3 270M checkpoint from export.gemma (converted once, then cached)")
        return gemma_checkpoint()
    raise ValueError(f"unknown model {key!r}; choose tiny or gemma")


def _gemma_gguf_build(build_dir: Path, quant: str, *, requantize: bool, threads: int | None) -> None:
    from export.gemma import gemma_gguf
    from export.prebuilt import gguf_build

    gguf_build(gemma_gguf(), build_dir, quantization=quant, architecture="gemma3", base_model=GEMMA_BASE,
               context_length=GEMMA_CONTEXT, requantize=requantize, threads=threads)


def _make_build(assets: ModelAssets, fmt: str, quant: str, root: Path, threads: int | None, log: Log) -> None:
    from export.parity import ParityBounds
    from export.pipeline import export_builds

    key = assets.key
    if key == "gemma" and fmt == "gguf" and quant == "q4_k_m":
        log("gemma gguf-q4_k_m: the packaged GGUF itself")
        _gemma_gguf_build(root / f"{fmt}-{quant}", quant, requantize=False, threads=threads)
        return
    log(f"making {key} {fmt}-{quant} with export.pipeline")
    try:
        # Measured but not gated: a build past its parity bounds is still timed, with a note.
        export_builds(assets.hf_dir, None, [f"{fmt}:{quant}"], root, progress=False, threads=threads,
                      bounds=ParityBounds(enforce=False))
    except Exception as exc:
        if not (key == "gemma" and fmt == "gguf"):
            raise
        log(f"  export.pipeline failed ({str(exc)[:200]}); requantizing the packaged q4_k_m instead")
        assets.notes.append(f"{key} {fmt}-{quant}: export.pipeline failed ({str(exc)[:160]}), "
                            "requantized from the packaged q4_k_m")
        _gemma_gguf_build(root / f"{fmt}-{quant}", quant, requantize=True, threads=threads)


def _read_build(key: str, build_dir: Path, notes: list[str]) -> Build:
    """The build, with a note where it is not a gated export of the checkpoint."""
    from export.parity import ParityBounds, check_bounds
    from export.targets import Target

    build = Build(BuildManifest.read(build_dir), build_dir)
    m = build.manifest
    if not m.parity:  # not exported from the checkpoint here: a published GGUF, as is or requantized
        if m.format == "gguf":
            build.note = "packaged GGUF" if m.quantization == "q4_k_m" else "requantized from q4_k_m"
        return build
    problems = check_bounds(Target(m.format, m.quantization), m.parity, ParityBounds())
    if problems:
        notes.append(f"{key} {build.label}: past the exporter's parity bounds ({'; '.join(problems)}), "
                     "timed all the same")
    return build


def prepare_model(key: str, gguf_quants: Sequence[str], onnx_quants: Sequence[str], threads: int | None,
                  log: Log = print) -> ModelAssets:
    """The model's checkpoint and builds, made once and cached under $COTUNE_CACHE/bench.

    Builds come from export.pipeline.export_builds, as users get them. Gemma's gguf-q4_k_m is
    the packaged file itself (the real model, as published), and its other GGUFs are requantized
    from that file where the exporter cannot make them from the dequantized checkpoint.
    """
    assets = ModelAssets(key, _checkpoint(key, log))
    root = cache_root() / "bench" / f"{key}-v{ASSET_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    wanted = [("gguf", q) for q in gguf_quants] + [("onnx", q) for q in onnx_quants]
    for fmt, quant in wanted:
        build_dir = root / f"{fmt}-{quant}"
        try:
            if not (build_dir / MANIFEST_NAME).is_file():
                _make_build(assets, fmt, quant, root, threads, log)
            assets.builds.append(_read_build(key, build_dir, assets.notes))
        except Exception as exc:  # noqa: BLE001 - one missing build must not sink the others
            assets.notes.append(f"{key} {fmt}-{quant}: not built ({str(exc)[:200]})")
            log(f"skipping {key} {fmt}-{quant}: {exc}")
    return assets
