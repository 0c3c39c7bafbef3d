"""Helpers of spdelta.ops against their simpler references."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from spdelta.ops._common import sorted_union


@given(st.lists(st.lists(st.integers(0, 300), max_size=40), min_size=1, max_size=4),
       st.booleans())
def test_sorted_union_equals_torch_unique(lists: list[list[int]], sort: bool) -> None:
    tensors = [torch.tensor(sorted(set(x)) if sort else x, dtype=torch.int64) for x in lists]
    union, inverse = sorted_union(tensors)
    ref_union, ref_inverse = torch.unique(torch.cat(tensors), sorted=True, return_inverse=True)
    assert torch.equal(union, ref_union) and torch.equal(inverse, ref_inverse)
    assert union.dtype == inverse.dtype == torch.int64
