"""The file format stands apart from the maths: spdelta/format imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import spdelta.format

FORMAT = Path(spdelta.format.__file__).resolve().parent
#: What the format may not import: the delta maths and everything built on it.
ABOVE = ("spdelta.ops", "spdelta.files", "spdelta.train", "spdelta.dist", "spdelta.hf",
         "spdelta.serve", "spdelta.patch", "spdelta.cli", "spdelta.functional",
         "spdelta.kernels", "spdelta.salience")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_format_imports_nothing_above_it() -> None:
    bad = sorted(f"{p.name}: {m}" for p in FORMAT.glob("*.py") for m in _imports(p)
                 if m.startswith(ABOVE))
    assert bad == []
