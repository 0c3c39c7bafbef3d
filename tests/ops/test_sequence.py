"""Sequential composition (spec §6.5): applying then_tensor(a, b) equals applying a, then b."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from spdelta import DeltaTensor
from spdelta.errors import CompositionError
from spdelta.ops import sequence_tensor, then_tensor, union_sum
from spdelta.patch import Patch, ReplaceTensor, apply_, bit_view

N = 40


def _support(draw: st.DrawFn, within: list[int] | None = None) -> Tensor:
    pool = within if within is not None else list(range(N))
    chosen = draw(st.lists(st.sampled_from(pool), unique=True, max_size=len(pool))) if pool else []
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def _entry(kind: str, idx: Tensor, seed: int, dtype: torch.dtype) -> DeltaTensor | ReplaceTensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(idx.numel(), generator=gen)
    if kind == "set":
        return ReplaceTensor((N,), idx, values.to(dtype))
    return DeltaTensor((N,), idx, values)


def _applied(w: Tensor, *entries: DeltaTensor | ReplaceTensor) -> Tensor:
    out = {"w": w.clone()}
    for e in entries:
        apply_(out, Patch({"w": e}), check=False)
    return out["w"]


@st.composite
def defined_pairs(draw: st.DrawFn) -> tuple[str, str, Tensor, Tensor]:
    kinds = draw(st.sampled_from([("add", "add"), ("set", "set"), ("add", "set"),
                                  ("set", "add")]))
    a = _support(draw)
    if kinds == ("add", "set"):  # b must cover a
        b = torch.unique(torch.cat([a, _support(draw)]))
    elif kinds == ("set", "add"):  # b must lie within a
        b = _support(draw, a.tolist())
    else:
        b = _support(draw)
    return (*kinds, a, b)


@settings(max_examples=100, deadline=None)
@given(defined_pairs(), st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
       st.integers(0, 1000))
def test_then_equals_applying_in_order(pair: tuple[str, str, Tensor, Tensor],
                                       dtype: torch.dtype, seed: int) -> None:
    ka, kb, ia, ib = pair
    a, b = _entry(ka, ia, seed, dtype), _entry(kb, ib, seed + 1, dtype)
    w = torch.randn(N, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    want = _applied(w, a, b)
    got = _applied(w, then_tensor("w", a, b))
    if (ka, kb) == ("add", "add"):  # one cast instead of two: equal to fp rounding
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(bit_view(got), bit_view(want))


def test_undefined_compositions_are_refused() -> None:
    add = DeltaTensor((4,), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    set_ = ReplaceTensor((4,), torch.tensor([1, 2]), torch.tensor([5.0, 6.0]))
    with pytest.raises(CompositionError, match="'w'.*does not cover"):
        then_tensor("w", add, set_)
    with pytest.raises(CompositionError, match="'w'.*does not set"):
        then_tensor("w", set_, add)
    ints = ReplaceTensor((4,), torch.tensor([0, 1]), torch.tensor([3, 4]))
    with pytest.raises(CompositionError, match="not floating"):
        then_tensor("w", ints, DeltaTensor((4,), torch.tensor([0]), torch.tensor([1.0])))
    with pytest.raises(CompositionError, match="dtype"):
        then_tensor("w", set_, ReplaceTensor((4,), torch.tensor([0]), torch.tensor([1.0]).half()))


def test_later_replacement_wins_bitwise() -> None:
    nan = torch.tensor([0x7FC1], dtype=torch.int16).view(torch.bfloat16)
    a = ReplaceTensor((3,), torch.tensor([0, 2]), torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    b = ReplaceTensor((3,), torch.tensor([2]), nan)
    c = then_tensor("w", a, b)
    assert c.indices.tolist() == [0, 2] and bit_view(c.values)[1] == 0x7FC1


def test_additive_runs_sum_like_compose() -> None:
    parts = [DeltaTensor((5,), torch.tensor([i, 4]), torch.tensor([0.1, 0.2]).bfloat16())
             for i in range(3)]
    i, v = union_sum([p.indices for p in parts], [p.values for p in parts])
    got = sequence_tensor("w", [parts[0], None, parts[1], parts[2]])
    assert isinstance(got, DeltaTensor)
    assert torch.equal(got.indices, i) and torch.equal(got.values, v)
