"""``spdelta train`` / ``apply`` / ``extract`` on a causal MoE and on a Conv1D model (issue 16)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spdelta.cli.main import main
from spdelta.format import load_delta
from spdelta.hf import apply_to_model

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt2"])
def test_train_apply_extract(name: str, archs: SimpleNamespace, tiny_lm_saver: Callable[..., str],
                             sums_file: Callable[[Path, int], Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """All-linear training reaches the experts; the delta applies to the directory it came
    from exactly as in memory (float32, max |logits diff| <= 1e-6); extract round-trips."""
    import transformers

    cls = getattr(transformers, archs.ARCHS[name][1])
    base = tiny_lm_saver(str(tmp_path / "base"), build=lambda ids: archs.build(name, **ids))
    out, patched, extracted = tmp_path / "d.st", tmp_path / "patched", tmp_path / "x.st"
    assert main(["train", "--model", base, "--data", str(sums_file(tmp_path / "s.jsonl", 16)),
                 "-o", str(out), "--steps", "2", "--batch-size", "4", "--max-length", "24",
                 "--calibration-examples", "8", "--density", "0.05", "--lr", "0.05",
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    delta = load_delta(out)
    if name == "gpt2":  # Conv1D takes the fast path: nothing on the reference path
        assert summary["reference_path"] == [] and "router" not in summary["targets_left_out"]
    else:
        assert len(summary["targets_left_out"]["router"]) == 2
        # transformers' default grouped_mm experts kernel: experts on the reference path
        assert summary["reference_path"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                             for p in ("down_proj", "gate_up_proj")]
        experts = [n for n in delta.keys() if ".experts.0." in n or ".experts.3." in n]
        assert experts and sum(delta[n].nnz for n in delta.keys() if ".experts." in n) > 0
    assert main(["apply", "--base", base, "--delta", str(out), "-o", str(patched)]) == 0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    in_memory = apply_to_model(cls.from_pretrained(base), delta)
    with torch.no_grad():
        want = in_memory(input_ids=ids).logits
        got = cls.from_pretrained(patched)(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-6
    assert main(["extract", "--base", base, "--tuned", str(patched), "--density", "1",
                 "-o", str(extracted)]) == 0
    again = apply_to_model(cls.from_pretrained(base), load_delta(extracted))
    with torch.no_grad():
        assert (again(input_ids=ids).logits - want).abs().max() <= 1e-5
