"""``spdelta inspect FILE [--json]``: version, tensors, sizes and metadata of a delta file."""

from __future__ import annotations

import argparse
import json
from typing import Any

from spdelta.cli._common import new_parser, print_json, printable
from spdelta.format import read_header
from spdelta.rules import KEY_TENSORS, KEY_VERSION

NAME = "inspect"
_COLUMNS = (
    "shape",
    "nnz",
    "density",
    "value_dtype",
    "index_encoding",
    "value_encoding",
    "bytes_per_entry",
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inspect``."""
    p = new_parser(
        subparsers,
        NAME,
        "show what a delta file holds (header only)",
        ["spdelta inspect delta.safetensors", "spdelta inspect delta.safetensors --json"],
    )
    p.add_argument("file", help="a spdelta file")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def describe(path: str) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-able dict (checks the header, spec §7 V1-V8)."""
    meta, infos = read_header(path)
    tensors = {}
    for name, i in infos.items():
        tensors[name] = {
            "shape": list(i.shape),
            "nnz": i.nnz,
            "density": i.density,
            "value_dtype": i.value_dtype,
            "index_encoding": i.index_encoding,
            "value_encoding": i.value_encoding,
            "block_size": i.block_size,
            "bytes": i.nbytes,
            "bytes_per_entry": i.bytes_per_entry,
        }
    nnz = sum(i.nnz for i in infos.values())
    nbytes = sum(i.nbytes for i in infos.values())
    user = {k: v for k, v in meta.items() if k not in (KEY_VERSION, KEY_TENSORS)}
    return {
        "file": path,
        "format_version": meta[KEY_VERSION],
        "tensors": tensors,
        "total": {
            "tensors": len(infos),
            "nnz": nnz,
            "bytes": nbytes,
            "bytes_per_entry": nbytes / nnz if nnz else 0.0,
        },
        "metadata": user,
    }


def _cell(key: str, value: Any) -> str:
    if key == "density":
        return f"{value:.4%}"
    if key == "bytes_per_entry":
        return f"{value:.3f}"
    if key == "shape":
        return "x".join(map(str, value)) or "[]"
    return str(value)


def print_text(info: dict[str, Any]) -> None:
    """Print ``info`` (from :func:`describe`) as the table ``spdelta inspect`` shows."""
    print(f"{printable(info['file'])}: spdelta format {info['format_version']}")
    rows = [("name", *_COLUMNS)] + [
        (printable(name), *(_cell(k, t[k]) for k in _COLUMNS))
        for name, t in info["tensors"].items()
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    total = info["total"]
    print(
        f"total: {total['tensors']} tensors, nnz {total['nnz']}, {total['bytes']} bytes, "
        f"{total['bytes_per_entry']:.3f} bytes/entry"
    )
    print("metadata:")
    for key, value in info["metadata"].items():
        shown = value if len(value) <= 200 else value[:200] + "..."
        print(f"  {printable(key)}: {printable(json.dumps(shown, ensure_ascii=False))}")


def run(args: argparse.Namespace) -> int:
    """Print the description of ``args.file``; 0 on success."""
    info = describe(args.file)
    if args.json:
        print_json(info)
    else:
        print_text(info)
    return 0
