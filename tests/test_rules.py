"""Tests for spdelta.rules: each rule against its definition, and that every module uses it."""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from spdelta import rules
from spdelta.format import constants
from spdelta.rules import KNOWN_KEYS, accumulate_dtype, budget, topk_indices

PACKAGE = Path(rules.__file__).resolve().parent


@given(fraction=st.floats(0, 1), n=st.integers(0, 2**40))
def test_budget_is_round_half_up_of_the_product(fraction: float, n: int) -> None:
    """budget == floor(fraction * n + 1/2) in exact rationals whenever the float product
    is exact; otherwise within one entry of it (the product's own rounding)."""
    exact = min(n, int(Fraction(fraction) * n + Fraction(1, 2)))
    got = budget(fraction, n)
    assert 0 <= got <= n
    assert abs(got - exact) <= 1
    if Fraction(fraction * n) == Fraction(fraction) * n:
        assert got == exact


def test_budget_boundaries() -> None:
    assert [budget(0.0, 10), budget(1.0, 10), budget(0.05, 10), budget(0.04, 10)] == [0, 10, 1, 0]
    assert budget(0.5, 0) == 0 and budget(1.0, 1) == 1
    assert budget(0.01, 11008 * 4096) == 450888  # a 7B MLP weight: 45_088_768 entries


@given(values=st.lists(st.floats(allow_nan=False, width=32), max_size=40), data=st.data())
def test_topk_indices_equals_the_stable_sort_reference(values: list[float],
                                                       data: st.DataObject) -> None:
    scores = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(-1, len(values) + 1))
    ref = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[: max(k, 0)])
    assert topk_indices(scores, k).tolist() == ref


def test_accumulate_dtype() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert accumulate_dtype(dtype) == torch.float32
    assert accumulate_dtype(torch.float64) == torch.float64


def test_format_constants_are_the_rules_keys() -> None:
    assert constants.KNOWN_KEYS is KNOWN_KEYS
    for key in KNOWN_KEYS:
        assert key.startswith(rules.PREFIX)


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py")) if p.name != "rules.py"]


def _code_strings(text: str) -> list[str]:
    """String constants of a module, docstrings left out."""
    tree = ast.parse(text)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]


def test_no_module_spells_a_reserved_key_or_restates_a_rule() -> None:
    """Every module takes the keys, the budget and the accumulation dtype from rules."""
    found = []
    for path, text in _sources():
        found += [f"{path.name}: {s!r}" for s in _code_strings(text) if s in KNOWN_KEYS]
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        if re.search(r"math\.floor\([^)]*\+ 0\.5\)", code):
            found.append(f"{path.name}: an inline budget")
        if re.search(r"torch\.float64 if .* else torch\.float32", code):
            found.append(f"{path.name}: an inline accumulation dtype")
        if re.search(r"^def (budget|topk_indices|accumulate_dtype)\(", code, flags=re.M):
            found.append(f"{path.name}: a second definition of a rule")
    assert found == []
