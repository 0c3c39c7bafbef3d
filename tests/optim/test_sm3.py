"""SM3 over sparse values against dense float64 references of the SM3-II formula."""

from __future__ import annotations

import pytest
import torch

from spdelta.errors import KeyMismatchError, ParameterError
from spdelta.optim import SM3State, apply_updates, chain, sm3
from spdelta.optim.sm3 import unravel


def dense_sm3(grads: list[torch.Tensor], mask: torch.Tensor, lr: float, momentum: float,
              eps: float, include_self: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense SM3-II on a (rows, cols) matrix restricted to ``mask``; returns (W, R, C)."""
    rows, cols = mask.shape
    w = torch.zeros(rows, cols, dtype=torch.float64)
    r = torch.zeros(rows, dtype=torch.float64)
    c = torch.zeros(cols, dtype=torch.float64)
    m = torch.zeros_like(w)
    for g in grads:
        g = g * mask
        nu = torch.minimum(r[:, None], c[None, :]) + g * g
        masked = torch.where(mask, nu, torch.full_like(nu, -torch.inf))
        new_r, new_c = masked.amax(1).clamp(min=0), masked.amax(0).clamp(min=0)
        if include_self:
            new_r, new_c = torch.maximum(r, new_r), torch.maximum(c, new_c)
        r, c = new_r, new_c
        step = torch.where(mask, g / (nu + eps).sqrt(), torch.zeros_like(g))
        m = momentum * m + (1 - momentum) * step if momentum else step
        w = w - lr * m
    return w, r, c


def run_sparse(grads: list[torch.Tensor], mask: torch.Tensor, lr: float, momentum: float,
               eps: float) -> tuple[torch.Tensor, SM3State]:
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
    opt = sm3(lr, support={"w": idx}, shapes={"w": tuple(mask.shape)}, momentum=momentum, eps=eps)
    params = {"w": torch.zeros(idx.numel(), dtype=torch.float64)}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({"w": g.reshape(-1)[idx]}, state, params)
        params = apply_updates(params, updates)
    dense = torch.zeros(mask.numel(), dtype=torch.float64).index_put((idx,), params["w"])
    return dense.view(mask.shape), state


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_full_support_matches_dense_sm3_ii(momentum: float) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(6)]
    mask = torch.ones(5, 7, dtype=torch.bool)
    # Plain SM3-II (accumulators = max over the row, old value not kept) on a dense matrix.
    w_ref, r_ref, c_ref = dense_sm3(grads, mask, 0.1, momentum, 1e-30, include_self=False)
    w, state = run_sparse(grads, mask, 0.1, momentum, 1e-30)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(state.accumulators["w"][0], r_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(state.accumulators["w"][1], c_ref, rtol=0, atol=1e-14)
    assert state.steps == 6


def test_sparse_support_matches_masked_dense_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 9, generator=gen) < 0.3
    mask[2] = False  # an empty row keeps a zero accumulator
    grads = [torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(5)]
    w_ref, r_ref, c_ref = dense_sm3(grads, mask, 0.05, 0.5, 1e-12, include_self=True)
    w, state = run_sparse(grads, mask, 0.05, 0.5, 1e-12)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(state.accumulators["w"][0], r_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(state.accumulators["w"][1], c_ref, rtol=0, atol=1e-14)
    # On a fixed support, keeping the old maximum changes nothing (SM3-II, Anil et al. §4).
    w_plain, _, _ = dense_sm3(grads, mask, 0.05, 0.5, 1e-12, include_self=False)
    torch.testing.assert_close(w_plain, w_ref, rtol=0, atol=1e-14)


def test_vector_is_adagrad() -> None:
    gen = torch.Generator().manual_seed(2)
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.Adagrad([p], lr=0.1, eps=0.0)
    opt = sm3(0.1, support={"b": torch.arange(4)}, shapes={"b": (4,)}, eps=0.0)
    params = {"b": torch.zeros(4, dtype=torch.float64)}
    state = opt.init(params)
    for _ in range(4):
        g = torch.randn(4, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        ref.step()
        updates, state = opt.update({"b": g}, state, params)
        params = apply_updates(params, updates)
    torch.testing.assert_close(params["b"], p.detach(), rtol=0, atol=1e-15)


def test_memory_is_rows_plus_cols_and_rank3_works() -> None:
    support = {"w": torch.tensor([0, 17, 99]), "k": torch.tensor([1, 29])}
    shapes = {"w": (10, 20), "k": (2, 3, 5), "unused": (7,)}
    opt = chain(sm3(1.0, support=support, shapes=shapes))
    params = {"w": torch.zeros(3), "k": torch.zeros(2)}
    (state,) = opt.init(params)
    assert [a.numel() for a in state.accumulators["w"]] == [10, 20]
    assert [a.numel() for a in state.accumulators["k"]] == [2, 3, 5]
    assert state.momentum == {}
    grads = {"w": torch.ones(3), "k": torch.tensor([3.0, 4.0])}
    updates, (state,) = opt.update(grads, (state,), params)
    torch.testing.assert_close(updates["k"], torch.tensor([-1.0, -1.0]))
    assert state.accumulators["k"][2].tolist() == [0.0, 9.0, 0.0, 0.0, 16.0]


def test_unravel_matches_numpy_order() -> None:
    shape = (3, 4, 5)
    idx = torch.arange(60)
    coords = unravel(idx, shape)
    ref = torch.unravel_index(idx, shape)
    assert all(torch.equal(a, b) for a, b in zip(coords, ref, strict=True))
    assert [c.tolist() for c in unravel(torch.tensor([0]), ())] == [[0]]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ParameterError, match="momentum"):
        sm3(0.1, support={}, shapes={}, momentum=1.0)
    with pytest.raises(ParameterError, match="lr"):
        sm3(-1.0, support={}, shapes={})
    with pytest.raises(KeyMismatchError, match="'w'"):
        sm3(0.1, support={"w": torch.tensor([0])}, shapes={})
    opt = sm3(0.1, support={"w": torch.tensor([0])}, shapes={"w": (2,)})
    with pytest.raises(KeyMismatchError, match="'v'"):
        opt.init({"v": torch.zeros(1)})
