"""``grasp``: Gradient Signal Preservation, weight times the Hessian-gradient product."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from spdelta.errors import SpdeltaError
from spdelta.salience._calib import (
    Calibration,
    batch_loss,
    drain_grads,
    examples,
    grad_of,
    mean_gradient,
    params_of,
    prepare_grads,
)
from spdelta.salience._registry import register_metric
from spdelta.types import Params

__all__ = ["grasp"]


@register_metric("grasp")
def grasp(cal: Calibration, *, temperature: float = 200.0) -> Params:
    """``S = w * (H g0)``, GraSP's keep score, with logits divided by ``temperature``.

    ``L_T`` is the loss on ``logits / temperature`` (GraSP's ``T = 200``); ``g0`` is the
    mean gradient of ``L_T`` over the calibration examples (a first pass) and ``H g0``
    the mean over the examples of the Hessian of ``L_T`` times ``g0`` (a second pass:
    ``d/dw (g0 . grad L_T(w))`` by double backward, no Hessian is materialised).

    Sign convention: GraSP scores ``S(-theta) = -theta * H g`` and *removes* the
    weights with the highest ``S(-theta)`` (they least reduce the gradient flow when
    removed, or even increase it). This function returns ``theta * H g``, the negation,
    so that, as for every metric here, higher means keep: the top-k of this score is
    the set GraSP keeps. The batches must be re-iterable (two passes); the model's
    ops must support double backward. Scaled-dot-product attention (the default of
    Hugging Face models) runs its math backend in the second pass: the fused CPU and
    CUDA kernels have no second derivative, the math one is plain matmuls and softmax.

    Args:
        cal: The calibration inputs.
        temperature: Divides the logits before the loss, ``> 0``.

    Returns:
        Name -> scores of the weight's shape, fp32 (fp64 for fp64 weights).

    Raises:
        SpdeltaError: The batches held no example, or the second pass saw fewer
            examples than the first (a one-shot iterator).

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> batch = {"input": torch.tensor([[2.0]])}
        >>> loss = lambda out, b: (out ** 2).sum()  # L_T = (2w/T)^2: g0 = 8w/T^2, H = 8/T^2
        >>> s = score(m, {"weight": torch.tensor([[1.0]])}, [batch], metric="grasp",
        ...           targets=["weight"], loss=loss, progress=False)
        >>> round(s["weight"].item() * 200.0 ** 4, 4)  # w * H g0 = 64 w^2 / T^4
        64.0

    References:
        Wang et al., "Picking Winning Tickets Before Training by Preserving Gradient
        Flow", ICLR 2020, https://arxiv.org/abs/2002.07376
    """
    g0, first = mean_gradient(cal, temperature=temperature, desc="grasp g0")
    params = params_of(cal)
    leaves = {n: params[n].detach().requires_grad_() for n in cal.targets}
    acc: Params = {}
    total = 0
    for batch, n in examples(cal, desc="grasp Hg"):
        prepare_grads(leaves, n)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            loss = batch_loss(cal, {**params, **leaves}, batch, temperature=temperature)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                        allow_unused=True)
            pairs = [(g0[name], g) for name, g in zip(leaves, grads, strict=True) if g is not None]
            flow = sum(((g0n.to(g.dtype) * g).sum() for g0n, g in pairs), loss.new_zeros(()))
            if flow.requires_grad:
                flow.backward()
        drain_grads(leaves, acc, n)
        total += n
    if total != first:
        raise SpdeltaError(f"grasp: the second pass over the batches saw {total} examples, the "
                           f"first {first}; pass a re-iterable (a list or a DataLoader), not an "
                           "iterator.")
    out = {}
    for name, leaf in leaves.items():
        hg = grad_of(leaf, acc.get(name)).div_(total)
        out[name] = hg.mul_(cal.base[name].detach().to(hg.dtype))
    return out
