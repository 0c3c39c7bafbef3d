"""Appendix A of spec/format.md is at most 30 lines and decodes every valid vector."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

SPEC = Path(__file__).resolve().parents[2] / "spec"
CODE = re.search(
    r"## Appendix A.*?```python\n(.*?)```", (SPEC / "format.md").read_text("utf-8"), re.S
)
VALID = sorted((SPEC / "vectors" / "valid").glob("*.safetensors"))


def _reader() -> Any:
    assert CODE is not None
    namespace: dict[str, Any] = {}
    exec(compile(CODE[1], "format.md#appendix-a", "exec"), namespace)  # trusted: our own spec
    return namespace["read_delta"]


def test_reference_reader_is_short() -> None:
    assert CODE is not None and len(CODE[1].strip().splitlines()) <= 30


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_reference_reader_decodes_valid_vectors(path: Path) -> None:
    expected = json.loads(path.with_suffix(".json").read_text("utf-8"))
    tensors, meta = _reader()(path)
    assert meta == expected["metadata"]
    assert sorted(tensors) == sorted(expected["tensors"])
    for name, t in expected["tensors"].items():
        shape, positions, values = tensors[name]
        assert list(shape) == t["shape"]
        assert positions.tolist() == t["indices"]
        if t.get("value_encoding") == "replace":  # the stored bits, never interpreted
            assert values.view(f"<u{values.itemsize}").tolist() == t["bits"]
        else:
            assert [float(v) for v in values] == t["values"]
