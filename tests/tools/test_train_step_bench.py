"""tools/bench/train_step.py end to end on a tiny Llama: every timed and memory field is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "train_step.py"
TINY = ["--hidden", "64", "--layers", "2", "--vocab", "256", "--intermediate", "128",
        "--heads", "4", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
        "--mem-steps", "2", "--nf4-config", "none"]


@pytest.mark.slow  # one child process per variant, each importing torch and transformers
def test_tiny_run_reports_every_variant() -> None:
    variants = ["spdelta_static", "spdelta_spiel", "lora", "frozen"]
    out = subprocess.run([sys.executable, str(BENCH), "--json", *TINY,
                          "--variants", ",".join(variants)],
                         capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    assert list(report["results"]) == variants
    for name, r in report["results"].items():
        assert "error" not in r, (name, r)
        assert r["step_s"] > 0 and r["peak_mb"] > 0 and r["peak_total_mb"] >= r["peak_mb"]
    for name in ("spdelta_static", "lora", "frozen"):  # the steady and the after-other views
        assert report["results"][name]["step_s_after_other"] > 0
        assert len(report["results"][name]["step_s_all"]) == 2
    assert report["results"]["spdelta_spiel"]["steps_timed"] == 20
    assert report["results"]["lora"]["rank"] >= 1
    for key in ("step_static_over_lora", "step_static_over_frozen", "peak_static_over_lora",
                "step_after_other_static_over_frozen", "step_spiel_amortised_over_lora"):
        assert report["ratios"][key] > 0
