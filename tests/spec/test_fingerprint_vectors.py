"""The base fingerprint vectors of spec §5.1 and §10: disk, memory and legacy rules agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from spdelta.format.fingerprint import (
    combine_records,
    file_records,
    fingerprint_tensors,
    legacy_combine,
    legacy_file_sample,
)
from spdelta.hf import checkpoint_fingerprint

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "fingerprint"
CASES = sorted(p.stem for p in VECTORS.glob("*.safetensors"))


def test_there_are_fingerprint_vectors() -> None:
    assert CASES == ["dtypes", "sampled"]


@pytest.mark.parametrize("case", CASES)
def test_fingerprint_vector(case: str, tmp_path: Path) -> None:
    path = VECTORS / f"{case}.safetensors"
    expected = json.loads((VECTORS / f"{case}.json").read_text("utf-8"))
    assert combine_records(file_records(path)) == expected["fingerprint"]
    assert fingerprint_tensors(load_file(path)) == expected["fingerprint"]
    (tmp_path / "model.safetensors").write_bytes(path.read_bytes())
    assert checkpoint_fingerprint(tmp_path) == expected["fingerprint"]
    legacy = expected["legacy"]
    samples = {n: legacy_file_sample(path, n, n) for n in legacy["names"]}
    assert legacy_combine(samples) == legacy["fingerprint"]
