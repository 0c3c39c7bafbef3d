"""``empty_like_flat``: shapes, dtypes, devices as asked; disjoint views; one buffer per group."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.optim._base import empty_like_flat

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int32]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@settings(max_examples=50, deadline=None)
@given(specs=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=0, max_size=6),
       cast=st.sampled_from([None, torch.float32]))
def test_views_are_disjoint_and_grouped(specs: list[tuple[list[int], torch.dtype]],
                                        cast: torch.dtype | None) -> None:
    tensors = {f"t{i}": torch.zeros(shape, dtype=dt) for i, (shape, dt) in enumerate(specs)}
    out = empty_like_flat(tensors, cast)
    assert list(out) == list(tensors)
    for n, t in tensors.items():
        assert out[n].shape == t.shape and out[n].dtype == (cast or t.dtype)
        assert out[n].device == t.device and out[n].is_contiguous()
    for i, t in enumerate(out.values()):  # each view written after all the others: disjoint
        t.fill_(i + 1)
    for i, t in enumerate(out.values()):
        assert bool((t == i + 1).all())
    bufs = {(t.dtype, t.untyped_storage().data_ptr()) for t in out.values() if t.numel()}
    assert len(bufs) == len({t.dtype for t in out.values() if t.numel()})


def test_subclass_gets_its_own_tensor() -> None:
    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(3).as_subclass(Sub)
    out = empty_like_flat({"plain": torch.zeros(2), "sub": sub})
    assert type(out["sub"]) is Sub and out["sub"].shape == (3,)
    assert out["plain"].untyped_storage().nbytes() == 2 * 4
