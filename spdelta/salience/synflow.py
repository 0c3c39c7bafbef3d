"""``synflow``: data-free synaptic flow through the network with all weights made positive."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spdelta.errors import SpdeltaError
from spdelta.rules import accumulate_dtype
from spdelta.salience._calib import Calibration, batch_size, forward, params_of
from spdelta.salience._registry import register_metric
from spdelta.types import Params

__all__ = ["ones_input", "synflow"]


def ones_input(cal: Calibration) -> dict[str, Any]:
    """The all-ones input: shaped like the first example of the first calibration batch.

    For a model with input embeddings fed ``input_ids`` (a Hugging Face LM) it is
    ``{"inputs_embeds": ones(1, seq, hidden)}`` in the embedding dtype: token ids are
    not numbers, so "ones" is taken at the first continuous layer. Otherwise every
    floating tensor of the example becomes ones and ``labels`` is dropped.

    Raises:
        SpdeltaError: ``cal.batches`` is empty.
    """
    first = next(iter(cal.batches), None)
    if first is None:
        raise SpdeltaError("synflow: needs one batch to shape its all-ones input; found none.")
    size = batch_size(first)
    example = {k: v[:1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v
               for k, v in first.items() if k != "labels"}
    get_emb = getattr(cal.model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    weight = getattr(emb, "weight", None)
    if "input_ids" in example and isinstance(weight, Tensor):
        ids = example["input_ids"]
        return {"inputs_embeds": torch.ones(1, ids.shape[-1], weight.shape[-1],
                                            dtype=weight.dtype, device=ids.device)}
    return {k: torch.ones_like(v) if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in example.items()}


@register_metric("synflow")
def synflow(cal: Calibration) -> Params:
    """``S = |w * dR/dw|`` at ``|w|``, with ``R = sum(f(1; |theta|))`` on an all-ones input.

    Every floating tensor of ``base`` is replaced by its absolute value (buffers taken
    from the model are kept), the all-ones input of :func:`ones_input` is run once,
    ``R`` is the sum of the outputs (the ``logits`` of a model output), and the score is
    ``| |w| * dR/d|w| |``. For ReLU networks this is the SynFlow path norm; in a
    transformer the non-linearities (norms, softmax, SiLU) stay, so it is the same
    formula on an approximately linearised network. Data-free: only the first batch's
    shape is read. Holds one ``|theta|`` copy of every parameter. In attention every
    position of the all-ones input is the same token, so attention is uniform whatever
    the queries and keys are: the q and k projections get scores that are rounding
    noise (about 1e-9 of the largest score in a float64 test), and so no entries under
    a global top-k.

    Args:
        cal: The calibration inputs.

    Returns:
        Name -> scores of the weight's shape, fp32 (fp64 for fp64 weights).

    Raises:
        SpdeltaError: ``cal.batches`` is empty.

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> m = torch.nn.Linear(2, 1, bias=False)
        >>> batch = {"input": torch.tensor([[5.0, 7.0]])}
        >>> s = score(m, {"weight": torch.tensor([[2.0, -3.0]])}, [batch], metric="synflow",
        ...           targets=["weight"], progress=False)
        >>> s["weight"].tolist()  # R = |w| . 1, dR/dw = 1
        [[2.0, 3.0]]

    References:
        Tanaka et al., "Pruning neural networks without any data by iteratively
        conserving synaptic flow", NeurIPS 2020, https://arxiv.org/abs/2006.05467
    """
    inputs = ones_input(cal)
    params = params_of(cal)
    positive = {k: v.abs() if k in cal.base and v.is_floating_point() else v
                for k, v in params.items()}
    leaves = {n: positive[n].requires_grad_() for n in cal.targets}
    with torch.enable_grad():
        out = forward(cal, {**positive, **leaves}, inputs)
        flow = out if isinstance(out, Tensor) else out.logits
        grads = torch.autograd.grad(flow.sum(), list(leaves.values()), allow_unused=True)
    scores = {}
    for (n, w), g in zip(leaves.items(), grads, strict=True):
        dtype = accumulate_dtype(w.dtype)
        g = torch.zeros_like(w, dtype=dtype) if g is None else g.to(dtype)
        scores[n] = g.mul_(w.detach().to(dtype)).abs_()
    return scores
