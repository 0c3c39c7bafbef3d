"""Sparse AdamW against the AdamW formula in float64 and against ``torch.optim.AdamW``."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.optim import adamw, apply_updates


def formula(p: float, grads: list[float], lr: float, b1: float, b2: float, eps: float,
            wd: float) -> float:
    """One scalar parameter through AdamW (Loshchilov & Hutter), in Python floats."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        p *= 1 - lr * wd
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    return p


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4), steps=st.integers(1, 4),
       wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_matches_formula_in_float64(sizes: list[int], steps: int, wd: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    params = {f"t{i}": torch.randn(k, generator=gen, dtype=f64) for i, k in enumerate(sizes)}
    grads = [{n: torch.randn(p.shape, generator=gen, dtype=f64) for n, p in params.items()}
             for _ in range(steps)]
    opt = adamw(0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    values, state = params, opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, values)
        values = apply_updates(values, updates)
    for n, p in params.items():
        want = [formula(float(p[i]), [float(g[n][i]) for g in grads], 0.05, 0.8, 0.95, 1e-6, wd)
                for i in range(len(p))]
        torch.testing.assert_close(values[n], torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-14)
        assert torch.equal(state.steps[n], torch.full_like(state.steps[n], steps))


def test_fp32_matches_torch_adamw() -> None:
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(300, generator=gen), "b": torch.randn(17, generator=gen)}
    dense = [torch.nn.Parameter(p.clone()) for p in params.values()]
    ref = torch.optim.AdamW(dense, lr=1e-2, weight_decay=0.01)
    opt = adamw(1e-2, weight_decay=0.01)
    values, state = params, opt.init(params)
    for _ in range(5):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        updates, state = opt.update(grads, state, values)
        values = apply_updates(values, updates)
        for p, g in zip(dense, grads.values(), strict=True):
            p.grad = g
        ref.step()
    for v, p in zip(values.values(), dense, strict=True):
        torch.testing.assert_close(v, p.detach(), rtol=1e-6, atol=1e-7)


def test_update_is_pure_and_state_is_one_buffer_per_field() -> None:
    params = {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float64)}
    opt = adamw(0.1)
    state = opt.init(params)
    grads = {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float64)}
    before = [t.clone() for t in (*params.values(), *state.mu.values(), *state.steps.values())]
    updates, new = opt.update(grads, state, params)
    values = apply_updates(params, updates)
    after = [*params.values(), *state.mu.values(), *state.steps.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # Same-dtype tensors of a field share one allocation; the fp64 "b" has its own.
    steps = new.steps
    assert steps["a"].untyped_storage().data_ptr() == steps["b"].untyped_storage().data_ptr()
    assert new.mu["a"].untyped_storage().nbytes() == 3 * 4
    assert new.mu["b"].dtype == torch.float64 and values["b"].dtype == torch.float64
