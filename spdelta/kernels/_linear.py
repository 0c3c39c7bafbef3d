"""``y = x (W + D)^T + b`` with a sparse delta ``D``: a custom ``torch.autograd.Function``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spdelta.kernels._sddmm import sampled_grad
from spdelta.quant.nf4 import is_nf4, nf4_to_dense
from spdelta.rules import accumulate_dtype
from spdelta.types import is_plain

__all__ = ["SparseDeltaLinear", "merge_weight", "sparse_delta_linear"]


def merge_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Return ``W + scatter(indices, values)`` as a new tensor in ``weight.dtype``.

    The merge arithmetic of the whole library (:func:`spdelta.functional.add_at` calls
    it): the sum is taken in fp64 for an fp64 weight and in fp32 otherwise, then cast back.

    Args:
        weight: Dense base weight, shape ``(out, in)``, any float dtype.
        indices: 1-D int64 flat row-major positions into ``weight``.
        values: 1-D float values, same length as ``indices``.

    Returns:
        The merged weight, shape and dtype of ``weight``.

    Example:
        >>> import torch
        >>> merge_weight(torch.zeros(2, 2), torch.tensor([1]), torch.tensor([2.0])).tolist()
        [[0.0, 2.0], [0.0, 0.0]]
    """
    acc = accumulate_dtype(weight.dtype)
    dense, src = _dense(weight, acc), values.to(acc)
    if dense is not weight and is_plain(dense) and is_plain(src) and not (
            torch.is_grad_enabled() and (dense.requires_grad or src.requires_grad)):
        flat = dense.view(-1).index_add_(0, indices, src)  # a buffer of our own: no copy
    else:
        flat = dense.reshape(-1).index_add(0, indices, src)
    return flat.view(weight.shape).to(weight.dtype)


class _Dequantize(torch.autograd.Function):
    """NF4 -> dense, passing the gradient straight through to the NF4 tensor.

    Only used when the NF4 tensor itself requires a gradient (SpIEL's AG window asks
    for the dense gradient of each target weight): ``dL/dW`` of the dequantised weight.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:  # type: ignore[override]
        """The dequantised weight, a new dense tensor of ``weight.dtype``."""
        return nf4_to_dense(weight)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        """The gradient, unchanged (a dense tensor)."""
        return g


def _unwrapped(t: Tensor) -> Tensor:
    """The tensor inside any ``torch.func`` wrappers (e.g. a saved NF4 W in backward)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _dense(weight: Tensor, acc: torch.dtype) -> Tensor:
    """``weight`` as a dense tensor of dtype ``acc`` (it may be ``weight`` itself)."""
    inner = _unwrapped(weight)
    if is_nf4(inner):
        # Dequantise explicitly: a same-dtype ``.to`` is a no-op on a (wrapped) NF4 tensor.
        # A torch.func-wrapped NF4 W is a constant here (the base is never differentiated
        # under torch.func); eager autograd may ask for its dense gradient (SpIEL's AG).
        if inner is weight and weight.requires_grad:
            return _Dequantize.apply(weight).to(acc)  # type: ignore[no-any-return]
        return nf4_to_dense(inner).to(acc)
    dense = weight.to(acc)
    if dense is weight and not is_plain(weight):
        # A same-dtype ``.to`` is a no-op: a tensor subclass (e.g. an NF4 base behind a
        # torch.func wrapper) would stay quantised. A dtype round trip dequantises it.
        dense = weight.to(torch.float64).to(acc)
    return dense


class SparseDeltaLinear(torch.autograd.Function):
    """Autograd function for ``y = x (W + D)^T + b``; see :func:`sparse_delta_linear`.

    With ``transposed``, ``W`` is stored ``(in, out)`` (GPT-2's ``Conv1D``) and
    ``y = x (W + D) + b``; indices are flat positions into that stored layout.

    Forward merges ``W' = W + D`` transiently; only ``x``, ``W``, ``indices`` and
    ``values`` are saved (references: an NF4 ``W`` stays 4-bit and is dequantised
    again in backward). Backward rebuilds ``W'`` for ``dx = g W'`` (only when ``x``
    needs a gradient) and computes ``dvalues`` as an SDDMM sampled at the support,
    in fp32 (fp64 for an fp64 ``W``). When ``W`` itself requires a gradient, the
    dense ``dW = g^T x`` is computed instead and ``dvalues`` is gathered from it
    (one dense product, no SDDMM). ``setup_context`` style with
    ``generate_vmap_rule``, so ``torch.func.grad``, ``grad_and_value`` and ``vmap``
    work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,
                values: Tensor, transposed: bool = False) -> Tensor:
        """Return ``F.linear(x, W + D, bias)``; ``W + D`` is freed on return."""
        merged = merge_weight(weight, indices, values)
        return F.linear(x, merged.t() if transposed else merged, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        """Save ``x``, ``W``, ``indices``, ``values`` (references, no copies)."""
        x, weight, bias, indices, values, *rest = inputs
        ctx.save_for_backward(x, weight, indices, values)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.transposed = bool(rest and rest[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Gradients for ``x``, ``W`` (dense, only if asked), ``bias`` and ``values``."""
        x, weight, indices, values = ctx.saved_tensors
        need_x, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
        dx = dw = db = dv = None
        if need_x:
            merged = merge_weight(weight, indices, values)
            dx = g @ (merged.t() if ctx.transposed else merged)  # (..., in)
        acc = accumulate_dtype(weight.dtype)
        g2 = g.reshape(-1, g.shape[-1]).to(acc)  # (tokens, out)
        if need_v or need_w:
            x2 = x.reshape(-1, x.shape[-1]).to(acc)  # (tokens, in)
            # The stored layout is (rows, cols) = (out, in), or (in, out) when transposed.
            rows, cols = (x2, g2) if ctx.transposed else (g2, x2)
            if need_w:  # the dense dL/dW = g^T x (SpIEL's AG window asks for it)
                dw_acc = rows.t() @ cols  # the stored layout
                dw = dw_acc.to(weight.dtype)
                if need_v:  # W' = W + D: dL/dD at the support is dL/dW gathered there
                    dv = dw_acc.reshape(-1)[indices].to(values.dtype)
            elif need_v:
                dv = sampled_grad(rows, cols, indices, (weight.shape[0], weight.shape[1]))
                dv = dv.to(values.dtype)
        if need_b:
            db = g2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, dv, None


def sparse_delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,
                        values: Tensor, *, transposed: bool = False) -> Tensor:
    """Return ``x (W + D)^T + b`` where ``D`` holds ``values`` at flat ``indices``.

    Equal to ``F.linear(x, add_at(weight, indices, values), bias)`` but keeps no
    dense ``W + D`` alive for backward and never builds a dense ``dL/dW``:
    ``dvalues[k] = sum_t g[t, row_k] * x[t, col_k]`` is computed at the support
    only (``torch.sparse.sampled_addmm``). ``weight`` is normally frozen; if it
    requires a gradient, its dense gradient is computed (and ``dvalues`` gathered
    from it).

    Args:
        x: Input, shape ``(..., in)``, dtype of ``weight``.
        weight: Base weight, shape ``(out, in)``, fp32, bf16 or fp64, or a ``torchao``
            ``NF4Tensor`` (dequantised in forward and again in backward, never kept dense).
        bias: Optional bias, shape ``(out,)``, or ``None``.
        indices: 1-D int64 sorted unique flat row-major positions into ``weight``.
        values: 1-D fp32/bf16 (or fp64) delta values, same length as ``indices``.
        transposed: ``weight`` is stored ``(in, out)`` and ``y = x (W + D) + b``
            (GPT-2's ``Conv1D``); ``indices`` address that stored layout.

    Returns:
        Output, shape ``(..., out)``, dtype of ``weight``.

    Example:
        >>> import torch
        >>> v = torch.tensor([2.0], requires_grad=True)
        >>> y = sparse_delta_linear(torch.ones(3, 2), torch.zeros(1, 2), None,
        ...                         torch.tensor([1]), v)
        >>> y.sum().backward()
        >>> y[:, 0].tolist(), v.grad.tolist()
        ([2.0, 2.0, 2.0], [3.0])
    """
    return SparseDeltaLinear.apply(  # type: ignore[no-any-return]
        x, weight, bias, indices, values, transposed)
