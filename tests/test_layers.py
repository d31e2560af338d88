"""The floors run one way (ARCHITECTURE.md, "Layers"): every import of every module, at the top
and inside functions, is checked against the rules below.

    common                      imports no other cotune package
    edge_sdk                    common (and export, only inside a function: a device that exports)
    export                      common
    cloud                       common, export
    cotune.demo, examples       any floor below; never the CLI nor the benchmarks
    cotune.cli                  anything (the benchmarks only inside a function)
    benchmarks                  anything but the CLI; imported by nothing but the CLI, lazily
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("common", "edge_sdk", "export", "cloud", "cotune", "benchmarks", "examples")
PROJECT = {"common", "edge_sdk", "export", "cloud", "cotune", "benchmarks", "tests"}

# Top-level package -> the cotune packages its modules may import anywhere.
ALLOWED: dict[str, set[str]] = {
    "common": {"common"},
    "edge_sdk": {"common", "edge_sdk"},
    "export": {"common", "export"},
    "cloud": {"common", "export", "cloud"},
    "cotune": {"common", "edge_sdk", "export", "cloud", "cotune"},
    "examples": {"common", "edge_sdk", "export", "cloud", "cotune"},
    "benchmarks": {"common", "edge_sdk", "export", "cloud", "cotune", "benchmarks"},
}
# Allowed only inside a function, so importing the package never pulls them in.
LAZY_ALLOWED: dict[str, set[str]] = {"edge_sdk": {"export"}}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the importing module, e.g. "cloud.models"
    target: str  # what it imports, e.g. "common.checkpoint.checkpoint_files"
    lazy: bool  # inside a function

    def __str__(self) -> str:
        where = " inside a function" if self.lazy else ""
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.module} imports {self.target}{where}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of `from ... import`, relative forms included."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import statement in the file, with whether it sits inside a function."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(path, child.lineno, module, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, path.name == "__init__.py", child)
                found.extend(Import(path, child.lineno, module, f"{source}.{a.name}", lazy) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def violation(imp: Import) -> str | None:
    """Why this import breaks the layering, or None when it is allowed."""
    src, dst = imp.module.split(".")[0], imp.target.split(".")[0]
    if dst not in PROJECT:
        return None  # the standard library or a third-party package
    if _within(imp.target, "cotune.cli") and not _within(imp.module, "cotune.cli"):
        return "nothing imports the CLI (cotune.cli): it is the top floor"
    if dst == "benchmarks" and src != "benchmarks":
        if _within(imp.module, "cotune.cli") and imp.lazy:
            return None
        return "the benchmarks are imported by nothing but the CLI, and only inside a function"
    if dst == "tests":
        return "product code never imports the tests"
    if dst in ALLOWED[src] or (imp.lazy and dst in LAZY_ALLOWED.get(src, set())):
        return None
    if dst in LAZY_ALLOWED.get(src, set()):
        return f"{src} may import {dst} only inside a function"
    allowed = ", ".join(sorted(ALLOWED[src] - {src})) or "no other cotune package"
    return f"{src} may import {allowed}"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", SCANNED)
def test_imports_follow_the_layers(package: str) -> None:
    problems = [f"{imp}: {why}" for path in _files(package) for imp in imports_of(path)
                if (why := violation(imp)) is not None]
    assert not problems, "imports against the layering (ARCHITECTURE.md, \"Layers\"):\n" + "\n".join(problems)


def test_the_checker_sees_nested_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "common" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    source = pkg / "mod.py"
    source.write_text("from . import sibling\nfrom ..other import thing\n\n"
                      "def f():\n    import cloud.app\n    from cotune.cli import main\n")
    found = imports_of(source, tmp_path)
    assert [(i.target, i.lazy) for i in found] == [
        ("common.sub.sibling", False), ("common.other.thing", False), ("cloud.app", True), ("cotune.cli.main", True)]
    reasons = [violation(i) for i in found]
    assert reasons[:2] == [None, None]
    assert "common may import no other cotune package" in str(reasons[2])
    assert "nothing imports the CLI" in str(reasons[3])


def test_the_rules_allow_what_the_layers_allow() -> None:
    def check(module: str, target: str, lazy: bool = False) -> str | None:
        return violation(Import(ROOT / "x.py", 1, module, target, lazy))

    assert check("edge_sdk.worker", "export.pipeline.export_builds", lazy=True) is None
    assert "only inside a function" in str(check("edge_sdk.worker", "export.pipeline.export_builds"))
    assert check("cloud.builds", "export.pipeline.export_builds") is None
    assert "cloud may import common, export" in str(check("cloud.strategies.coplms", "edge_sdk.handlers.coplms.X"))
    assert check("cotune.cli.edge_runtime", "benchmarks.latency.run_latency", lazy=True) is None
    assert check("cotune.demo.world", "benchmarks.latency") is not None
    assert check("benchmarks.latency", "cotune.demo.tiny.build_tiny_model") is None
    assert check("export.pipeline", "numpy") is None
