"""``spdelta train`` end to end on a tiny real checkpoint: outputs, formats, resume, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spdelta.cli.main import main
from spdelta.format import load_delta

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sums.jsonl`` (prompt + response, one-character answers) and ``reviews.csv``."""
    d = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(0)
    with open(d / "sums.jsonl", "w") as f:
        for a, b in torch.randint(0, 5, (40, 2), generator=gen).tolist():
            f.write(json.dumps({"prompt": f"add {a} {b}", "response": str(a + b)}) + "\n")
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(24):
            w.writerow([("fine film " if i % 2 else "dull plot ") * (1 + i % 3), i % 2])
    return d


def _train(model: str, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", model, "--data", str(data), "-o", str(out),
                 "--batch-size", "4", "--max-length", "32", "--calibration-examples", "8",
                 "--density", "0.05", "--lr", "0.01", "--no-progress", *extra])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_speft_writes_delta_log_and_plot(tiny_lm_dir: str, data_dir: Path, tmp_path: Path
                                         ) -> None:
    out = tmp_path / "d.st"
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", out, "--steps", "12") == 0
    delta = load_delta(out)
    record = json.loads(delta.metadata["spdelta.training"])
    assert record["method"] == "speft" and record["lr"] == 0.01 and record["steps"] == 12
    assert delta.metadata["spdelta.base_model.fingerprint"].startswith("base1:")
    total = record["nnz"] / record["achieved_density"]
    assert delta.nnz == round(0.05 * total)  # the global top-k budget, exactly
    log = json.loads(out.with_name("d.st.log.json").read_text())
    losses = [r["loss"] for r in log["log"]]
    assert len(losses) == 12 and log["summary"]["finished"]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert out.with_name("d.st.loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not out.with_name("d.st.ckpt").exists()  # removed once the delta is written


def _interrupted_equals_uninterrupted(model: str, data: Path, tmp: Path, *extra: str) -> None:
    full, part = tmp / "full.st", tmp / "part.st"
    args = ("--steps", "9", "--checkpoint-every", "3", *extra)
    assert _train(model, data, full, *args) == 0
    assert _train(model, data, part, *args, "--stop-after", "5") == 0
    assert not part.exists() and (tmp / "part.st.ckpt" / "state").is_dir()
    assert _train(model, data, part, *args, "--resume") == 0
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = json.loads(full.with_name("full.st.log.json").read_text())["log"]
    lb = json.loads(part.with_name("part.st.log.json").read_text())["log"]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_speft_resume_is_bit_identical(tiny_lm_dir: str, data_dir: Path, tmp_path: Path) -> None:
    _interrupted_equals_uninterrupted(tiny_lm_dir, data_dir / "sums.jsonl", tmp_path)


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_spiel_resume_is_bit_identical(tiny_lm_dir: str, data_dir: Path, tmp_path: Path,
                                       regrowth: str) -> None:
    # Regrowth at steps 2, 4, 6, 8 straddles the stop at step 5 (and a checkpoint at 3).
    _interrupted_equals_uninterrupted(
        tiny_lm_dir, data_dir / "sums.jsonl", tmp_path, "--method", "spiel", "--regrowth",
        regrowth, "--update-every", "2", "--accumulate-steps", "2")
    log = json.loads((tmp_path / "full.st.log.json").read_text())["log"]
    assert sum(r["regrown"] for r in log) > 0


def test_resume_refuses_changed_settings(tiny_lm_dir: str, data_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.st"
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", out, "--steps", "4",
                  "--stop-after", "2") == 0
    capsys.readouterr()
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", out, "--steps", "4", "--resume",
                  "--lr", "0.5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr: 0.01 -> 0.5" in err[0] and not out.exists()


def test_text_label_csv_with_chat_template(tiny_chat_lm_dir: str, tmp_path: Path,
                                          data_dir: Path) -> None:
    out = tmp_path / "s.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", out, "--steps", "3", "--label-names",
                  "negative,positive", "--template", "Review: {text}", "--system",
                  "Classify.", "--metric", "magnitude") == 0
    record = json.loads(load_delta(out).metadata["spdelta.training"])
    assert record["data_format"] == "text_label" and record["metric"] == "magnitude"


def test_nf4_base_trains(tiny_lm_dir: str, data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason="the NF4 base needs torchao (extra 'quant')")
    out = tmp_path / "q.st"
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", out, "--steps", "2", "--nf4") == 0
    assert load_delta(out).nnz > 0


def test_errors_are_one_line(tiny_lm_dir: str, data_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question2": "x", "reply": "y"}\n')
    assert _train(tiny_lm_dir, bad, tmp_path / "o.st", "--steps", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected columns prompt + response" in err[0]
    existing = tmp_path / "exists.st"
    existing.write_bytes(b"old")
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", existing, "--steps", "1") == 1
    assert "--force" in capsys.readouterr().err and existing.read_bytes() == b"old"
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", tmp_path / "x.st", "--steps", "1",
                  "--batch-size", "100") == 1
    assert "fewer than one batch" in capsys.readouterr().err
