"""Clipping by global norm against ``torch.nn.utils.clip_grad_norm_`` on the same gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.errors import ParameterError
from spdelta.optim import adamw, apply_updates, chain, clip_by_global_norm, global_norm


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       scale=st.floats(1e-4, 1e3), max_norm=st.floats(1e-3, 10.0),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_clip_grad_norm(sizes: list[int], scale: float, max_norm: float,
                                dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = {f"t{i}": torch.randn(k, generator=gen, dtype=dtype) * scale
             for i, k in enumerate(sizes)}
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in grads.values()]
    for p, g in zip(params, grads.values(), strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert torch.equal(global_norm(grads), total)
    clipped, state = clip_by_global_norm(max_norm).update(grads, None, {})
    assert state is None
    for p, n in zip(params, grads, strict=True):
        assert p.grad is not None
        assert clipped[n].dtype == dtype
        torch.testing.assert_close(clipped[n], p.grad, rtol=0, atol=0)


def test_small_gradients_pass_and_inputs_are_untouched() -> None:
    g = {"w": torch.tensor([0.3, 0.4])}
    out, _ = clip_by_global_norm(1.0).update(g, None, {})
    torch.testing.assert_close(out["w"], g["w"])  # coefficient clamped at 1
    big = {"w": torch.tensor([30.0, 40.0])}
    out, _ = clip_by_global_norm(5.0).update(big, None, {})
    assert big["w"].tolist() == [30.0, 40.0]
    assert float(global_norm(out)) == pytest.approx(5.0, rel=1e-6)


def test_chained_before_adamw_equals_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    values = {"a": torch.randn(30, generator=gen, dtype=torch.float64),
              "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    dense = [torch.nn.Parameter(v.clone()) for v in values.values()]
    ref = torch.optim.AdamW(dense, lr=1e-2, weight_decay=0.0)
    opt = chain(clip_by_global_norm(0.5), adamw(1e-2))
    state = opt.init(values)
    for _ in range(4):
        grads = {n: 3 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
                 for n, v in values.items()}
        updates, state = opt.update(grads, state, values)
        values = apply_updates(values, updates)
        for p, g in zip(dense, grads.values(), strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(dense, 0.5)
        ref.step()
    for v, p in zip(values.values(), dense, strict=True):
        torch.testing.assert_close(v, p.detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_max_norm(bad: float) -> None:
    with pytest.raises(ParameterError, match="max_grad_norm"):
        clip_by_global_norm(bad)
