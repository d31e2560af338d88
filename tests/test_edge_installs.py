"""Lean installs: an ONNX-only device (`cotune[edge-onnx]`) never imports llama_cpp, and a
llama.cpp-only device (`cotune[edge-llama]`) never imports onnxruntime. Each path runs in a
subprocess where the other engine (and torch) cannot be imported at all."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_runtime_onnx import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Installed first in the child: any import of a blocked top-level package raises ImportError,
# as it would on a device where that extra is not installed.
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked: not installed)")
        return None
sys.meta_path.insert(0, _Block({blocked!r}))
"""


def run_blocked(blocked: list[str], body: str) -> dict:
    """Run `body` with `blocked` packages unimportable; return the JSON it prints last."""
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from export.isolated import export_builds_isolated

    root = tmp_path_factory.mktemp("lean")
    hf = make_tiny_checkpoint(root)
    export_builds_isolated(hf, None, ["gguf:f32", "onnx:fp32"], root / "builds", progress=False, threads=2)
    return {name: root / "builds" / name for name in ("gguf-f32", "onnx-fp32")}


GENERATE = """
import json, sys
from edge_sdk import EdgeModel
with EdgeModel.load({build!r}, threads=1) as model:
    result = model.generate("the river lock", max_tokens=6)
loaded = sorted(m for m in ("llama_cpp", "onnxruntime", "torch", "transformers") if m in sys.modules)
print(json.dumps({{"tokens": result.completion_tokens, "loaded": loaded}}))
"""


def test_blocker_really_blocks() -> None:
    """The blocker must make the import fail, or the tests below prove nothing."""
    report = run_blocked(["llama_cpp"], """
        import json
        try:
            import llama_cpp  # noqa: F401
            ok = True
        except ImportError:
            ok = False
        print(json.dumps({"imported": ok}))
    """)
    assert report == {"imported": False}


def test_onnx_path_without_llama_cpp(builds: dict[str, Path]) -> None:
    report = run_blocked(["llama_cpp", "torch"], GENERATE.format(build=str(builds["onnx-fp32"])))
    assert report["tokens"] >= 1
    assert report["loaded"] == ["onnxruntime"]


def test_llama_cpp_path_without_onnxruntime(builds: dict[str, Path]) -> None:
    report = run_blocked(["onnxruntime", "torch"], GENERATE.format(build=str(builds["gguf-f32"])))
    assert report["tokens"] >= 1
    assert report["loaded"] == ["llama_cpp"]
