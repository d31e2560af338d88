"""An HF checkpoint directory -> ONNX with past key values (optimum), fp32, one model.onnx."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from export.errors import ExportError


def export_onnx(checkpoint_dir: Path, out_dir: Path) -> Path:
    """optimum's text-generation-with-past export; returns the model.onnx path.

    No validation run here: export.parity measures the build against the torch model itself.
    """
    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = ("optimum", "transformers", "torch.onnx")
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(str(checkpoint_dir), output=str(out_dir), task="text-generation-with-past",
                        do_validation=False, local_files_only=True, device="cpu")
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ExportError(f"optimum could not export {checkpoint_dir.name} to ONNX: {exc}") from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    model = out_dir / "model.onnx"
    if not model.is_file():
        found = sorted(p.name for p in out_dir.iterdir())
        raise ExportError(f"optimum wrote no model.onnx into {out_dir} (found {found})")
    return model
