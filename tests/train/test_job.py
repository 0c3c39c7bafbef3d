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


@pytest.fixture(scope="module")
def held_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out text + label rows in the format of ``reviews.csv``."""
    path = tmp_path_factory.mktemp("held") / "held.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(10):
            w.writerow([("fine film " if (i + 1) % 2 else "dull plot ") * (1 + i % 3),
                        (i + 1) % 2])
    return path


def _log(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".log.json").read_text())


@pytest.mark.parametrize("extra", [
    # Stopped at step 5 of 9: inside a 7-step warmup; 3 steps into a cosine decay.
    ("--schedule", "linear", "--warmup", "7"),
    ("--schedule", "cosine", "--warmup", "0.2", "--max-grad-norm", "0.1",
     "--micro-batch-size", "2", "--eval-fraction", "0.25", "--eval-every", "2", "--keep", "best"),
    ("--method", "spiel", "--update-every", "2", "--accumulate-steps", "2", "--schedule",
     "cosine", "--warmup", "2", "--eval-fraction", "0.25", "--eval-every", "1"),
], ids=["mid-warmup", "mid-decay-best", "spiel-mid-decay"])
def test_resume_mid_warmup_and_mid_decay_is_bit_identical(tiny_lm_dir: str, data_dir: Path,
                                                         tmp_path: Path, extra: tuple) -> None:
    _interrupted_equals_uninterrupted(tiny_lm_dir, data_dir / "sums.jsonl", tmp_path, *extra)
    full, part = tmp_path / "full.st", tmp_path / "part.st"
    la, lb = _log(full)["log"], _log(part)["log"]
    keys = ("lr", "eval_loss")
    assert [[r.get(k) for k in keys] for r in la] == [[r.get(k) for k in keys] for r in lb]
    lrs = [r["lr"] for r in la]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.01)  # warmup from 0 to the peak
    if "--keep" in extra:
        assert _log(full)["summary"]["written_step"] == _log(part)["summary"]["written_step"]


def test_schedule_is_recorded_and_followed(tiny_lm_dir: str, data_dir: Path,
                                           tmp_path: Path) -> None:
    from spdelta.optim import warmup_schedule

    out = tmp_path / "d.st"
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", out, "--steps", "6", "--schedule",
                  "linear", "--warmup", "2") == 0
    record = json.loads(load_delta(out).metadata["spdelta.training"])
    assert (record["schedule"], record["warmup"], record["lr"]) == ("linear", 2.0, 0.01)
    want = warmup_schedule("linear", lr=0.01, total_steps=6, warmup=2)
    assert [r["lr"] for r in _log(out)["log"]] == [want(t) for t in range(6)]


def _direct_accuracy(model_dir: str, delta: Path, rows: list[tuple[str, int]],
                     names: list[str]) -> tuple[int, float]:
    """Count by hand: each row, each label's response scored alone (no padding), argmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spdelta.hf import apply_to_model
    from spdelta.recipes.data import encode_prompt_response

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = apply_to_model(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                           load_delta(delta))
    correct, nll, tokens = 0, 0.0, 0
    with torch.no_grad():
        for text, label in rows:
            scores = []
            for name in names:
                b = encode_prompt_response(tok, [text], [name], max_length=32)
                n = int(b["attention_mask"].sum())
                logp = torch.log_softmax(model(input_ids=b["input_ids"][:, -n:]).logits[0]
                                         .double(), -1)
                t = b["shift_labels"][0]
                rows_lp = logp[-t.numel():]
                scores.append(sum(float(rows_lp[j, y]) for j, y in enumerate(t.tolist())
                                  if y != -100))
                if name == names[label]:
                    nll -= scores[-1]
                    tokens += int((t != -100).sum())
            correct += int(max(range(len(names)), key=lambda j: scores[j]) == label)
    return correct, nll / tokens


def test_eval_data_accuracy_equals_a_direct_count(tiny_chat_lm_dir: str, data_dir: Path,
                                                  tmp_path: Path,
        held_csv: Path) -> None:
    out = tmp_path / "s.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", out, "--steps", "4",
                  "--label-names", "negative,positive", "--eval-data",
                  str(held_csv), "--eval-every", "2", "--lr", "0.05") == 0
    log = _log(out)
    evals = [r for r in log["log"] if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    with open(held_csv) as f:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(f)]
    correct, loss = _direct_accuracy(tiny_chat_lm_dir, out, rows, ["negative", "positive"])
    assert evals[-1]["eval_accuracy"] == correct / len(rows)
    assert evals[-1]["eval_loss"] == pytest.approx(loss, rel=1e-4)  # fast path vs merged fp32
    assert log["summary"]["eval_accuracy"] == evals[-1]["eval_accuracy"]


def test_keep_best_writes_the_best_steps_delta(tiny_chat_lm_dir: str, data_dir: Path,
                                               tmp_path: Path,
        held_csv: Path) -> None:
    from spdelta.dist import load_checkpoint

    # Text + label data: the best is the highest held-out accuracy, the earliest on ties.
    args = ("--steps", "8", "--label-names", "negative,positive", "--eval-data",
            str(held_csv), "--eval-every", "1", "--keep", "best", "--lr", "0.05",
            "--checkpoint-every", "0")
    out = tmp_path / "best.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", out, *args) == 0
    log = _log(out)
    accs = [r["eval_accuracy"] for r in log["log"]]
    best = 1 + accs.index(max(accs))
    assert best < 8, accs  # the delta written is not the last step's
    assert log["summary"]["written_step"] == best == log["summary"]["best_step"]
    assert json.loads(load_delta(out).metadata["spdelta.training"])["written_step"] == best
    # The same run stopped at the best step leaves that step's state in its checkpoint.
    stop = tmp_path / "stop.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", stop, *args, "--stop-after",
                  str(best)) == 0
    state = load_checkpoint(tmp_path / "stop.st.ckpt" / "state")
    written = load_delta(out)
    assert state.step == best
    for name, t in written.items():
        assert torch.equal(t.indices, state.support[name])
        assert torch.equal(t.values, state.values[name])
    # Interrupted after the best step: the best state comes back from the checkpoint.
    part = tmp_path / "part.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", part, *args, "--stop-after",
                  str(best + 1)) == 0
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", part, *args, "--resume") == 0
    a, b = _tensors(out), _tensors(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = tmp_path / "last.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", last, *args, "--keep", "last") == 0
    assert any(not torch.equal(t.values, load_delta(last)[n].values) for n, t in written.items())


def test_chat_template_none_and_file_are_recorded(tiny_chat_lm_dir: str, data_dir: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "plain.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", out, "--steps", "2",
                  "--label-names", "negative,positive", "--chat-template", "none",
                  "--template", "Review: {text}\nSentiment: ") == 0
    record = json.loads(load_delta(out).metadata["spdelta.training"])
    assert record["chat_template"] == "none" and record["prompt_format"] == "plain"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    out2 = tmp_path / "file.st"
    assert _train(tiny_chat_lm_dir, data_dir / "reviews.csv", out2, "--steps", "2",
                  "--label-names", "negative,positive", "--chat-template", str(template)) == 0
    fmt = json.loads(load_delta(out2).metadata["spdelta.training"])["prompt_format"]
    assert fmt.startswith("chat:file t.jinja sha256:")


def test_micro_batches_give_the_batch_run(tiny_lm_dir: str, data_dir: Path,
                                          tmp_path: Path) -> None:
    """Magnitude selection reads no data, so both runs train the same entries."""
    runs = []
    for i, extra in enumerate([(), ("--micro-batch-size", "1")]):
        out = tmp_path / f"m{i}.st"
        assert _train(tiny_lm_dir, data_dir / "sums.jsonl", out, "--steps", "4", "--metric",
                      "magnitude", *extra) == 0
        runs.append((load_delta(out), [r["loss"] for r in _log(out)["log"]]))
    (d0, l0), (d1, l1) = runs
    assert l1 == pytest.approx(l0, rel=1e-5)
    for n, t in d0.items():
        assert torch.equal(t.indices, d1[n].indices)
        torch.testing.assert_close(t.values, d1[n].values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (("--keep", "best"), "--keep best needs held-out rows"),
    (("--eval-split", "test"), "is a file, which has one split"),
    (("--chat-template", "missing.jinja"), "--chat-template: expected auto, none"),
    (("--micro-batch-size", "9"), "--micro-batch-size: expected 1 .. --batch-size"),
    (("--warmup", "1.5"), "--warmup: expected a ratio"),
    (("--eval-fraction", "1.0"), "--eval-fraction: expected a fraction"),
])
def test_bad_options_are_one_line(tiny_lm_dir: str, data_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], extra: tuple,
                                  message: str) -> None:
    assert _train(tiny_lm_dir, data_dir / "sums.jsonl", tmp_path / "o.st", "--steps", "1",
                  *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_eval_split_of_a_dataset_directory(tiny_lm_dir: str, tmp_path: Path) -> None:
    import datasets

    rows = {"prompt": [f"add {i} 1" for i in range(12)],
            "response": [str(i + 1) for i in range(12)]}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                   "validation": datasets.Dataset.from_dict(rows).select(range(3))})
    splits.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "d.st"
    assert _train(tiny_lm_dir, tmp_path / "ds", out, "--steps", "2", "--eval-split",
                  "validation") == 0
    log = _log(out)
    assert [r["step"] for r in log["log"] if "eval_loss" in r] == [1, 2]  # 2 // 10 -> every step
    assert "eval_accuracy" not in log["summary"] and log["summary"]["eval_loss"] > 0


def test_a_missing_model_directory_is_one_line(data_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(str(tmp_path / "no-such-ckpt"), data_dir / "sums.jsonl", tmp_path / "o.st",
                  "--steps", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0] and "--model" in err[0]
    assert not (tmp_path / "o.st").exists()
