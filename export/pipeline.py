"""export_builds: a base checkpoint (+ adapter) -> edge builds, each in its own directory with a
manifest.json, every one measured against the torch model before it is kept.

All builds are made in a temporary directory beside `out_dir` and moved into place only when
every target has passed its parity gate, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import __version__
from common.digest import bytes_sha256, file_sha256
from common.dirs import replace_dir, staging_dir
from common.manifest import BuildManifest, build_files
from export.builders import Builder
from export.errors import ExportError, ParityError
from export.inputs import AdapterInfo, BaseInfo, inspect_adapter, inspect_base
from export.parity import (
    DEFAULT_EVAL_TEXTS,
    DEFAULT_PROMPTS,
    TOKENIZER_SAMPLES,
    ParityBounds,
    TorchRunner,
    check_bounds,
    encode_texts,
    reference_from,
)
from export.targets import Target, parse_targets


@dataclass
class BuildResult:
    target: Target
    path: Path
    manifest: BuildManifest
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _weights_digest(base: BaseInfo) -> str:
    if len(base.weight_files) == 1:
        return file_sha256(base.weight_files[0])
    return bytes_sha256("".join(file_sha256(f) for f in base.weight_files).encode())


def _publish(staging: Path, out: Path, names: list[str]) -> None:
    """Move each finished build into `out`; a build of the same name there is replaced as a whole."""
    if not out.exists():
        os.rename(staging, out)
        return
    for name in names:
        replace_dir(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, unit="step", desc="export", dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.bar.set_description(text)

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _default_threads() -> int:
    """OMP_NUM_THREADS when set (a box shared by several jobs), else the cores, at most 8.

    llama.cpp's worker threads spin while they wait: more threads than free cores slows it many-fold.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, min(8, os.cpu_count() or 1))


def _check_targets(targets: list[Target], adapter: AdapterInfo | None) -> None:
    if adapter is None and any(t.format == "gguf-lora" for t in targets):
        raise ExportError("a gguf-lora build is the adapter alone: pass --adapter (or drop gguf-lora from --to)")


def export_builds(
    base_dir: str | os.PathLike[str],
    adapter: Any,
    targets: str | Target | Iterable[str | Target],
    out_dir: str | os.PathLike[str],
    *,
    run_id: str | None = None,
    round: int | None = None,  # noqa: A002 - the coordinator's word for it
    bounds: ParityBounds | None = None,
    progress: bool = True,
    lora_spec: Any = None,
    prompts: Sequence[str] | None = None,
    eval_texts: Sequence[str] | None = None,
    threads: int | None = None,
    int4_accuracy_level: int | None = 4,
    int4_block_size: int = 32,
    int4_head_bits: int = 8,
    int4_symmetric: bool = False,
) -> list[BuildResult]:
    """Export `base_dir` (an HF checkpoint) with `adapter` merged in to every target; return the builds.

    `adapter` is None (export the checkpoint as it is), a peft adapter directory, a cotune
    adapter safetensors file (its LoraSpec from `lora_spec` or the adapter_info.json beside it),
    or a (path-or-bytes, LoraSpec) tuple. `targets` is e.g. "gguf:q4_k_m,gguf-lora,onnx:int4".
    Each build lands in `out_dir/<format>-<quant>/` with a manifest.json. Raises ExportError
    (ParityError when a build crosses `bounds`) and then leaves `out_dir` untouched.
    The int4_* settings go to export.quantize.WeightQuant for onnx:int4.
    """
    bounds = bounds or ParityBounds()
    wanted = parse_targets(targets)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; pass --out a directory")
    base = inspect_base(base_dir)
    adapter_info = inspect_adapter(adapter, base, lora_spec) if adapter is not None else None
    _check_targets(wanted, adapter_info)
    threads = threads or _default_threads()
    bar = _Progress(total=3 + 2 * len(wanted), enabled=progress)
    try:
        return _run(base, adapter_info, wanted, out, bar, run_id=run_id, round=round, bounds=bounds,
                    prompts=list(prompts or DEFAULT_PROMPTS), eval_texts=list(eval_texts or DEFAULT_EVAL_TEXTS),
                    threads=threads, int4={"block_size": int4_block_size, "accuracy_level": int4_accuracy_level,
                                           "head_bits": int4_head_bits, "symmetric": int4_symmetric})
    finally:
        bar.close()


def _run(base: BaseInfo, adapter: AdapterInfo | None, wanted: list[Target], out: Path, bar: _Progress, *,
         run_id: str | None, round: int | None, bounds: ParityBounds, prompts: list[str],  # noqa: A002
         eval_texts: list[str], threads: int, int4: dict[str, Any]) -> list[BuildResult]:
    from export.merge import prepare_models

    bar.step("load and merge")
    needs_gguf = any(t.format != "onnx" for t in wanted)
    models = prepare_models(base, adapter, keep_base=any(t.format == "gguf-lora" for t in wanted))
    vocab = None
    if needs_gguf:
        from export.gguf_tokenizer import vocab_from_tokenizer
        from export.gguf_writer import check_config

        check_config(models.merged.config)
        vocab = vocab_from_tokenizer(base.tokenizer_file, models.tokenizer, int(models.merged.config.vocab_size))
    if any(t.format == "gguf-lora" for t in wanted) and models.lora_problem:
        raise ExportError(f"this adapter cannot be a GGUF LoRA adapter: {models.lora_problem}; "
                          "export merged builds (gguf:..., onnx:...) instead")
    base_digest = _weights_digest(base)
    bar.done()

    staging = staging_dir(out)
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would follow the builds into `out`
        ex = Builder(base, adapter, staging, bounds=bounds, threads=threads, int4=int4)
        ex.models, ex.vocab = models, vocab
        bar.step("reference (torch)")
        context = int(getattr(models.merged.config, "max_position_embeddings", 2048) or 2048)
        prompt_ids, eval_ids = encode_texts(models.tokenizer, prompts, eval_texts, context=min(context, 4096),
                                            greedy_tokens=bounds.greedy_tokens, eval_max_tokens=bounds.eval_max_tokens)
        ex.reference = reference_from(TorchRunner(models.merged), prompt_ids, eval_ids, bounds.greedy_tokens)
        longest = max([len(p) + bounds.greedy_tokens + 1 for p in prompt_ids] + [len(e) for e in eval_ids])
        ex.n_ctx = min(context, 64 * (longest // 64 + 1))
        ex.texts = [*TOKENIZER_SAMPLES, *prompts, *eval_texts]
        bar.done()

        results: list[BuildResult] = []
        for target in wanted:
            started = time.monotonic()
            build = staging / target.name
            build.mkdir()
            bar.step(f"build {target}")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fields, figures, notes = ex.build(target, build)
            notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
            bar.done()
            bar.step(f"check {target}")
            problems = check_bounds(target, figures, bounds)
            if problems and not bounds.enforce:
                notes.append(f"kept although it crosses its parity bounds: {'; '.join(problems)}")
            elif problems:
                raise ParityError(f"{target} failed its parity check: {'; '.join(problems)}. Nothing was written; "
                                  "loosen the bounds only if these figures are acceptable", figures,
                                  passed={str(r.target): r.manifest.parity for r in results})
            for note in notes:
                warnings.warn(f"{target}: {note}", stacklevel=3)
            manifest = BuildManifest(
                format=target.format, quantization=target.quant, architecture=base.arch,
                base_model=base_digest, adapter_sha256=adapter.sha256 if adapter else None, run_id=run_id,
                round=round, context_length=context, files=build_files(build), parity=figures,
                cotune_version=__version__, **fields)
            manifest.write(build)
            results.append(BuildResult(target=target, path=out / target.name, manifest=manifest,
                                       seconds=round_seconds(time.monotonic() - started), warnings=notes))
            bar.done()
        bar.step("publish")
        shutil.rmtree(ex.work, ignore_errors=True)
        _publish(staging, out, [t.name for t in wanted])
        bar.done()
        return results
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def round_seconds(seconds: float) -> float:
    return float(f"{seconds:.3g}")
