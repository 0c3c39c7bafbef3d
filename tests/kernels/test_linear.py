"""SparseDeltaLinear equals the reference (dense merge, then F.linear) in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import grad, vmap

from spdelta.functional import add_at
from spdelta.kernels import merge_weight, sampled_grad, sampled_grad_dense, sparse_delta_linear
from spdelta.kernels._sddmm import _CHUNK

F64 = torch.float64


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Tensor | None]:
    """Random rectangular weight, 2-D or 3-D input, optional bias, any support."""
    out_f, in_f = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    lead = draw(st.sampled_from([(4,), (1,), (2, 3), (3, 1)]))
    numel = out_f * in_f
    chosen = draw(st.one_of(st.just(set()), st.just(set(range(numel))),
                            st.sets(st.integers(0, numel - 1))))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    indices = torch.tensor(sorted(chosen), dtype=torch.int64)
    return {
        "x": torch.randn(*lead, in_f, generator=gen, dtype=F64),
        "weight": torch.randn(out_f, in_f, generator=gen, dtype=F64),
        "bias": torch.randn(out_f, generator=gen, dtype=F64) if draw(st.booleans()) else None,
        "indices": indices,
        "values": torch.randn(len(indices), generator=gen, dtype=F64),
    }


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,
              values: Tensor) -> Tensor:
    return F.linear(x, add_at(weight, indices, values), bias)


def _grads_backward(fn, c: dict) -> tuple[Tensor, ...]:  # type: ignore[no-untyped-def]
    x, v = c["x"].clone().requires_grad_(), c["values"].clone().requires_grad_()
    b = None if c["bias"] is None else c["bias"].clone().requires_grad_()
    y = fn(x, c["weight"], b, c["indices"], v)
    (y * torch.linspace(-1, 2, y.numel(), dtype=F64).view(y.shape)).sum().backward()
    return (y.detach(), v.grad, x.grad) + (() if b is None else (b.grad,))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_matches_reference_backward(c: dict) -> None:
    got, want = _grads_backward(sparse_delta_linear, c), _grads_backward(reference, c)
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_matches_reference_func_grad(c: dict) -> None:
    def loss(fn):  # type: ignore[no-untyped-def]
        return lambda v, x: fn(x, c["weight"], c["bias"], c["indices"], v).pow(2).sum()

    for argnums in (0, 1):
        got = grad(loss(sparse_delta_linear), argnums=argnums)(c["values"], c["x"])
        want = grad(loss(reference), argnums=argnums)(c["values"], c["x"])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _fixed(out_f: int = 5, in_f: int = 4, seed: int = 0) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randperm(out_f * in_f, generator=gen)[: out_f * in_f // 3].sort().values
    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    return rand(2, 3, in_f), rand(out_f, in_f), rand(out_f), indices, rand(len(indices))


def test_gradcheck_and_gradgradcheck() -> None:
    x, w, b, idx, v = _fixed()
    fn = lambda x, b, v: sparse_delta_linear(x, w, b, idx, v)  # noqa: E731
    inputs = (x.requires_grad_(), b.requires_grad_(), v.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_vmap_of_grad_matches_reference() -> None:
    x, w, b, idx, v = _fixed()

    def per_example(fn):  # type: ignore[no-untyped-def]
        g = grad(lambda v, x: fn(x, w, b, idx, v).pow(2).sum())
        two_values = torch.stack([v, 2 * v])
        return vmap(g, in_dims=(None, 0))(v, x), vmap(g, in_dims=(0, None))(two_values, x)

    for got, want in zip(per_example(sparse_delta_linear), per_example(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dense_weight_grad_when_asked() -> None:
    x, w, b, idx, v = _fixed()
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    sparse_delta_linear(x, w1, b, idx, v).sum().backward()
    reference(x, w2, b, idx, v).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_sampled_grad_equals_dense() -> None:
    gen = torch.Generator().manual_seed(3)
    g, x = torch.randn(7, 6, generator=gen, dtype=F64), torch.randn(7, 5, generator=gen, dtype=F64)
    idx = torch.tensor([0, 4, 5, 17, 29])
    torch.testing.assert_close(sampled_grad(g, x, idx, (6, 5)), sampled_grad_dense(g, x, idx))
    idx[0] = 1  # an in-place edit must not reuse the cached CSR pattern
    torch.testing.assert_close(sampled_grad(g, x, idx, (6, 5)), sampled_grad_dense(g, x, idx))


@pytest.mark.parametrize("tokens", [0, 1, _CHUNK - 1, _CHUNK, _CHUNK + 1, 2 * _CHUNK + 37])
@pytest.mark.parametrize("transposed", [False, True])
def test_sampled_grad_across_token_chunks(tokens: int, transposed: bool) -> None:
    """The token-major copies go ``_CHUNK`` tokens at a time: ragged tails, strided inputs."""
    gen = torch.Generator().manual_seed(tokens)
    g = torch.randn(tokens, 7, generator=gen, dtype=F64)
    if transposed:  # a (tokens, out) view with non-unit stride along the features
        g = torch.randn(7, tokens, generator=gen, dtype=F64).t()
    x = torch.randn(tokens, 9, generator=gen, dtype=F64)
    idx = torch.randperm(63, generator=gen)[:20].sort().values
    torch.testing.assert_close(sampled_grad(g, x, idx, (7, 9)), sampled_grad_dense(g, x, idx),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_bf16_base_close_to_fp32_reference(values_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 16, 48, generator=gen), torch.randn(32, 48, generator=gen) / 7
    idx = torch.randperm(32 * 48, generator=gen)[:150].sort().values
    v = (torch.randn(150, generator=gen) / 7).to(values_dtype)
    vb, vr = v.clone().requires_grad_(), v.float().requires_grad_()
    y = sparse_delta_linear(x.bfloat16(), w.bfloat16(), None, idx, vb)
    y_ref = F.linear(x, merge_weight(w, idx, vr), None)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=3e-2)
    y.float().pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    assert vb.grad is not None and vr.grad is not None and vb.grad.dtype == values_dtype
    err = (vb.grad.float() - vr.grad).norm() / vr.grad.norm()
    assert err < 3e-2


def test_csr_pattern_holds_the_support() -> None:
    from spdelta.kernels import _sddmm

    idx = torch.tensor([0, 5, 11, 12, 23])  # (row, col): (0,0) (1,0) (2,1) (2,2) (4,3)
    p = _sddmm._csr_pattern(idx, (6, 5), F64)
    assert p.crow_indices().tolist() == [0, 1, 2, 4, 4, 5, 5]  # rows 3 and 5 empty
    assert p.col_indices().tolist() == [0, 0, 1, 2, 3]
    assert p.values().dtype == F64 and not p.values().any()


@settings(max_examples=40, deadline=None)
@given(cases())
def test_dense_weight_grad_mode_matches_reference(c: dict) -> None:
    """With W requiring a gradient: dense dW = g^T x, and dvalues gathered from it."""
    def grads(fn) -> tuple[Tensor, ...]:  # type: ignore[no-untyped-def]
        w, v = c["weight"].clone().requires_grad_(), c["values"].clone().requires_grad_()
        x = c["x"].clone().requires_grad_()
        y = fn(x, w, c["bias"], c["indices"], v)
        out = (y * torch.linspace(-1, 2, y.numel(), dtype=F64).view(y.shape)).sum()
        return (y.detach(), *torch.autograd.grad(out, [w, v, x]))

    for a, b in zip(grads(sparse_delta_linear), grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _nf4_problem(dtype: torch.dtype) -> tuple[Tensor, ...]:
    pytest.importorskip("torchao")
    from spdelta.quant import to_nf4

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=gen, dtype=dtype)
    q = to_nf4({"w": w}, ["w"])["w"]
    idx = torch.randperm(32 * 64, generator=gen)[:100].sort().values
    x = torch.randn(2, 5, 64, generator=gen, dtype=dtype)
    return x, q, torch.randn(32, generator=gen, dtype=dtype), idx, torch.randn(100, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nf4_weight_matches_reference(dtype: torch.dtype) -> None:
    """An NF4 W on the fast path equals the reference merge on the same NF4 W."""
    x, q, b, idx, v = _nf4_problem(dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    got, want = (_grads_backward(fn, {"x": x, "weight": q, "bias": b, "indices": idx, "values": v})
                 for fn in (sparse_delta_linear, reference))
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, **tol)
    # torch.func.grad (the dequantisation must not depend on a no-op same-dtype ``.to``)
    def loss(fn):  # type: ignore[no-untyped-def]
        return lambda v: fn(x, q, b, idx, v).pow(2).sum()

    torch.testing.assert_close(grad(loss(sparse_delta_linear))(v), grad(loss(reference))(v), **tol)
    # The dense gradient of the NF4 weight itself (SpIEL's AG window), straight through.
    dense = q.get_original_weight()
    def dw(fn, w):  # type: ignore[no-untyped-def]
        w = w.detach().requires_grad_()
        return torch.autograd.grad(fn(x, w, b, idx, v).pow(2).sum(), w)[0]

    torch.testing.assert_close(dw(sparse_delta_linear, q), dw(reference, dense), **tol)
    torch.testing.assert_close(dw(reference, q), dw(reference, dense), **tol)


def test_nf4_weight_is_never_saved_dense() -> None:
    """Backward keeps x and references (NF4 W, indices, values); no dense (out, in) tensor."""
    x, q, b, idx, v = _nf4_problem(torch.float32)
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = sparse_delta_linear(x, q, b, idx, v.requires_grad_())
    assert any(t is q for t in saved)
    assert not any(type(t) is Tensor and tuple(t.shape) == tuple(q.shape) for t in saved)
    y.sum().backward()
    assert v.grad is not None and v.grad.shape == v.shape


def _conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,
                      values: Tensor) -> Tensor:
    """GPT-2's ``Conv1D``: ``x @ (W + D) + b`` with ``W`` stored ``(in, out)``."""
    y = x @ add_at(weight, indices, values)
    return y if bias is None else y + bias


@settings(max_examples=60, deadline=None)
@given(cases())
def test_transposed_weight_matches_conv1d_reference(c: dict) -> None:
    """``transposed=True`` (Conv1D's ``(in, out)`` layout, indices into it): values, input,
    bias and the dense weight gradient all equal autograd through the dense merge."""
    c = {**c, "weight": c["weight"].t().contiguous()}  # (in, out); indices now address it

    def fast(x: Tensor, w: Tensor, b: Tensor | None, i: Tensor, v: Tensor) -> Tensor:
        return sparse_delta_linear(x, w, b, i, v, transposed=True)

    got, want = _grads_backward(fast, c), _grads_backward(_conv1d_reference, c)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w1, w2 = c["weight"].clone().requires_grad_(), c["weight"].clone().requires_grad_()
    fast(c["x"], w1, c["bias"], c["indices"], c["values"]).sum().backward()
    _conv1d_reference(c["x"], w2, c["bias"], c["indices"], c["values"]).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)
