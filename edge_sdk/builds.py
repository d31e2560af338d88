"""Edge builds a device makes of its own final SLM (ARCHITECTURE.md, "Methods").

Methods whose device SLM never leaves the device (Co-PLMs, CrossLM) cannot have the server
build it; the device exports its base + final adapter with `export.export_builds` when the
run ends, and reports each build's manifest (parity figures included) to the coordinator.
A device without the export extras, or whose SLM the exporter cannot take, says why and
keeps its final adapter: the run itself is never failed by a build.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.manifest import BuildManifest
from common.methods.contract import ADAPTER_FILE
from common.protocol import DeviceBuildReport, DeviceProfile, LoraSpec
from edge_sdk.handlers.base import FinalArtifacts

# Modules an export needs beyond the base install, by build format (the `export` extra).
_NEEDS = {"*": ("torch", "transformers", "peft"), "gguf": ("gguf", "llama_cpp"),
          "onnx": ("onnx", "onnxruntime", "optimum")}
BUILD_DIR = "build"


class BuildsSkipped(Exception):
    """The device cannot make the builds; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceBuild:
    """One build made here: where it is, and its manifest."""

    name: str
    path: Path
    manifest: BuildManifest

    def report(self) -> DeviceBuildReport:
        return DeviceBuildReport(name=self.name, manifest=self.manifest.model_dump(mode="json"))


def missing_modules(formats: Iterable[str]) -> list[str]:
    """The modules an export to these build formats needs that this device does not have."""
    needed = [m for key in ("*", *sorted({f.removesuffix("-lora") for f in formats})) for m in _NEEDS.get(key, ())]
    return [m for m in dict.fromkeys(needed) if importlib.util.find_spec(m) is None]


def export_final(final: FinalArtifacts, lora: LoraSpec, targets: Sequence[str], out_dir: Path, *,
                 run_id: str | None = None, round: int | None = None,  # noqa: A002 - the run's word for it
                 progress: bool = False) -> list[DeviceBuild]:
    """Export the final model (its base + adapter) to `targets` under `out_dir`/<build>.

    BuildsSkipped when the targets do not parse, the export extras are missing or the export
    fails (then nothing is written).
    """
    from export.errors import ExportError
    from export.targets import parse_targets

    try:
        formats = [t.format for t in parse_targets(list(targets))]
    except ExportError as exc:
        raise BuildsSkipped(str(exc)) from None
    missing = missing_modules(formats)
    if missing:
        raise BuildsSkipped(f"this device lacks the export extras ({', '.join(missing)}); "
                            "install them with pip install 'cotune[export]' to make edge builds here")
    from export.isolated import export_builds_isolated

    try:
        # in a child process: a native crash in an exporter must not end the device's join loop
        results = export_builds_isolated(final.model_dir, (final.adapter.read_bytes(), lora), list(targets), out_dir,
                                         run_id=run_id, round=round, progress=progress)
    except (ExportError, ImportError) as exc:
        raise BuildsSkipped(f"the export of this device's SLM failed: {exc}") from None
    return [DeviceBuild(r.path.name, r.path, r.manifest) for r in results]


def best_build(builds: Sequence[DeviceBuild], profile: DeviceProfile) -> DeviceBuild | None:
    """The build this device should run (common.selection's rules); None when none fits."""
    from common.selection import NoSuitableBuildError, choose_build

    if not builds:
        return None
    manifests = [b.manifest for b in builds]
    try:
        return builds[manifests.index(choose_build(manifests, profile))]
    except NoSuitableBuildError:
        return None


def make_device_builds(final: FinalArtifacts, lora: LoraSpec, targets: Sequence[str], out_dir: Path, *,
                       run_id: str, round: int, say: Callable[[str], None],  # noqa: A002
                       report: Callable[[DeviceBuildReport], Any], profile: DeviceProfile,
                       progress: bool = False) -> Path | None:
    """Make the builds, report each, and return the one this device should run (if any).

    A report the coordinator refuses is said and skipped: the builds are kept here either way.
    """
    try:
        builds = export_final(final, lora, targets, Path(out_dir) / BUILD_DIR, run_id=run_id, round=round,
                              progress=progress)
    except BuildsSkipped as exc:
        say(f"no edge builds made: {exc}; the final adapter is kept as is")
        return None
    for build in builds:
        try:
            report(build.report())
        except Exception as exc:  # noqa: BLE001 - a lost report must not lose the build
            say(f"edge build {build.name} made in {build.path}, but reporting it failed: {exc}")
        else:
            parity = build.manifest.parity
            say(f"edge build {build.name} made in {build.path} and reported "
                f"(top-1 agreement {parity.get('top1_agreement', float('nan')):.3f})")
    chosen = best_build(builds, profile)
    return chosen.path if chosen is not None else None


def final_model(final_dir: Path) -> tuple[FinalArtifacts, LoraSpec, dict[str, Any]]:
    """A device's final model as `EdgeWorker` left it in `final_dir`: the model, its LoRA
    settings and final.json (run id, round)."""
    final_dir = Path(final_dir)
    try:
        described = json.loads((final_dir / "final.json").read_text())
        lora = LoraSpec.model_validate(json.loads((final_dir / "adapter_info.json").read_text())["lora"])
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{final_dir} holds no finished run ({exc.filename} is missing); "
                                "export after `cotune edge join` has finished, or pass --final DIR") from None
    model_dir = Path(described["model_dir"])
    final = FinalArtifacts(model_dir=model_dir, adapter=model_dir / ADAPTER_FILE,
                           adapter_sha256=described["adapter_sha256"])
    return final, lora, described
