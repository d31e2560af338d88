"""What this device is: CPU architecture, cores, memory, accelerators, runtimes installed."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

from common.protocol import DeviceProfile


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _accelerator() -> str | None:
    # Cheap probes only: importing torch just to ask would cost seconds on a Pi.
    if Path("/etc/nv_tegra_release").exists():
        return "jetson"
    if Path("/dev/nvidia0").exists():
        return "cuda"
    return None


def _backends() -> list[str]:
    names = {"llama_cpp": "llama.cpp", "onnxruntime": "onnxruntime", "torch": "torch"}
    return [label for module, label in names.items() if importlib.util.find_spec(module) is not None]


def detect_profile() -> DeviceProfile:
    return DeviceProfile(
        arch=platform.machine() or "unknown",
        os=platform.system().lower() or "unknown",
        cores=os.cpu_count() or 1,
        ram_bytes=_ram_bytes(),
        accelerator=_accelerator(),
        backends=_backends(),
    )
