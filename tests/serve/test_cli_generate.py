"""``spdelta generate``: completions per prompt with its delta, atomic output, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from spdelta import SparseDelta
from spdelta.cli.main import main
from spdelta.format import save_delta
from spdelta.serve import TextServer

ROWS = [{"prompt": "add 1 2", "delta": "a", "id": 7}, {"prompt": "hello there"},
        {"prompt": "add 3 4 and more", "delta": "b"}, {"prompt": "x", "delta": None},
        {"prompt": "tell me a story", "delta": "a"}]


@pytest.fixture
def files(tmp_path: Path, tiny_lm_dir: str,
          make_delta: Callable[..., SparseDelta]) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    out = {"prompts": tmp_path / "prompts.jsonl", "out": tmp_path / "out.jsonl"}
    for i, name in enumerate("ab"):
        out[name] = tmp_path / f"{name}.st"
        save_delta(make_delta(model, seed=i + 1, scale=2.0), out[name])
    out["prompts"].write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    return out


def args(files: dict[str, Path], model: str, *extra: str) -> list[str]:
    return ["generate", "--model", model, "--delta", f"a={files['a']}", "--delta",
            f"b={files['b']}", "--prompts", str(files["prompts"]), "-o", str(files["out"]),
            "--max-new-tokens", "6", "--batch-size", "3", *extra]


def test_writes_each_prompts_completion_with_its_delta(files: dict[str, Path],
                                                      tiny_lm_dir: str) -> None:
    assert main(args(files, tiny_lm_dir)) == 0
    got = [json.loads(line) for line in files["out"].read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k not in ("completion", "new_tokens")}
            for g in got] == ROWS  # input order, other keys copied
    server = TextServer.load(tiny_lm_dir, {"a": files["a"], "b": files["b"]})
    for start in (0, 3):  # the same batches as --batch-size 3
        rows = ROWS[start:start + 3]
        want = server.complete([r["prompt"] for r in rows], [r.get("delta") for r in rows],
                               max_new_tokens=6)
        assert [(g["completion"], g["new_tokens"]) for g in got[start:start + 3]] == want
    texts = {g["completion"] for g in got}
    assert len(texts) > 1  # the deltas (scaled up) change what the model writes


def test_summary_line(files: dict[str, Path], tiny_lm_dir: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(files, tiny_lm_dir)) == 0
    out = capsys.readouterr().out
    assert f"wrote {files['out']}: 5 completions" in out and "tokens/s)" in out


def test_completion_equals_the_merged_model(files: dict[str, Path], tiny_lm_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spdelta.format import load_delta
    from spdelta.hf import apply_to_model

    files["prompts"].write_text(json.dumps({"prompt": "add 3 4", "delta": "b"}) + "\n")
    assert main(args(files, tiny_lm_dir)) == 0
    got = json.loads(files["out"].read_text())
    model: nn.Module = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    apply_to_model(model, load_delta(files["b"]))
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tok(["add 3 4"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    stop = (new == tok.eos_token_id).nonzero()
    new = new[:int(stop[0]) + 1] if len(stop) else new
    assert got["completion"] == tok.decode(new, skip_special_tokens=True)


def test_chat_template(files: dict[str, Path], tiny_chat_lm_dir: str, tiny_lm_dir: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(files, tiny_chat_lm_dir, "--chat")) == 0  # same weights as tiny_lm
    assert len(files["out"].read_text().splitlines()) == 5
    assert main(args(files, tiny_lm_dir, "--chat", "--force")) == 1
    assert "spdelta generate: error: --chat: the tokenizer in" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "delta": "c"}', "prompts.jsonl:1: delta 'c' was not given with --delta "
                                      "NAME=FILE (given: a, b)."),
    ('{"text": "a"}', 'prompts.jsonl:1: expected an object with a string "prompt"'),
    ("not json", "prompts.jsonl:1: not JSON"),
])
def test_bad_prompt_lines_fail_in_one_line_and_write_nothing(
        files: dict[str, Path], tiny_lm_dir: str, capsys: pytest.CaptureFixture[str],
        line: str, message: str) -> None:
    files["prompts"].write_text(line + "\n")
    assert main(args(files, tiny_lm_dir)) == 1
    err = capsys.readouterr().err
    assert err.startswith("spdelta generate: error: ") and message in err
    assert err.count("\n") == 1 and not files["out"].exists()


def test_other_failures(files: dict[str, Path], tiny_lm_dir: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files["out"].write_text("keep me")
    assert main(args(files, tiny_lm_dir)) == 1
    assert "already exists" in capsys.readouterr().err and files["out"].read_text() == "keep me"
    files["out"].unlink()
    other = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)  # another base: one weight moved
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(tmp_path / "other")
    assert main(args(files, str(tmp_path / "other"))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after HF's loading bar
    assert last.startswith("spdelta generate: error: delta 'a': base model fingerprint: ")
    assert last.endswith("or pass --allow-base-mismatch.") and not files["out"].exists()
    assert main(["generate", "--model", tiny_lm_dir, "--delta", "a", "--prompts", "p", "-o",
                 "o"]) == 2
    assert "expected NAME=FILE" in capsys.readouterr().err
    assert main(args(files, tiny_lm_dir, "--delta", f"a={files['a']}")) == 1
    assert "give each NAME once; repeated: a." in capsys.readouterr().err
