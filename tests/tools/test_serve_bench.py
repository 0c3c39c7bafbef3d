"""tools/bench/serve.py end to end on a tiny Llama: every variant, ratio and target is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "serve.py"
KERNELS = Path(__file__).resolve().parents[2] / "tools" / "bench" / "serve_kernels.py"


@pytest.mark.slow  # a memory child per variant, each importing torch, transformers and peft
def test_tiny_run_reports_every_variant(tiny_lm_dir: str) -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--json", "--model", tiny_lm_dir,
                          "--rows", "4", "--deltas", "2", "--new-tokens", "3", "--rounds", "2",
                          "--swap-reps", "3"],
                         capture_output=True, text=True, check=True, timeout=900)
    report = json.loads(out.stdout)
    results = report["results"]
    assert set(results) == {"base", "merged", "mixed", "peft_lora_mixed", "swap"}
    for name in ("base", "merged", "mixed", "peft_lora_mixed"):
        r = results[name]
        assert "error" not in r, (name, r)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_total_mb"] > 0
        assert len(r["decode_step_s_all"]) == 2 * 2  # two rounds of (3 - 1) decode steps
    assert results["mixed"]["delta_mb"] > results["merged"]["delta_mb"] > 0
    assert results["peft_lora_mixed"]["lora_rank"] >= 1
    assert len(results["swap"]["spdelta_s_all"]) == len(results["swap"]["peft_s_all"]) == 3
    for key in ("decode_mixed_over_base", "decode_mixed_over_peft_lora_mixed",
                "prefill_mixed_over_base", "swap_over_peft"):
        assert report["ratios"][key] > 0
    assert set(report["targets"]) == {"decode_mixed_over_base", "swap_over_peft",
                                      "decode_mixed_over_peft_lora_mixed", "peak_mixed_mb"}
    assert report["config"]["delta_files_mb"] > 0


@pytest.mark.slow  # times seven methods on seven layer shapes
def test_kernel_comparison_runs_and_checks_every_method() -> None:
    out = subprocess.run([sys.executable, str(KERNELS), "--json", "--rounds", "1", "--reps", "1",
                          "--prefill", "2", "--rows", "4", "--deltas", "2"],
                         capture_output=True, text=True, check=True, timeout=900)
    report = json.loads(out.stdout)
    for phase in ("decode", "prefill"):
        costs = report[phase]["best"]["delta_cost_over_base"]
        assert set(costs) == {"csr_blockdiag", "csr_per_delta", "gather_index_add",
                              "gather_per_row", "coo", "dense_rows"}
