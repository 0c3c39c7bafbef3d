"""Every float option on every command is finite and in range; overflow is the user's, not V10."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
import torch

from spdelta import SparseDelta
from spdelta.cli import _common, main
from spdelta.cli.main import build_parser
from spdelta.errors import ParameterError
from spdelta.format import save_delta
from spdelta.hf import apply_to_model
from spdelta.recipes.job import TrainConfig, train_job

Capsys = pytest.CaptureFixture[str]
CHECKED = {_common.finite, _common.fraction, _common.positive, _common.non_negative,
           _common.float_list, _common.fraction_list}
BAD = ["nan", "inf", "-inf", "1e400", "NaN"]


def _float_options() -> list[tuple[str, str, object]]:
    """(command, option, argparse type) of every option that takes a number with a point."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.type is not None and action.type is not int:
                out.append((command, action.option_strings[-1], action.type))
    return out


def test_every_float_option_uses_a_checked_type() -> None:
    options = _float_options()
    assert {(c, o) for c, o, _ in options} >= {
        ("apply", "--alpha"), ("merge", "--weights"), ("merge", "--density"),
        ("merge", "--gamma"), ("train", "--lr"), ("train", "--density"),
        ("train", "--weight-decay"), ("train", "--epochs"), ("extract", "--density"),
        ("demo", "--lr"), ("demo", "--density")}
    others = {(c, o) for c, o, t in options if t not in CHECKED}
    assert others == {("train", "--label-names"), ("extract", "--targets"),  # text, not numbers
                      ("diff", "--targets"), ("generate", "--delta"),
                      ("diff", "--topk")}  # a whole count


@pytest.mark.parametrize(("command", "option"),
                         sorted({(c, o) for c, o, t in _float_options() if t in CHECKED}))
@pytest.mark.parametrize("value", BAD)
def test_non_finite_values_are_usage_errors(command: str, option: str, value: str,
                                            capsys: Capsys) -> None:
    capsys.readouterr()
    assert main([command, f"{option}={value}", "--help-not-reached"]) == 2
    err = capsys.readouterr().err
    assert f"{option}: expected a finite number" in err and "error:" in err, err


@pytest.fixture
def base_dir(tiny_llama_dir: str) -> str:
    return tiny_llama_dir


def _norm_delta(path: Path, value: float = 1.0) -> Path:
    save_delta(SparseDelta({"model.norm.weight": ((32,), torch.tensor([0, 5]),
                                                  torch.tensor([value, -value]))}), path)
    return path


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_apply_refuses_a_non_finite_alpha(base_dir: str, tmp_path: Path, alpha: str,
                                          capsys: Capsys) -> None:
    delta = _norm_delta(tmp_path / "d.st")
    code = main(["apply", "--base", base_dir, "--delta", str(delta), "-o", str(tmp_path / "o"),
                 f"--alpha={alpha}"])
    assert code == 2 and not (tmp_path / "o").exists()
    assert "--alpha: expected a finite number" in capsys.readouterr().err


def test_apply_refuses_an_alpha_that_overflows_the_weights(base_dir: str, tmp_path: Path,
                                                           capsys: Capsys) -> None:
    delta = _norm_delta(tmp_path / "d.st")
    capsys.readouterr()
    code = main(["apply", "--base", base_dir, "--delta", str(delta), "-o", str(tmp_path / "o"),
                 "--alpha", "1e39"])
    err = capsys.readouterr().err
    assert code == 1 and "overflows float32" in err and "--alpha" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert sorted(os.listdir(tmp_path)) == ["d.st"]  # no temp dir left


def test_merge_weights_that_overflow_blame_the_weights_not_the_file(tmp_path: Path,
                                                                    capsys: Capsys) -> None:
    a = _norm_delta(tmp_path / "a.st", 3e38)
    b = _norm_delta(tmp_path / "b.st", 3e38)
    for extra in (["--weights", "1e308,1e308"], []):
        capsys.readouterr()
        assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o.st"), *extra]) == 1
        err = capsys.readouterr().err
        assert "overflows" in err and "V10" not in err and "spec" not in err, err
    assert main(["compose", str(a), str(b), "-o", str(tmp_path / "o.st")]) == 1
    assert "overflows" in capsys.readouterr().err and not (tmp_path / "o.st").exists()


def test_apply_to_model_checks_alpha_and_changes_nothing_on_overflow() -> None:
    model = torch.nn.Linear(4, 2, bias=False).to(torch.bfloat16)
    before = model.weight.detach().clone()
    delta = SparseDelta({"weight": ((2, 4), torch.tensor([0, 7]), torch.tensor([1.0, 1.0]))})
    for alpha in (math.nan, math.inf):
        with pytest.raises(ParameterError, match="alpha must be a finite number"):
            apply_to_model(model, delta, alpha=alpha)
    with pytest.raises(ParameterError, match="overflows bfloat16"):
        apply_to_model(model, delta, alpha=1e39)
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize(("field", "value"), [("lr", math.nan), ("lr", 0.0),
                                              ("weight_decay", math.inf), ("density", 1.5),
                                              ("epochs", math.nan),
                                              ("initial_fraction", -0.1)])
def test_train_config_numbers_are_checked(tmp_path: Path, field: str, value: float) -> None:
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path / "o.st"), **{field: value})
    with pytest.raises(ParameterError, match=field):
        train_job(cfg)
