"""Tests for spdelta.select: exact budgets, order, ties, and the LoRA budget."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.errors import ShapeError, SpdeltaError
from spdelta.rules import topk_indices
from spdelta.select import budgets, select_topk

SHAPES = [(0,), (1,), (1, 1), (3,), (2, 3), (4, 5), (0, 4), (7, 2)]


@st.composite
def score_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=4, unique=True))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    out = {}
    for n in names:
        shape = draw(st.sampled_from(SHAPES))
        pool = [-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, 1e-30, -1e30, math.inf]
        vals = draw(st.lists(st.sampled_from(pool),
                             min_size=math.prod(shape), max_size=math.prod(shape)))
        out[n] = torch.tensor(vals, dtype=dtype).reshape(shape)
    return out


budget_kwargs = st.one_of(
    st.fixed_dictionaries({"density": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1))}),
    st.fixed_dictionaries({"k": st.integers(0, 60)}),
    st.fixed_dictionaries({"lora_rank": st.integers(0, 3)}),
)


def reference(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Global top-k by concatenating in name order: ties to earlier name, lower index."""
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names]) + 0.0
    chosen = topk_indices(flat, k)
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        sel = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        out[n], offset = sel, offset + size
    return out


@settings(max_examples=150, deadline=None)
@given(scores=score_dicts(), kw=budget_kwargs, scope=st.sampled_from(["global", "per_tensor"]))
def test_nnz_equals_budget_and_matches_reference(scores: dict[str, torch.Tensor], kw: dict,
                                                 scope: str) -> None:
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    want = budgets(shapes, scope=scope, **kw)  # type: ignore[arg-type]
    got = select_topk(scores, scope=scope, **kw)  # type: ignore[arg-type]
    assert sorted(got) == sorted(scores)
    for n, idx in got.items():
        assert idx.dtype == torch.int64
        assert torch.equal(idx, torch.unique(idx))  # sorted and unique
        assert idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < scores[n].numel())
    if scope == "global":
        assert sum(i.numel() for i in got.values()) == want[""]
        expected = reference(scores, want[""])
        assert all(torch.equal(got[n], expected[n]) for n in scores)
    else:
        for n in scores:
            assert got[n].numel() == want[n]
            assert torch.equal(got[n], reference({n: scores[n]}, want[n])[n])


def test_budget_formulas() -> None:
    shapes = {"a": (64, 32), "b": (32,), "c": (8, 8)}
    total = 64 * 32 + 32 + 64
    assert budgets(shapes, lora_rank=4) == {"": 4 * (64 + 32) + 4 * 16}
    assert budgets(shapes, lora_rank=4, scope="per_tensor") == {"a": 384, "b": 0, "c": 64}
    assert budgets(shapes, density=0.01) == {"": math.floor(0.01 * total + 0.5)}
    assert budgets(shapes, k=10 ** 9) == {"": total}  # capped
    assert budgets(shapes, k=5, scope="per_tensor") == {"a": 5, "b": 5, "c": 5}


def test_lora_budget_of_fused_experts_is_one_lora_per_expert() -> None:
    """(experts, out, in): peft's target_parameters LoRA has lora_A (r * E, in) and
    lora_B (out, r * E), i.e. E LoRAs of rank r; a density budget counts every entry."""
    shapes = {"experts.gate_up_proj": (4, 96, 32), "q": (32, 32)}
    assert budgets(shapes, lora_rank=2, scope="per_tensor") == {
        "experts.gate_up_proj": 2 * 4 * 96 + 2 * 4 * 32, "q": 2 * 64}
    assert budgets(shapes, density=0.5) == {"": (4 * 96 * 32 + 32 * 32) // 2}


def test_lora_rank_budget_selects_lora_count() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {"q": torch.rand(16, 8, generator=gen), "v": torch.rand(4, 8, generator=gen)}
    got = select_topk(scores, lora_rank=2)
    assert sum(i.numel() for i in got.values()) == 2 * (16 + 8) + 2 * (4 + 8)
    flat = select_topk({n: s.reshape(-1) for n, s in scores.items()}, lora_rank=2,
                       shapes={n: s.shape for n, s in scores.items()})
    assert all(torch.equal(flat[n], got[n]) for n in scores)


def test_global_vs_per_tensor() -> None:
    scores = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    assert {n: i.tolist() for n, i in select_topk(scores, k=4).items()} == {"a": [0, 1, 2, 3],
                                                                          "b": []}
    per = select_topk(scores, k=2, scope="per_tensor")
    assert {n: i.tolist() for n, i in per.items()} == {"a": [0, 1], "b": [2, 3]}


def test_ties_are_deterministic() -> None:
    scores = {"b": torch.ones(3), "a": torch.ones(2, 2)}
    got = select_topk(scores, k=5)
    assert got["a"].tolist() == [0, 1, 2, 3] and got["b"].tolist() == [0]
    got = select_topk({"x": torch.tensor([0.0, -0.0, 0.0, -1.0])}, k=2)
    assert got["x"].tolist() == [0, 1]  # -0.0 ties with 0.0


def test_errors() -> None:
    s = {"a": torch.ones(3)}
    with pytest.raises(SpdeltaError, match="exactly one of"):
        select_topk(s, density=0.5, k=1)
    with pytest.raises(SpdeltaError, match="exactly one of"):
        select_topk(s)
    with pytest.raises(SpdeltaError, match="density must lie"):
        select_topk(s, density=1.5)
    with pytest.raises(SpdeltaError, match="scope"):
        select_topk(s, k=1, scope="layer")  # type: ignore[arg-type]
    with pytest.raises(SpdeltaError, match="NaN"):
        select_topk({"a": torch.tensor([1.0, math.nan])}, k=1)
    with pytest.raises(ShapeError, match="'a'"):
        select_topk(s, lora_rank=1, shapes={"a": (2, 2)})


@given(st.lists(st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 2.0, 7.0, math.nan]), min_size=1,
                max_size=60), st.data())
def test_topk_indices_equals_stable_sort(values: list[float], data: st.DataObject) -> None:
    """The threshold path equals the reference: a stable descending sort, first k, sorted."""
    scores = torch.tensor(values)
    k = data.draw(st.integers(0, len(values)))
    ref = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values
    assert torch.equal(topk_indices(scores, k), ref)
