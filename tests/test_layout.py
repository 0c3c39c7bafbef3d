"""The package's layout: imports point one way, sit at module top, and the core needs little.

The import graph is read from the source (every ``import`` statement, those under
``TYPE_CHECKING`` and inside functions included), so a cycle that only a lazy import
hides still fails here.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spdelta"
#: Optional dependencies a function may import where it needs them (``transformers``:
#: spdelta.hf and spdelta.serve work on any module and use it when it is installed).
OPTIONAL = {"torchao", "peft", "matplotlib", "transformers"}
#: The layers above the library: nothing below them imports them.
TOP = ("spdelta.recipes", "spdelta.cli", "spdelta.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    """The modules an import statement names (``from p import m`` names ``p.m`` if a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + is_package]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix
            for a in node.names]


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports() -> list[tuple[str, str, bool]]:
    """``(importer, imported, inside a function)`` for every import statement in spdelta."""
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        functions = [f for f in ast.walk(tree)
                     if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in functions for n in ast.walk(f)
                 if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node, path.name == "__init__.py"):
                    out.append((module, target, id(node) in inner))
    return out


IMPORTS = _imports()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for importer, imported, _ in IMPORTS:
        known = _known(imported) if imported.startswith("spdelta") else None
        if known is not None and known != importer:
            graph[importer].add(known)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_library_never_imports_the_recipes_or_the_command_line() -> None:
    upward = sorted({(a, b) for a, b, _ in IMPORTS
                     if not a.startswith(TOP) and b.startswith(TOP)})
    assert upward == []


def _allowed_inside(importer: str, imported: str) -> bool:
    """Optional dependencies, and a CLI subcommand's implementation loaded when it runs."""
    if imported.split(".")[0] in OPTIONAL:
        return True
    return importer.startswith("spdelta.cli") and imported.startswith(
        ("spdelta.cli", "spdelta.recipes", "spdelta.serve", "transformers"))


def test_imports_sit_at_module_top() -> None:
    inside = sorted({(a, b) for a, b, f in IMPORTS if f and not _allowed_inside(a, b)})
    assert inside == []


def _requirements(name: str) -> list[str]:
    """Names of the distributions ``name`` requires unconditionally (no extras)."""
    out = []
    for req in md.requires(name) or []:
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        if ";" in req and not _marker_holds(req.split(";", 1)[1]):
            continue
        out.append(re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0])
    return out


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker  # installed with pip/setuptools
    except ImportError:  # without packaging: keep the requirement (hides less)
        return True
    return Marker(marker.strip()).evaluate()


def _top_level(dist: md.Distribution) -> set[str]:
    names = set((dist.read_text("top_level.txt") or "").split())
    for f in dist.files or []:
        first = f.parts[0]
        if first.endswith((".dist-info", ".egg-info", ".pth")) or first in ("..", "bin"):
            continue
        names.add(first.removesuffix(".py").split(".")[0])
    return {n for n in names if n.isidentifier()}


def _hidden() -> list[str]:
    """Top-level modules of every installed distribution outside torch + safetensors + numpy."""
    keep, todo = {"spdelta"}, ["torch", "safetensors", "numpy"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in keep:
            continue
        keep.add(name)
        try:
            todo.extend(_requirements(name))
        except md.PackageNotFoundError:
            continue
    allowed, hidden = set(), set()
    for dist in md.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        (allowed if name in keep else hidden).update(_top_level(dist))
    return sorted(hidden - allowed - set(sys.stdlib_module_names))


CORE = """
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
sys.meta_path.insert(0, Hide())
import os, tempfile, torch
import spdelta
spdelta.save_delta, spdelta.make_loss_fn
model = torch.nn.Linear(4, 3)
base = dict(model.named_parameters())
delta = spdelta.SparseDelta.from_dense({"weight": torch.randn(3, 4)}, density=0.5)
path = os.path.join(tempfile.mkdtemp(), "d.st")
spdelta.save_delta(delta, path)
back = spdelta.load_delta(path)["weight"]
fn = spdelta.make_loss_fn(model, lambda out, batch: out.square().mean())
want = fn({}, base, {}, {"input": torch.ones(2, 4)})
got = fn({"weight": back.values}, base, {"weight": back.indices}, {"input": torch.ones(2, 4)})
with torch.no_grad():
    model.weight += delta.to_dense("weight")
print(torch.allclose(got, model(torch.ones(2, 4)).square().mean()) and bool(want >= 0))
print(sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN))
"""


@pytest.mark.slow
def test_the_core_imports_and_runs_with_only_torch_safetensors_and_numpy() -> None:
    hidden = _hidden()
    assert {"transformers", "datasets", "tqdm", "matplotlib"} <= set(hidden)
    got = subprocess.run([sys.executable, "-c", CORE, ",".join(hidden)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.split("\n")[:2] == ["True", "[]"], got.stdout
