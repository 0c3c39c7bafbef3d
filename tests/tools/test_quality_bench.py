"""tools/bench/quality.py: budget matching, training dispatch, table and CLI on a tiny Llama."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # quality.py imports its sibling train_step
    try:
        spec = importlib.util.spec_from_file_location("quality", BENCH / "quality.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("quality", module)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def _batches() -> itertools.cycle:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    return itertools.cycle([{"input_ids": ids, "labels": ids}])


def test_lora_rank_is_closest_to_the_density_budget(quality: ModuleType) -> None:
    model = _tiny_llama()
    got = quality.lora_rank_for(model, 0.05)
    per_rank = got["budget"] // got["lora_rank"]
    wanted = 0.05 * got["target_entries"]
    assert all(abs(got["budget"] - wanted) <= abs(r * per_rank - wanted) for r in range(1, 20))
    assert got["budget_density"] == got["budget"] / got["target_entries"]
    assert quality.lora_rank_for(model, 0.05, 7)["budget"] == 7 * per_rank


@pytest.mark.hf
@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5 (deprecations)
@pytest.mark.parametrize("method", ["full", "lora", "speft_magnitude", "spiel_ag"])
def test_train_runs_and_counts_trainable(quality: ModuleType, method: str) -> None:
    cfg = quality.Config(steps=3, density=0.05, spiel_update_every=2, spiel_accumulate_steps=1)
    model = _tiny_llama()
    budget = quality.lora_rank_for(model, cfg.density)
    stamps: list[float] = []
    trained, losses, trainable = quality.train(
        method, model, {}, cfg, 1e-2, quality._timed(_batches(), stamps))
    assert len(losses) == 3 and len(stamps) == 3
    expected = {"full": sum(p.numel() for p in _tiny_llama().parameters()),
                "lora": budget["budget"], "speft_magnitude": budget["budget"]}
    if method in expected:  # LoRA and SPEFT train exactly the same number of parameters
        assert trainable == expected[method]
    else:  # SpIEL's budget is per tensor, so rounding may differ slightly
        assert abs(trainable - budget["budget"]) <= 14
    assert trained(**next(_batches())).loss < losses[0]


def test_table_and_cli(quality: ModuleType) -> None:
    cfg, _ = quality.parse(["--methods", "zero_shot,lora", "--lrs-lora", "1e-3,2e-3"])
    assert cfg.lrs == {"lora": [1e-3, 2e-3]} and cfg.test_examples >= 1000
    assert quality.estimate_seconds(quality.parse([])[0]) <= 60 * 60
    results = {
        "zero_shot": {"trainable_params": 0, "val_accuracy": 0.5, "test_accuracy": 0.25},
        "lora": {"trainable_params": 1234, "chosen_lr": 1e-3, "val_accuracy": 0.75,
                 "test_accuracy": 0.7, "step_s_median": 2.5, "peak_train_mb": 100.0,
                 "peak_total_mb": 700.0, "runs": [{"lr": 1e-3, "val_accuracy": 0.75},
                                                  {"lr": 2e-3, "val_accuracy": 0.5}]},
        "full": {"error": "RuntimeError: boom"},
    }
    table = quality.format_table(results).splitlines()
    assert table[2] == "| zero_shot | 0 | - | - | 0.500 | 0.250 | - | - | - |"
    assert table[3] == ("| lora | 1,234 | 0.001: 0.750, 0.002: 0.500 | 0.001 | 0.750 | 0.700 "
                        "| 2.50 | 100 | 700 |")
    assert table[4].startswith("| full | error: RuntimeError: boom |")
    assert all(line.count("|") == 10 for line in table)
