"""A device's own SLM and its private LoRA adapter, for methods whose device model never
leaves the device (Co-PLMs, CrossLM).

The base is the device's own checkpoint (`cotune edge join --slm DIR`, DeviceContext.local_slm)
or, for a device that brings none, a checkpoint the run publishes under a prefix. The
adapter is kept under the state directory after every round, tagged with the round, so a
device that restarts mid-round retrains from the previous round's adapter, never twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from common.methods.contract import ADAPTER_FILE, adapter_artifact
from common.protocol import RoundInfo
from edge_sdk.handlers.base import DeviceContext, FinalArtifacts, keep_peft_dir
from edge_sdk.paths import check_name

_ADAPTER = re.compile(r"^adapter-r(\d+)\.safetensors$")


class OwnSlm:
    def __init__(self, ctx: DeviceContext, method: str, fallback_prefix: str) -> None:
        self.ctx = ctx
        self.method = method
        self.fallback_prefix = fallback_prefix
        self._model: tuple[Any, Any] | None = None
        self._key: tuple[str, ...] | None = None
        self._initial: dict[str, Any] | None = None
        self._base_dir: Path | None = None

    def _dir(self, info: RoundInfo) -> Path:
        run_id = check_name(info.run_id, what="run id", source=self.ctx.coordinator)  # a folder name here
        return self.ctx.state_dir / self.method / run_id

    def base_dir(self, info: RoundInfo) -> Path:
        if self.ctx.local_slm is not None:
            return Path(self.ctx.local_slm)
        prefix = self.fallback_prefix
        refs = [r for r in info.artifacts if r.name.startswith(prefix + "/") and r.name != adapter_artifact(prefix)]
        if not refs:
            raise RuntimeError(f"this device brings no SLM (--slm) and the run publishes no {prefix}/ checkpoint")
        return self.ctx.cache.materialize(refs, prefix, self.ctx.state_dir / "model" / f"own-{prefix}")

    def _saved(self, info: RoundInfo) -> list[tuple[int, Path]]:
        folder = self._dir(info)
        found = [(int(m.group(1)), p) for p in folder.glob("adapter-r*.safetensors") if (m := _ADAPTER.match(p.name))]
        return sorted(found)

    def load(self, info: RoundInfo) -> tuple[Any, Any]:
        """The SLM with the adapter it had at the end of the last round before this one."""
        from common.ml.checkpoint import load_checkpoint
        from common.ml.lora import adapter_from_bytes, adapter_state, attach_lora, load_adapter_state

        base = self.base_dir(info)
        key = (str(base.resolve()), info.task.lora.model_dump_json())
        if self._key != key:
            model, tokenizer = load_checkpoint(base, device=self.ctx.device)
            peft_model = attach_lora(model, info.task.lora, seed=info.task.seed)
            self._initial = adapter_state(peft_model)
            self._model, self._key, self._base_dir = (peft_model, tokenizer), key, base
        earlier = [p for n, p in self._saved(info) if n < info.round]
        if earlier:
            tensors, _ = adapter_from_bytes(earlier[-1].read_bytes())
        else:
            tensors = self._initial
        load_adapter_state(self._model[0], tensors)
        return self._model

    def save(self, info: RoundInfo) -> Path:
        """Keep the adapter as this round's; drop all but the two latest."""
        from common.ml.lora import adapter_state, adapter_to_bytes

        assert self._model is not None, "load() first"
        folder = self._dir(info)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"adapter-r{info.round:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(adapter_to_bytes(adapter_state(self._model[0])))
        os.replace(tmp, path)
        for _, old in self._saved(info)[:-2]:
            old.unlink(missing_ok=True)
        return path

    def finish(self, info: RoundInfo, out_dir: Path) -> FinalArtifacts:
        """Lay out out_dir/slm: the base checkpoint's files and the latest private adapter."""
        from common.ml.lora import adapter_state, adapter_to_bytes

        saved = self._saved(info)
        if saved:
            data = saved[-1][1].read_bytes()
        else:  # joined but never trained: the untouched adapter (the base model itself)
            model, _ = self.load(info)
            data = adapter_to_bytes(adapter_state(model))
        base = self.base_dir(info)
        target = out_dir / "slm"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(p for p in base.iterdir() if p.is_file() and p.name != ADAPTER_FILE):
            dest = target / src.name
            dest.unlink(missing_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        adapter = target / ADAPTER_FILE
        adapter.write_bytes(data)
        (out_dir / "adapter_info.json").write_text(json.dumps(
            {"lora": info.task.lora.model_dump(), "base": str(base), "method": self.method}, indent=2))
        peft_dir = keep_peft_dir(adapter, info.task.lora, target, out_dir / "adapter")
        return FinalArtifacts(model_dir=target, adapter=adapter, adapter_sha256=hashlib.sha256(data).hexdigest(),
                              peft_dir=peft_dir)
