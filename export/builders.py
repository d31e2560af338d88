"""The builds themselves: merged and base GGUFs (written once, quantized per target), the GGUF
LoRA adapter, ONNX fp32/int8/int4, each measured against the reference, each carrying the chat
template the model was trained with (export.chat_files).

A `Builder` holds what builds share within one export: the loaded models, the GGUF
vocabulary, the reference figures and the intermediate files under `<staging>/.work`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from common.checkpoint import TOKENIZER_FILES
from common.digest import file_sha256
from common.dirs import link_or_copy
from export.inputs import AdapterInfo, BaseInfo
from export.parity import (
    LlamaCppRunner,
    OnnxRunner,
    ParityBounds,
    Reference,
    measure,
    reference_from,
    tokenizer_agreement,
)
from export.targets import Target

# Quantize from an f32 GGUF up to this many parameters (better rounding), from f16 above it.
_F32_SOURCE_MAX_PARAMS = 1_500_000_000

BuildOutput = tuple[dict[str, Any], dict[str, Any], list[str]]  # manifest fields, parity figures, notes


class Builder:
    """The state of one export_builds call: inputs, shared intermediates, the reference figures."""

    def __init__(self, base: BaseInfo, adapter: AdapterInfo | None, staging: Path, *, bounds: ParityBounds,
                 threads: int, int4: dict[str, Any]) -> None:
        self.base, self.adapter, self.staging = base, adapter, staging
        self.work = staging / ".work"
        self.work.mkdir()
        self.bounds, self.threads = bounds, threads
        self.int4 = int4  # WeightQuant settings of onnx:int4: block_size, accuracy_level, head_bits, symmetric
        self.models: Any = None
        self.vocab: Any = None
        self.reference: Reference | None = None
        self.merged_gguf: dict[str, Path] = {}
        self.base_gguf: dict[str, Path] = {}
        self.onnx_fp32: Path | None = None
        self.n_ctx = 256
        self.texts: list[str] = []

    # -- GGUF -------------------------------------------------------------------------------------
    def _float_source(self) -> str:
        return "f32" if self.models.merged.num_parameters() <= _F32_SOURCE_MAX_PARAMS else "f16"

    def _gguf(self, kind: str, quant: str) -> Path:
        """The merged (or unmerged base) model as a GGUF of `quant`, made once per export."""
        from export.gguf_writer import write_gguf
        from export.quantize import quantize_gguf

        cache = self.merged_gguf if kind == "merged" else self.base_gguf
        if quant in cache:
            return cache[quant]
        path = self.work / f"{kind}-{quant}.gguf"
        if quant in ("f32", "f16"):
            model = self.models.merged if kind == "merged" else self.models.base
            write_gguf(model, self.vocab, path, dtype=quant, name=f"{self.base.name} ({kind})",
                       tied_embeddings=self.models.tied_embeddings)
        else:
            quantize_gguf(self._gguf(kind, self._float_source()), path, quant, self.threads)
        cache[quant] = path
        return path

    def _gguf_figures(self, runner: LlamaCppRunner, target: Target, model_path: Path) -> dict[str, Any]:
        from export.quantize import gguf_tensor_types, kquant_fallbacks

        assert self.reference is not None
        figures = measure(runner, self.reference)
        figures.update(tokenizer_agreement(runner, self.models.tokenizer, self.texts))
        figures["tensor_types"] = gguf_tensor_types(model_path)
        if "_k" in target.quant:
            figures["kquant_fallback_tensors"] = len(kquant_fallbacks(model_path))
        return figures

    # -- chat format ------------------------------------------------------------------------------
    def _chat(self) -> tuple[Any, tuple[str, ...]]:
        """The model's chat template and the texts of its end-of-turn tokens other than EOS."""
        from common.chat import chat_template_for
        from common.ml.batching import end_token_ids

        tokenizer = self.models.tokenizer
        template = chat_template_for(tokenizer)
        ends = end_token_ids(tokenizer, template)[1:]
        return template, tuple(tokenizer.convert_ids_to_tokens(ends)) if ends else ()

    def _modelfile(self, build: Path, model_file: str, adapter_file: str | None = None) -> None:
        from export.chat_files import write_modelfile

        template, end_texts = self._chat()
        write_modelfile(build, template, model_file, adapter_file, end_texts)

    def build_gguf(self, target: Target, build: Path) -> BuildOutput:
        notes: list[str] = []
        model = build / "model.gguf"
        link_or_copy(self._gguf("merged", target.quant), model)
        self.merged_gguf[target.quant] = model
        runner = LlamaCppRunner(model, n_ctx=self.n_ctx, threads=self.threads)
        try:
            figures = self._gguf_figures(runner, target, model)
        finally:
            runner.close()
        self._modelfile(build, "model.gguf")
        if figures.get("kquant_fallback_tensors"):
            notes.append(f"{figures['kquant_fallback_tensors']} weight tensor(s) have rows that are not a multiple "
                         f"of 256, so llama.cpp stored them in other types; see parity.tensor_types")
        return {"model_file": "model.gguf"}, figures, notes

    def build_gguf_lora(self, target: Target, build: Path) -> BuildOutput:
        from export.gguf_lora import write_gguf_lora

        base_file, adapter_file = build / "base.gguf", build / "adapter.gguf"
        link_or_copy(self._gguf("base", target.quant), base_file)
        write_gguf_lora(self.models.lora, self.models.merged.config, adapter_file,
                        name=f"{self.base.name} adapter {self.adapter.sha256[:12] if self.adapter else ''}")
        merged = self._gguf("merged", target.quant)
        merged_runner = LlamaCppRunner(merged, n_ctx=self.n_ctx, threads=self.threads)
        try:
            assert self.reference is not None
            merged_ref = reference_from(merged_runner, self.reference.prompt_ids, self.reference.eval_ids,
                                        self.reference.greedy_tokens)
        finally:
            merged_runner.close()
        runner = LlamaCppRunner(base_file, lora=adapter_file, n_ctx=self.n_ctx, threads=self.threads)
        try:
            figures = self._gguf_figures(runner, target, base_file)
            lora = measure(runner, merged_ref)
        finally:
            runner.close()
        figures["lora_vs_merged"] = {k: lora[k] for k in ("max_abs_logit_diff", "rel_logit_diff", "top1_agreement",
                                                          "greedy_match", "greedy_identical",
                                                          "greedy_divergence_margins")}
        self._modelfile(build, "base.gguf", "adapter.gguf")
        fields = {"model_file": "adapter.gguf", "base_gguf": file_sha256(base_file)}
        return fields, figures, []

    # -- ONNX -------------------------------------------------------------------------------------
    def _onnx_fp32(self) -> Path:
        from export.merge import save_untied_checkpoint
        from export.onnx_export import export_onnx

        if self.onnx_fp32 is None:
            checkpoint = save_untied_checkpoint(self.models.merged, self.base.dir, self.work / "hf-untied")
            self.onnx_fp32 = export_onnx(checkpoint, self.work / "onnx-fp32")
            shutil.rmtree(checkpoint, ignore_errors=True)
        return self.onnx_fp32

    def build_onnx(self, target: Target, build: Path) -> BuildOutput:
        from export.quantize import onnx_files, quantize_onnx_weights

        source = self._onnx_fp32()
        model = build / "model.onnx"
        build.mkdir(parents=True, exist_ok=True)
        if target.quant == "fp32":
            for f in onnx_files(source):
                link_or_copy(f, build / f.name)
        else:
            quantize_onnx_weights(source, model, self.weight_quant(target))
        for name in ("config.json", "generation_config.json"):
            if (source.parent / name).is_file():
                link_or_copy(source.parent / name, build / name)
        # The base's own tokenizer files (optimum re-saves its own copy); copied, not hard-linked: a
        # build must not change when the source checkpoint is edited in place. The chat template the
        # model was trained with is added to them, and onnxruntime-genai's config is written beside.
        from export.chat_files import write_template_files
        from export.onnx_export import write_genai_config

        for name in TOKENIZER_FILES:
            if (self.base.dir / name).is_file():
                shutil.copy2(self.base.dir / name, build / name)
        write_template_files(build, self._chat()[0])
        write_genai_config(build, self.models.merged.config, self.models.tokenizer)
        runner = OnnxRunner(model, threads=self.threads)
        try:
            assert self.reference is not None
            figures = measure(runner, self.reference)
        finally:
            runner.close()
        if target.quant != "fp32":
            figures[target.quant] = dataclasses.asdict(self.weight_quant(target))
        return {"model_file": "model.onnx", "tokenizer_file": "tokenizer.json"}, figures, []

    def weight_quant(self, target: Target) -> Any:
        """onnx:int8: weight-only 8-bit blocks of 32 with float activations (dynamic int8 missed its
        parity bounds on Gemma 3 270M; benchmarks/quantization.py compares them); onnx:int4: 4-bit
        blocks as the export's int4 settings say."""
        from export.quantize import WeightQuant

        if target.quant == "int8":
            return WeightQuant(bits=8, block_size=32, head_bits=8)
        return WeightQuant(bits=4, **self.int4)

    def build(self, target: Target, build: Path) -> BuildOutput:
        maker = {"gguf": self.build_gguf, "gguf-lora": self.build_gguf_lora, "onnx": self.build_onnx}[target.format]
        return maker(target, build)
