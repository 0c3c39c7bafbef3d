"""tools/bench/experts.py on a tiny Mixtral: the variants run what they name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "experts.py"

pytestmark = pytest.mark.hf


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("experts_bench", BENCH)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_variants_route_what_they_name(capsys: pytest.CaptureFixture[str]) -> None:
    from spdelta.route import ExpertsRouter

    bench = _bench()
    cfg = {"hidden": 32, "intermediate": 48, "layers": 1, "experts": 4, "top_k": 2, "vocab": 64,
           "batch": 2, "seq": 8, "seed": 0, "density": 0.05, "device": "cpu",
           "experts_implementation": "grouped_mm"}
    fast, _, _ = bench.build(cfg, "eager")
    reference, _, _ = bench.build(cfg, "grouped_mm")
    assert len(ExpertsRouter(fast).names) == 2 and not ExpertsRouter(reference).names
    args = ["--hidden", "32", "--intermediate", "48", "--layers", "1", "--experts", "4",
            "--vocab", "64", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0",
            "--no-memory", "--json"]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["variants"]) == {"experts_fast", "experts_reference", "attention_only"}
    assert result["time_fast_over_reference"] > 0
