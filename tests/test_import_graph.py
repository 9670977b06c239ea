"""The aidkd modules import each other without circles (also through imports inside functions), and each module
imports on its own in a fresh interpreter, whatever was imported before."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted(
    ".".join(p.relative_to(SRC).with_suffix("").parts[:-1] if p.name == "__init__.py"
             else p.relative_to(SRC).with_suffix("").parts)
    for p in (SRC / "aidkd").rglob("*.py"))


def _imports(module: str) -> set[str]:
    """The aidkd modules ``module`` names in any import statement (a package counts as its ``__init__``)."""
    path = SRC.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: "from .x import y" inside package p is p.x
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            # "from pkg import sub" names the submodule when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        out.update(n for n in names if n in MODULES and n != module)
    return out


def _cycles(modules: list[str]) -> list[list[str]]:
    graph = {m: _imports(m) for m in modules}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in modules:
        if m not in state:
            visit(m, [m])
    return found


@pytest.mark.parametrize("package", ["aidkd.models", "aidkd.data", "aidkd"])
def test_no_import_circles(package):
    assert _cycles([m for m in MODULES if m == package or m.startswith(package + ".")]) == []


# the rooms of docs/architecture.md and the rooms each may import ("aidkd": the package's own __init__, its version)
ALLOWED = {
    "cli": {"report", "export", "engine", "eval", "distill", "data", "models", "aidkd"},
    "report": {"engine", "eval", "data", "models", "aidkd"},
    "export": {"engine", "data", "models"},
    "engine": {"distill", "eval", "models", "data"},
    "eval": {"models", "data"},
    "distill": {"models"},
    "models": set(),
    "data": set(),
}


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else "aidkd"


def test_rooms_import_only_the_rooms_below_them():
    """Also through imports inside functions: e.g. eval importing engine (the instance analysis once did) fails."""
    upward = sorted(f"{m} -> {n}" for m in MODULES if _room(m) in ALLOWED for n in _imports(m)
                    if _room(n) != _room(m) and _room(n) not in ALLOWED[_room(m)])
    assert upward == []
    assert set(ALLOWED) | {"aidkd"} >= {_room(m) for m in MODULES}, "a new room: add it to ALLOWED and the docs"


def test_each_models_module_imports_first():
    # one interpreter (torch loads once); aidkd is dropped from sys.modules before each module, so every module is
    # imported as the first aidkd module, the order in which a hidden circle shows up as an ImportError
    mods = [m for m in MODULES if m.startswith("aidkd.models")]
    code = ("import importlib, sys, torch, torchvision\n"
            "for m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'aidkd' or k.startswith('aidkd.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        print(m, type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code, *mods], check=False, capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert (r.returncode, r.stdout) == (0, ""), r.stdout + r.stderr[-2000:]


def test_registered_families():
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    from aidkd.models import ops
    from aidkd.models.gfl import GFL

    assert {c: type(o).__name__ for c, o in ops._REGISTRY.items() if c in (RetinaNet, FCOS, FasterRCNN, GFL)} == {
        RetinaNet: "RetinaNetOps", FCOS: "FCOSOps", FasterRCNN: "FasterRCNNOps", GFL: "GFLOps"}
